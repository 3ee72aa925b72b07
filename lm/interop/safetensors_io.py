"""The safetensors format, read and written one tensor at a time with plain file I/O.

The `safetensors` package memory-maps whole files, and pages it touches stay in the process's
resident set until the file is closed; reading with `readinto` keeps only the tensor asked for.
Writing needs every shape up front (the header holds the offsets), which the config gives, so
tensors can then be produced and written one by one.

Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
padded with spaces to a multiple of 8, then the raw little-endian data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Iterable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor's bytes are: file, absolute offset, dtype and shape."""

  path: str
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
  """Every tensor of a safetensors file, without reading any data.

  Raises ValueError naming the file when the header is malformed or points outside the file.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", raw)
    if length > min(_MAX_HEADER, size - 8):
      raise ValueError(f"{path}: not a safetensors file (header length {length})")
    try:
      header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: unreadable safetensors header ({e})") from e
  base = 8 + length
  infos = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry.get("dtype") not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    info = TensorInfo(path, name, DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"]),
                      base + int(entry["data_offsets"][0]))
    begin, end = entry["data_offsets"]
    if end - begin != info.nbytes or base + end > size:
      raise ValueError(f"{path}: tensor {name!r} {info.shape} {entry['dtype']} has data offsets "
                       f"{begin}..{end}, which do not fit its shape or the file ({size} bytes)")
    infos[name] = info
  return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
  """The tensor's data as a fresh array of shape `info.shape`."""
  array = np.empty(info.shape, info.dtype)
  with open(info.path, "rb") as f:
    f.seek(info.offset)
    got = f.readinto(memoryview(array.reshape(-1).view(np.uint8)))
  if got != info.nbytes:
    raise ValueError(f"{info.path}: tensor {info.name!r} is truncated ({got} of {info.nbytes} bytes)")
  return array


def _write_rows(f, array: np.ndarray, block_bytes: int = 16 * 2**20) -> None:
  """Writes `array` in C order; a non-contiguous view (a transpose) is copied a block of rows at a
  time rather than whole."""
  if array.ndim == 0 or array.flags.c_contiguous:
    f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
    return
  row_bytes = max(1, array[0].size * array.itemsize)
  step = max(1, block_bytes // row_bytes)
  for start in range(0, array.shape[0], step):
    f.write(memoryview(np.ascontiguousarray(array[start:start + step]).reshape(-1).view(np.uint8)))


def write(path: str | os.PathLike, specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
          arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes tensors (name, dtype, shape) whose data `arrays` yields one at a time, in order."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, dtype, shape in specs:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  count = 0
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for (name, dtype, shape), array in zip(specs, arrays):
      if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"{path}: tensor {name!r} is {array.dtype}{tuple(array.shape)}, the header "
                         f"says {np.dtype(dtype)}{tuple(shape)}")
      _write_rows(f, array)
      count += 1
  if count != len(specs):
    raise ValueError(f"{path}: got {count} tensors for a header of {len(specs)}")
