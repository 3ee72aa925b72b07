"""Peak host memory of `lm convert` and `lm export` against the model size and the largest tensor.

  python benchmarks/convert_memory.py [--layout=both|meta|hf] [--mp=2] [--dim=1024 --layers=16]

Generates a random Llama checkpoint of about 1 GB (fp32; vocab 32000, dim 1024, 16 layers, GQA
16/4, ffn 2816) in the Meta and/or Hugging Face layout, converts it in a fresh subprocess, exports
the result back to Hugging Face in another, and reports each subprocess's peak RSS (VmHWM),
its RSS after imports (the fixed overhead: Python, JAX, PyTorch, Orbax), and the difference, next
to the model size and the largest single tensor. The target is a peak under 2x the largest tensor
plus the fixed overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

RESULT = "RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_bytes(field: str = "VmRSS") -> int:
  """This process's resident set (VmRSS) or its peak (VmHWM). Unlike ru_maxrss, VmHWM starts
  afresh at exec, so a child does not inherit the generator's peak."""
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def model_config(args):
  from lm import configs
  return configs.ModelConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers,
                             n_heads=args.dim // 64, n_kv_heads=args.dim // 256, multiple_of=256)


def generate_hf(cfg, directory: str) -> None:
  """Random tensors written one at a time with the streaming writer (two files and an index)."""
  import numpy as np

  from lm import convert
  from lm.interop import exporter, safetensors_io

  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  specs = [(n, np.dtype(np.float32), convert.hf_shape(n, cfg)) for n in convert.hf_tensor_names(cfg)]
  halves = [specs[: len(specs) // 2], specs[len(specs) // 2:]]
  weight_map = {}
  for k, shard in enumerate(halves):
    file = f"model-{k + 1:05d}-of-00002.safetensors"
    safetensors_io.write(os.path.join(directory, file), shard,
                         (0.02 * rng.standard_normal(s, np.float32) for _, _, s in shard))
    weight_map.update({n: file for n, _, _ in shard})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(exporter.hf_config(cfg, np.dtype(np.float32)), f)


def generate_meta(cfg, directory: str, mp: int) -> None:
  """Meta shards from the HF tensors (names and split axes of lm/convert.py; values are random,
  so the Q/K row order does not matter here)."""
  import torch

  from lm import convert

  os.makedirs(directory, exist_ok=True)
  generator = torch.Generator().manual_seed(0)
  shards = [{} for _ in range(mp)]
  for meta, (hf_name, axis) in convert.meta_tensor_names(cfg.n_layers).items():
    tensor = 0.02 * torch.randn(convert.hf_shape(hf_name, cfg), generator=generator)
    for k in range(mp):
      shards[k][meta] = tensor if axis is None else torch.chunk(tensor, mp, axis)[k].clone()
  for k, shard in enumerate(shards):
    torch.save(shard, os.path.join(directory, f"consolidated.{k:02d}.pth"))
  params = {"dim": cfg.dim, "multiple_of": cfg.multiple_of, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "n_layers": cfg.n_layers, "norm_eps": 1e-5,
            "vocab_size": -1}
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(params, f)


def child(task: str, src: str, dst: str) -> None:
  import jax  # noqa: F401  (imports count as the fixed overhead)
  import torch  # noqa: F401

  from lm.interop import exporter, importer, sources

  base = rss_bytes()
  start = time.time()
  if task == "export":
    exporter.export_hf(src, dst)
  else:
    importer.import_checkpoint(sources.open_source(task, src), dst)
  peak = rss_bytes("VmHWM")
  print(RESULT + json.dumps({"base": base, "peak": peak, "seconds": time.time() - start}))


def measure(task: str, src: str, dst: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  out = subprocess.run([sys.executable, __file__, "--child", task, src, dst], env=env,
                       capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{task} failed:\n{out.stderr[-3000:]}")
  return json.loads(next(l for l in out.stdout.splitlines() if l.startswith(RESULT))[len(RESULT):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layout", choices=["both", "meta", "hf"], default="both")
  parser.add_argument("--mp", type=int, default=2, help="Meta model-parallel shards")
  parser.add_argument("--dim", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(*args.child)

  sys.path.insert(0, ROOT)
  from lm import configs, convert
  cfg = model_config(args)
  model_bytes = configs.param_count(cfg) * 4
  largest = max(math.prod(convert.hf_shape(n, cfg)) for n in convert.hf_tensor_names(cfg)) * 4
  largest_stack = cfg.n_layers * cfg.dim * cfg.hidden_dim * 4
  mib = lambda b: f"{b / 2**20:,.0f} MiB"
  print(f"model: {configs.param_count(cfg):,} params, {mib(model_bytes)} fp32; largest tensor "
        f"{mib(largest)} (embedding); largest stacked param [L, D, F] {mib(largest_stack)}")
  with tempfile.TemporaryDirectory(dir=args.workdir) as work:
    layouts = ["meta", "hf"] if args.layout == "both" else [args.layout]
    rows = []
    for layout in layouts:
      src = os.path.join(work, f"{layout}-src")
      if layout == "hf":
        generate_hf(cfg, src)
      else:
        generate_meta(cfg, src, args.mp)
      ours, back = os.path.join(work, f"{layout}-ours"), os.path.join(work, f"{layout}-export")
      name = f"convert --from {layout}" + (f" (MP={args.mp})" if layout == "meta" else "")
      rows.append((name, measure(layout, src, ours)))
      rows.append((f"export --to hf (from {layout})", measure("export", ours, back)))
  print(f"\n| step | peak RSS | after imports | peak - imports | / model | / largest tensor | s |")
  print("|---|---|---|---|---|---|---|")
  for name, r in rows:
    extra = r["peak"] - r["base"]
    print(f"| {name} | {mib(r['peak'])} | {mib(r['base'])} | {mib(extra)} | "
          f"{extra / model_bytes:.2f} | {extra / largest:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
  main()
