"""Where a decode step's time goes, op by op, from XLA:CPU's own trace.

  python benchmarks/profile_decode.py [--dtype=bfloat16] [--batch=8] [--prompt=64]
                                      [--new-tokens=128] [--top=25] [--trace-dir=DIR]

`compare.py`'s decode workload, ours only (bench-50M, random weights, greedy, a generation copy
in `--dtype` made by `roles.in_dtype`, as `compare.py --dtype` makes it): compiles `generate`'s
program once, times a few calls, then traces one with `--xla_cpu_enable_xprof_traceme=true`
(profile_step.py's tables, per decode step: the prefill's ops are counted in, spread over the
steps). Then the median traced step's time by kind of op and, for products, by output shape
(each layer's q, o and w2 give [B, D], w1 and w3 [B, F], k and v [B, K*H], the output projection
[B, V]). Op times overlap where XLA:CPU runs two ops at once.
"""

from __future__ import annotations

import argparse
import collections
import time

from profile_step import enable_op_trace, hlo_ops, report, traced


def step_breakdown(events, ops: dict, output_shape: str):
  """(median step's ms, {kind or product shape: op ms}) over the steps delimited by the ends of
  the output projection (the op of `output_shape`), the first and last fifth left out; None
  for fewer than 5 such steps."""
  ends = sorted(end for _, end, name in events
                if ops[name]["shape"] == output_shape and "product" in ops[name]["kind"])
  steps = []
  for first, last in zip(ends[len(ends) // 5:], ends[len(ends) // 5 + 1:len(ends) * 4 // 5]):
    by_kind = collections.defaultdict(float)
    for start, end, name in events:
      if first <= start < last:
        op = ops[name]
        by_kind[f"{op['kind']} {op['shape']}" if "product" in op["kind"] else op["kind"]] += (
            (end - start) / 1e3)
    steps.append(((last - first) / 1e3, by_kind))
  if len(steps) < 5:
    return None
  steps.sort(key=lambda step: step[0])
  return steps[len(steps) // 2]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="bfloat16", help='the generation copy\'s, or "" (fp32)')
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--top", type=int, default=25, help="ops listed")
  parser.add_argument("--trace-dir", default=None, help="keep the trace here")
  args = parser.parse_args()
  enable_op_trace()
  import jax
  import numpy as np

  from lm import configs, roles, sampling, sharding

  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  cfg = configs.get_preset("bench-50M", compute_dtype="float32")
  role = roles.in_dtype(roles.create("model", cfg, mesh), args.dtype)
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt))
  tokens = jax.numpy.asarray(tokens, jax.numpy.int32)
  # eos_id -1: every row runs all steps, as in compare.py.
  sampling_cfg = sampling.resolve_unroll(
      sampling.SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens, eos_id=-1),
      role.model_cfg, role.params)
  inputs = (role.params, tokens, jax.numpy.ones_like(tokens), jax.random.key(0))
  compiled = sampling.generate_program.lower(role.graphdef, role.model_cfg, sampling_cfg,
                                             *inputs).compile()
  times = []
  for _ in range(4):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
  new = args.batch * args.new_tokens
  print(f"weights {role.model_cfg.compute_dtype}, layout {role.model_cfg.weight_layout}; calls "
        f"after the first: {', '.join(f'{t:.3f}' for t in times[1:])} s "
        f"({new / min(times[1:]):,.0f} new tokens/s at the best)")
  ops = hlo_ops(compiled.as_text())
  events, seconds = traced(lambda: jax.block_until_ready(compiled(*inputs)), 1, ops,
                           args.trace_dir)
  report(events, ops, args.new_tokens, seconds / args.new_tokens, args.top)
  median = step_breakdown(events, ops, f"f32[{args.batch},{cfg.vocab_size}]")
  if median is None:
    print("\ntoo few decode steps for the median step's breakdown (--new-tokens of 16 or more)")
    return
  step_ms, by_kind = median
  print(f"\nthe median decode step: {step_ms:.2f} ms; op ms by kind (products by output shape)")
  for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
    print(f"{ms:8.3f}  {kind}")


if __name__ == "__main__":
  main()
