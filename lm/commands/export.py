"""`lm export`: write one of our model directories as a Hugging Face Llama directory.

  lm export --to hf CKPT DST [--dtype=bfloat16] [--max_shard_size=5GB] [--step=N]

CKPT is any model directory (pretrain, SFT, converted, or a reward model, whose backbone is
exported). DST loads with `transformers.LlamaForCausalLM.from_pretrained(DST)`.
"""

from __future__ import annotations

import re

from absl import flags

TO = flags.DEFINE_enum("to", None, ["hf"], "Output layout.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace DST if it exists.")
DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                          "Stored dtype (default: the model's param_dtype).")
MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB",
                                "Split safetensors files past this size (B, KB, MB, GB; 1000-based).")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
  if not match or match.group(2).upper() not in _UNITS:
    raise SystemExit(f"lm export: --max_shard_size={text!r} is not a size like 5GB or 500MB")
  return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def main(argv):
  if TO.value is None or len(argv) != 3:
    raise SystemExit("usage: lm export --to=hf CKPT DST [--dtype=bfloat16] [--overwrite]")
  src, dst = argv[1], argv[2]

  from lm.interop import exporter

  try:
    notes = exporter.export_hf(src, dst, dtype=DTYPE.value, overwrite=OVERWRITE.value,
                               max_shard_bytes=parse_size(MAX_SHARD.value), step=STEP.value)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    raise SystemExit(f"lm export: {e}")
  for note in notes:
    print(f"note: {note}")
  print(f"wrote {dst}")
