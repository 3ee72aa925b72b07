"""Ours against Hugging Face transformers (PyTorch): train step, decoding, and rollout throughput.

  python benchmarks/compare.py [--quick] [--skip-train] [--steps=N] [--rounds=N] [--cores=N]
                               [--decode-runs=N] [--scan-layers] [--dtype=bfloat16]
                               [--attention=xla] [--glibc-defaults]

Each measurement runs in its own subprocess with the same environment and allocator (LD_PRELOAD
is passed through unchanged, and glibc's malloc gets the settings the `lm` command runs with on
CPU, lm/allocator.py, unless `--glibc-defaults`; the allocator in use is printed), fp32 unless
`--dtype` says:

  train    benchmarks/train_step.py's workload: bench-50M, batch 8 x 512, AdamW; tokens/s at the
           median of --steps steps after warm-up (that script's own measurement). Ours with
           `--attention` ("blocked", the CPU presets' choice, or the "xla" reference).
  decode   bench-50M with the same random-weight shape on both sides, batch 8, a 64-token prompt,
           128 new tokens, greedy: `lm.sampling.generate` against transformers' `generate` with
           its KV cache, both in `--dtype`. New tokens/s counts the whole call (prefill
           included); time to first token is a call for one new token (the prefill and the
           first pick).
  rollout  `lm.rollout.generate` on the tiny preset at GAtt's batch shape: 128 prompts of 90-110
           tokens, 48 new tokens, temperature 1.0 (top-p left at its default 0.9).
  matmul   the ceiling under the train step: the fp32 products of its shapes (4096 rows of 512
           against the 512 x 1536 MLP and 512 x 32000 output weights, forward and both
           gradients), XLA:CPU against torch (oneDNN), GFLOP/s each; with the train step it
           shows how much of a gap is the compiler's matmuls rather than our step.

Decode and rollout are warmed up (compiled) first, then timed over --rounds rounds; the best
round is reported. Each decoder runs in --decode-runs processes (default 2), alternating with the
other's, and its best process counts: one process's speed varied by up to 1.4x with the load
here, so a single draw each made the ratio swing. `--cores=N` pins every system to the same N
CPUs (torch then runs N threads); on a machine another job keeps busy, `--cores=1` spares
transformers the stalls of its parallel regions waiting for a descheduled thread (see the load
average printed first).
`--scan-layers` runs our train step, decode and rollout with the layers scanned (else unrolled:
`scan_layers=False` for training, `SamplingConfig.unroll_layers=None` on CPU for generation);
`--dtype=bfloat16` runs both decoders with bf16 weights and KV cache (ours: `rollout_dtype`), and
our rollout too; fp32 is the default everywhere. The last four lines are the ratios and the
rollout rate, one `name: X` each (nan when skipped or failed), with the matmul ceiling's ratio
before the decode one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train_step import (RESULT, allocator, hf, hf_model, ours, run_system, timed,
                        system_environment)

TRAIN = {"preset": "bench-50M", "batch": 8, "seq": 512}
DECODE = {"preset": "bench-50M", "batch": 8, "prompt": 64, "new_tokens": 128}
ROLLOUT = {"preset": "tiny", "batch": 128, "prompt": (90, 110), "new_tokens": 48}


def _single_device_mesh():
  import jax

  from lm import sharding

  return sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])


def decode_ours(rounds: int, opts) -> dict:
  import jax
  import numpy as np

  from lm import configs, roles, sampling

  batch, prompt, new = DECODE["batch"], DECODE["prompt"], DECODE["new_tokens"]
  cfg = configs.get_preset(DECODE["preset"], compute_dtype="float32")
  role = roles.in_dtype(roles.create("model", cfg, _single_device_mesh()), opts.dtype)
  graphdef, cfg, params = role.graphdef, role.model_cfg, role.params
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
  segment_ids = np.ones_like(tokens)
  key = jax.random.key(0)

  def run(steps):
    # eos_id -1: random weights would otherwise end some rows early, and HF runs all steps.
    sampling_cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=steps, eos_id=-1,
                                           unroll_layers=False if opts.scan_layers else None)
    out = sampling.generate(graphdef, cfg, params, tokens, segment_ids, key, sampling_cfg)
    return jax.block_until_ready(out)

  assert run(new).tokens.shape == (batch, new)
  return {"system": "ours (JAX)", "first_token": timed(lambda: run(1), rounds),
          "generate": timed(lambda: run(new), rounds)}


def decode_hf(rounds: int, opts) -> dict:
  import torch

  from lm import configs

  batch, prompt, new = DECODE["batch"], DECODE["prompt"], DECODE["new_tokens"]
  vocab = configs.get_preset(DECODE["preset"]).vocab_size
  torch.manual_seed(0)
  # The same dtype as ours: on an AVX-512 BF16 CPU transformers' bf16 generate ran ~1.9x its
  # fp32 one, so ours in bf16 against theirs in fp32 would flatter ours.
  dtype = getattr(torch, opts.dtype or "float32")
  model = hf_model(DECODE["preset"], prompt + new).eval().to(dtype)
  tokens = torch.randint(3, vocab, (batch, prompt))
  mask = torch.ones_like(tokens)

  def run(steps):
    # min_new_tokens keeps every row going to the end, as eos_id -1 does on our side.
    with torch.inference_mode():
      return model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=steps,
                            min_new_tokens=steps, do_sample=False, use_cache=True,
                            pad_token_id=0)

  assert run(8).shape == (batch, prompt + 8)
  # Nothing to compile: a short call warms up as well as a full one.
  return {"system": "transformers generate", "first_token": timed(lambda: run(1), rounds),
          "generate": timed(lambda: run(new), rounds, warm_up=lambda: run(8))}


def rollout_ours(rounds: int, opts) -> dict:
  import jax
  import numpy as np

  from lm import configs, roles, rollout, sampling

  cfg = configs.get_preset(ROLLOUT["preset"])
  policy = roles.in_dtype(roles.create("policy", cfg, _single_device_mesh(), plan="rollout"),
                          opts.dtype)
  rng = np.random.default_rng(0)
  lengths = rng.integers(ROLLOUT["prompt"][0], ROLLOUT["prompt"][1] + 1, ROLLOUT["batch"])
  prompts = [[1] + rng.integers(3, cfg.vocab_size, n - 1).tolist() for n in lengths]
  sampling_cfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=ROLLOUT["new_tokens"],
                                         eos_id=-1,
                                         unroll_layers=False if opts.scan_layers else None)
  generated = []

  def run():
    samples = rollout.generate(policy, prompts, sampling_cfg, jax.random.key(0),
                               batch_size=ROLLOUT["batch"])
    generated.append(int(samples.mask.sum()))

  return {"system": "lm.rollout.generate", "generate": timed(run, rounds),
          "new_tokens": generated[-1]}


# (rows, inner, outer) of the train step's products: the MLP's and the output projection's.
MATMULS = ((4096, 512, 1536), (4096, 512, 32000))


def _matmul_flops() -> float:
  # Forward, input gradient and weight gradient: three products of the same size each.
  return sum(3 * 2 * m * k * n for m, k, n in MATMULS)


def matmul_ours(rounds: int, opts) -> dict:
  del opts
  import jax
  import jax.numpy as jnp

  keys = iter(jax.random.split(jax.random.key(0), 3 * len(MATMULS)))
  operands = [(jax.random.normal(next(keys), (m, k)), jax.random.normal(next(keys), (k, n)),
               jax.random.normal(next(keys), (m, n))) for m, k, n in MATMULS]

  @jax.jit
  def products(operands):
    return [(x @ w, g @ w.T, x.T @ g) for x, w, g in operands]

  seconds = timed(lambda: jax.block_until_ready(products(operands)), rounds)
  return {"system": "XLA:CPU (jax)", "gflops_per_second": _matmul_flops() / seconds["best"] / 1e9}


def matmul_torch(rounds: int, opts) -> dict:
  del opts
  import torch

  torch.manual_seed(0)
  operands = [(torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)) for m, k, n in MATMULS]

  def products():
    with torch.inference_mode():
      return [(x @ w, g @ w.T, x.T @ g) for x, w, g in operands]

  seconds = timed(products, rounds)
  return {"system": "torch (oneDNN)", "gflops_per_second": _matmul_flops() / seconds["best"] / 1e9}


def run_one(system: str, steps: int, rounds: int, opts) -> dict:
  shape = (TRAIN["preset"], TRAIN["batch"], TRAIN["seq"], steps)
  if system == "train-ours":
    return ours(*shape, opts.attention, opts.scan_layers)
  if system in ("train-hf", "train-hf-compile"):
    return hf(*shape, system == "train-hf-compile")
  return {"decode-ours": decode_ours, "decode-hf": decode_hf, "rollout": rollout_ours,
          "matmul-ours": matmul_ours, "matmul-torch": matmul_torch}[system](rounds, opts)


def ratio(ours_result: dict | None, theirs: dict | None) -> float:
  """Tokens/s of ours over theirs; nan when either is missing (skipped or failed)."""
  if not ours_result or not theirs:
    return float("nan")
  return ours_result["tokens_per_second"] / theirs["tokens_per_second"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 train steps, 2 timed rounds")
  parser.add_argument("--skip-train", action="store_true")
  parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 10)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
  parser.add_argument("--cores", type=int, default=None, help="pin every system to N CPUs")
  parser.add_argument("--scan-layers", action="store_true",
                      help="our train step, decode and rollout with the layers scanned")
  parser.add_argument("--dtype", default="", choices=("", "bfloat16"),
                      help="both decoders' weights and KV cache, and our rollout's")
  parser.add_argument("--attention", default="blocked", choices=("xla", "blocked"),
                      help="our train step's attention (lm/attention.py)")
  parser.add_argument("--decode-runs", type=int, default=2,
                      help="processes per decoder, alternating; the best one counts")
  parser.add_argument("--glibc-defaults", action="store_true",
                      help="every system under glibc malloc's default settings")
  parser.add_argument("--system", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  steps = args.steps or (2 if args.quick else 10)
  rounds = args.rounds or (2 if args.quick else 5)
  if steps < 2 or rounds < 2 or args.decode_runs < 1:
    parser.error("--steps and --rounds must be at least 2, --decode-runs at least 1")
  if args.system:
    if args.cores:
      # Before jax or torch is imported (inside run_one), so both size their threads to it.
      os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    print(RESULT + json.dumps(run_one(args.system, steps, rounds, args)))
    return

  # Another busy process on these cores slows transformers' many small parallel regions far more
  # than XLA's few large ones, so the ratios are only comparable at a low load.
  cores = f"; every system pinned to {args.cores}" if args.cores else ""
  print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs{cores}")
  env = system_environment(not args.glibc_defaults)
  print(f"allocator: {allocator(env)}; train fp32, decode (both sides) and rollout "
        f"{args.dtype or 'fp32'}; "
        f"decode and rollout: best of {rounds} rounds after warm-up; train: median of "
        f"{steps} steps after warm-up"
        + ("; ours with the layers scanned" if args.scan_layers else ""))
  # The two decoders alternate, one process each time: a process's speed here varies by up to
  # 1.4x with the machine's load, so each side's best process is compared, not one draw each.
  systems = ["decode-ours", "decode-hf"] * args.decode_runs + ["rollout"]
  if not args.skip_train:
    systems = ["train-ours", "train-hf", "train-hf-compile", "matmul-ours",
               "matmul-torch"] + systems
  results, decode_runs = {}, {"decode-ours": [], "decode-hf": []}
  for system in systems:
    cmd = [sys.executable, os.path.abspath(__file__), f"--system={system}", f"--steps={steps}",
           f"--rounds={rounds}", f"--dtype={args.dtype}", f"--attention={args.attention}"]
    cmd += ["--scan-layers"] if args.scan_layers else []
    cmd += [f"--cores={args.cores}"] if args.cores else []
    results[system] = run_system(cmd, system, env)
    if system in decode_runs and results[system]:
      decode_runs[system].append(results[system])
  for system, runs in decode_runs.items():
    results[system] = min(runs, key=lambda r: r["generate"]["best"]) if runs else None

  for system in ("train-ours", "train-hf", "train-hf-compile"):
    if results.get(system):
      r = results[system]
      print(f"train  {r['system']:<30} {r['tokens_per_second']:>10,.0f} tokens/s (median step; "
            f"mean {r['mean_tokens_per_second']:,.0f}, {r['page_faults']:,} page faults)")
  for system in ("matmul-ours", "matmul-torch"):
    if results.get(system):
      r = results[system]
      print(f"matmul {r['system']:<30} {r['gflops_per_second']:>10,.0f} GFLOP/s (the train "
            "step's fp32 products)")
  decode = {}
  for system in ("decode-ours", "decode-hf"):
    if results.get(system):
      r = results[system]
      new_tokens = DECODE["batch"] * DECODE["new_tokens"]
      rate = new_tokens / r["generate"]["best"]
      decode[system] = {"tokens_per_second": rate}
      processes = ", ".join(f"{new_tokens / run['generate']['best']:,.0f}"
                            for run in decode_runs[system])
      print(f"decode {r['system']:<30} {rate:>10,.0f} new tokens/s  (median round "
            f"{r['generate']['median']:.3f} s; best round of each process: {processes})")
      print(f"prefill {r['system']}: time to first token {r['first_token']['best'] * 1e3:.1f} ms "
            f"(batch {DECODE['batch']} x {DECODE['prompt']} tokens)")
  rollout_rate = float("nan")
  if results.get("rollout"):
    r = results["rollout"]
    rollout_rate = r["new_tokens"] / r["generate"]["best"]
    print(f"rollout {r['system']}: {r['new_tokens']} new tokens in {r['generate']['best']:.3f} s "
          f"(median round {r['generate']['median']:.3f} s)")

  print(f"train_vs_torch_eager: {ratio(results.get('train-ours'), results.get('train-hf')):.2f}")
  print(f"train_vs_torch_compile: "
        f"{ratio(results.get('train-ours'), results.get('train-hf-compile')):.2f}")
  ceiling = float("nan")
  if results.get("matmul-ours") and results.get("matmul-torch"):
    ceiling = (results["matmul-ours"]["gflops_per_second"]
               / results["matmul-torch"]["gflops_per_second"])
  print(f"matmul_xla_vs_torch: {ceiling:.2f}")
  print(f"decode_vs_hf_generate: "
        f"{ratio(decode.get('decode-ours'), decode.get('decode-hf')):.2f}")
  print(f"rollout_tokens_per_s: {rollout_rate:.2f}")


if __name__ == "__main__":
  main()
