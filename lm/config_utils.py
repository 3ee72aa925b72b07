"""Between experiment ConfigDicts and the frozen dataclasses library code takes.

Experiments hold every field of a dataclass in a ConfigDict, so `--config.a.b=value` can override
any of them; optional fields become typed placeholders (a plain None could not be overridden).
Building the dataclass back checks every name, so a misspelled field is an error naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")


def _field_type(cls, field: dataclasses.Field):
  hint = typing.get_type_hints(cls).get(field.name, field.type)
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
    return args[0]
  return hint


def to_config(instance: Any) -> ml_collections.ConfigDict:
  """A dataclass instance -> ConfigDict with one overridable entry per field (nested dataclasses
  become nested sections)."""
  values = {}
  for field in dataclasses.fields(instance):
    value = getattr(instance, field.name)
    if dataclasses.is_dataclass(value):
      value = to_config(value)
    elif value is None:
      value = config_dict.placeholder(_field_type(type(instance), field))
    elif isinstance(value, tuple):
      value = tuple(value)
    values[field.name] = value
  return ml_collections.ConfigDict(values)


def from_config(cls: type[T], cfg: ml_collections.ConfigDict | dict, where: str = "") -> T:
  """A ConfigDict -> cls(**fields), naming unknown or missing fields and where they are."""
  values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{where or cls.__name__}: unknown field(s) {unknown}; "
                     f"{cls.__name__} has {sorted(known)}")
  for field in dataclasses.fields(cls):
    kind = _field_type(cls, field)
    if field.name in values and dataclasses.is_dataclass(kind) and not dataclasses.is_dataclass(
        values[field.name]):
      values[field.name] = from_config(kind, values[field.name],
                                       f"{where}.{field.name}" if where else field.name)
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    if str(e).startswith(where) and where:
      raise
    raise ValueError(f"{where or cls.__name__}: {e}") from e


def check_overrides(cfg: ml_collections.ConfigDict, argv: list[str], flag: str = "config"
                    ) -> None:
  """Raises ValueError for a `--config.path=value` whose path does not exist in `cfg`."""
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split("=", 1)[0]
    node = cfg
    walked = []
    for key in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        options = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        hint = _closest(key, options)
        raise ValueError(
            f"unknown config field {flag}.{path!s}: {'.'.join(walked + [key])!r} does not exist"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + (f"; fields here: {options}" if options else ""))
      node = node[key]
      walked.append(key)


def _closest(word: str, options: list[str]) -> str | None:
  import difflib
  matches = difflib.get_close_matches(word, options, n=1)
  return matches[0] if matches else None
