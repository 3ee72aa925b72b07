"""Where our train step's time goes, op by op, from XLA:CPU's own trace.

  python benchmarks/profile_step.py [--preset=bench-50M] [--batch=8] [--seq=512] [--steps=2]
                                    [--attention=blocked] [--scan-layers] [--top=25]
                                    [--trace-dir=DIR]

Runs `train_step.py`'s workload (our side only), warms it up until a step takes no page fault
(at most 10 steps: the heap grows once after the first steps, README "Speed on CPU"), then
traces `--steps` steps with XLA:CPU's per-op trace events (`--xla_cpu_enable_xprof_traceme=true`,
added to XLA_FLAGS before jax starts) under `jax.profiler.trace`. Printed, per step:

  - the `--top` ops by time: the op's name in the compiled program, its kind (a YNNPACK product,
    a product on Eigen, another fusion or op), its output shape and, for products, GFLOP and
    GFLOP/s (from the compiled program's HLO);
  - the time by kind, and the products' FLOPs;
  - how long 0, 1 and 2 or more ops ran at once. XLA:CPU runs independent ops side by side, so op
    times add up to more than the step, and an op sharing the cores with another shows a lower
    rate than it reaches alone. An Eigen product returns before its work is done (its threads
    finish it), so most of its time shows as time with no op running.

The trace stays in `--trace-dir` (default: a temporary directory, removed) for Perfetto or
TensorBoard's profile plugin.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import resource
import tempfile
import time

from train_step import ours_setup

_NAME_SHAPE = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_PARAM_SHAPE = re.compile(r"([\w.\-]+): (\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*?lhs_contracting_dims=\{([\d,]*)\}")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def hlo_ops(hlo: str) -> dict[str, dict]:
  """The ops of an optimized HLO module's text (every computation's, fused bodies included):
  name -> {"kind", "shape", "flops"}, where flops counts the multiply-adds (x2) of every product
  inside the op."""
  shapes = {name: _dims(dims) for name, _, dims in _NAME_SHAPE.findall(hlo)}
  shapes |= {name: _dims(dims) for name, _, dims in _PARAM_SHAPE.findall(hlo)}
  bodies = {}  # called computation -> its text
  for match in re.finditer(r"\n%([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S):
    bodies[match.group(1)] = match.group(2)

  def flops(text: str) -> int:
    total = 0
    for out, lhs, contracting in _DOT.findall(text):
      lhs_shape = shapes.get(lhs)
      if lhs_shape is not None:
        total += 2 * math.prod(_dims(out)) * math.prod(lhs_shape[d] for d in _dims(contracting))
    return total

  ops = {}
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    called = re.search(r"calls=%([\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else ""
    if '"__ynn_fusion"' in rest:
      kind = "YNNPACK product" if " dot(" in body else "YNNPACK fusion"
    elif opcode == "dot":
      kind = "product on Eigen"
    else:
      kind = "fusion" if opcode == "fusion" else opcode
    ops[name] = {"kind": kind, "shape": shape.split("{")[0],
                 "flops": flops(body) if called else flops(line)}
  return ops


def trace_events(trace_dir: str, ops: dict) -> list[tuple[float, float, str]]:
  """(start, end, op name) in microseconds of every traced run of an op in `ops`."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"no perfetto trace under {trace_dir}: was the profiler able to write it?")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  return [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
          if e.get("ph") == "X" and e.get("name") in ops]


def enable_op_trace() -> None:
  """Asks XLA:CPU for its per-op trace events; call before jax is imported."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_enable_xprof_traceme=true").strip()


def traced(run, calls: int, ops: dict, trace_dir: str | None):
  """(trace_events of `calls` calls of `run` over `ops`, seconds a call), traced into
  `trace_dir` (kept) or a temporary directory."""
  import jax

  with tempfile.TemporaryDirectory() as scratch:
    directory = trace_dir or scratch
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(calls):
      run()
    seconds = (time.perf_counter() - start) / calls
    jax.profiler.stop_trace()
    return trace_events(directory, ops), seconds


def concurrency(events: list[tuple[float, float, str]]) -> dict[str, float]:
  """Microseconds with 0, 1 and 2+ ops running, between the first op's start and the last's end."""
  edges = sorted([(start, 1) for start, _, _ in events] + [(end, -1) for _, end, _ in events])
  spans = {"0": 0.0, "1": 0.0, "2+": 0.0}
  running, last = 0, edges[0][0]
  for time_us, change in edges:
    spans["0" if running == 0 else "1" if running == 1 else "2+"] += time_us - last
    running, last = running + change, time_us
  return spans


def report(events, ops: dict, steps: int, step_seconds: float, top: int):
  """Prints the per-step tables of the module docstring from `events` (trace_events) of `steps`
  traced steps over `ops` (hlo_ops)."""
  per_op = collections.defaultdict(float)
  for start, end, name in events:
    per_op[name] += (end - start) / 1e3 / steps
  print(f"{step_seconds:.3f} s a step, {steps} steps traced; ms below are per step\n")
  print(f"{'ms':>8}  {'op':<34} {'kind':<18} {'output':<26} {'GFLOP':>7} {'GFLOP/s':>8}")
  for name, ms in sorted(per_op.items(), key=lambda item: -item[1])[:top]:
    op = ops[name]
    gflop = op["flops"] / 1e9
    rate = f"{gflop / ms * 1e3:8.0f}" if gflop and ms else ""
    print(f"{ms:8.1f}  {name:<34} {op['kind']:<18} {op['shape']:<26} "
          f"{f'{gflop:.2f}' if gflop else '':>7} {rate}")
  by_kind = collections.defaultdict(lambda: [0.0, 0, 0.0])
  for name, ms in per_op.items():
    entry = by_kind[ops[name]["kind"]]
    entry[0] += ms
    entry[1] += 1
    entry[2] += ops[name]["flops"] / 1e9
  print(f"\n{'ms':>8}  {'kind':<18} {'ops':>5} {'GFLOP':>8}")
  for kind, (ms, count, gflop) in sorted(by_kind.items(), key=lambda item: -item[1][0]):
    print(f"{ms:8.1f}  {kind:<18} {count:>5} {gflop:>8.1f}")
  spans = concurrency(events)
  print("\nms a step with 0 / 1 / 2+ ops running: "
        + " / ".join(f"{spans[k] / 1e3 / steps:.0f}" for k in ("0", "1", "2+")))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="bench-50M")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=2, help="steps traced")
  parser.add_argument("--attention", default="blocked", help="our attention (lm/attention.py)")
  parser.add_argument("--scan-layers", action="store_true")
  parser.add_argument("--top", type=int, default=25, help="ops listed")
  parser.add_argument("--trace-dir", default=None, help="keep the trace here")
  args = parser.parse_args()
  enable_op_trace()
  import jax

  tr, state, data, _ = ours_setup(args.preset, args.batch, args.seq, args.attention,
                                  args.scan_layers)
  batch = tr.put_batch(data)
  # Compiled once here and run directly: the program traced is the one whose HLO is read.
  compiled = tr.jit_step(jax.tree.map(lambda x: x.sharding, state), batch).lower(
      state, batch, None).compile()
  holder = [state]

  def step():
    with jax.set_mesh(tr.mesh):
      holder[0], metrics = compiled(holder[0], batch, None)
    jax.block_until_ready(metrics)

  for _ in range(10):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    if resource.getrusage(resource.RUSAGE_SELF).ru_minflt == faults:
      break
  ops = hlo_ops(compiled.as_text())
  events, step_seconds = traced(step, args.steps, ops, args.trace_dir)
  report(events, ops, args.steps, step_seconds, args.top)


if __name__ == "__main__":
  main()
