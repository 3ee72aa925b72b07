"""Train-step throughput, ours against Hugging Face transformers (PyTorch), side by side.

  python benchmarks/train_step.py [--preset=bench-50M] [--batch=8] [--seq=512] [--steps=10]
                                  [--attention=xla|blocked] [--scan-layers] [--glibc-defaults]

Each system runs in its own subprocess with the same environment and allocator (LD_PRELOAD is
passed through unchanged, and glibc's malloc gets the settings the `lm` command runs with on CPU,
lm/allocator.py, unless `--glibc-defaults`; the allocator in use is printed), on the same model
shape, batch and sequence length, fp32, AdamW. Ours runs its layers unrolled (`scan_layers=False`,
as the CPU presets do) unless `--scan-layers`.

Every system takes two warm-up steps, then `--steps` steps timed one by one (ours waits for each
step's result). Reported: tokens/s at the median step, the ratio to ours, and the page faults the
timed steps took. The median, not the mean: under glibc malloc our process's heap grows once more
after the warm-up, at a step that varies from run to run (the 3rd to the 9th here), and that one
step takes ~1M page faults and ~6 s of kernel time to map ~4 GB; a mean over a few steps then
measures when the heap grew rather than the step (README, "Speed on CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

RESULT = "RESULT "


def timed(fn, rounds: int, warm_up=None) -> dict:
  """One warm-up call (`warm_up`, default `fn`), then `rounds` timed calls of `fn` (each must
  return when its work is done): best, median and mean seconds, and the minor page faults the
  timed calls took."""
  (warm_up or fn)()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  seconds = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return {"best": min(seconds), "median": statistics.median(seconds),
          "mean": statistics.fmean(seconds),
          "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def time_steps(step, steps: int) -> dict:
  """`timed` for train steps: two warm-up steps (the first compiles), then `steps` timed ones."""
  return timed(step, steps, warm_up=lambda: (step(), step()))


def _throughput(name: str, timing: dict, tokens: int) -> dict:
  return {"system": name, "tokens_per_second": tokens / timing["median"],
          "mean_tokens_per_second": tokens / timing["mean"], "page_faults": timing["page_faults"]}


def ours_setup(preset: str, batch: int, seq: int, attention: str = "xla",
               scan_layers: bool = False):
  """Our side of the workload: (trainer, its initial state, one batch, the model config)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lm import configs, losses, model, optim, sharding, trainer

  cfg = configs.get_preset(preset, compute_dtype="float32", remat="none", max_seq_len=max(seq, 128),
                           attention=attention, scan_layers=scan_layers)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  graphdef, params = model.create(cfg, mesh)

  def loss_fn(p, frozen, b, rng):
    logits, _ = model.apply(graphdef, p, b["tokens"])
    return losses.next_token_loss(logits, b["targets"], jnp.ones_like(b["targets"]))

  opt = optim.OptimizerConfig(lr=1e-4, warmup_steps=0)
  tr = trainer.Trainer(loss_fn=loss_fn, optimizer=optim.make_optimizer(opt, 1000), schedule=None,
                       cfg=trainer.TrainConfig(steps=1000, batch_size=batch), mesh=mesh,
                       param_shardings=model.param_shardings(cfg, mesh))
  rng = np.random.default_rng(0)
  data = {"tokens": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32),
          "targets": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)}
  return tr, tr.init_state(params), data, cfg


def ours(preset: str, batch: int, seq: int, steps: int, attention: str = "xla",
         scan_layers: bool = False) -> dict:
  import jax

  from lm import configs, hardware

  tr, state, data, cfg = ours_setup(preset, batch, seq, attention, scan_layers)
  holder = [state]

  def step():
    holder[0], metrics = tr.step(holder[0], data)
    jax.block_until_ready(metrics)

  timing = time_steps(step, steps)
  flops = hardware.flops_per_token(configs.param_count(cfg), cfg.n_layers, seq, cfg.dim)
  layers = "scanned" if scan_layers else "unrolled"
  result = _throughput(f"ours (JAX, {attention} attention, {layers})", timing, batch * seq)
  return result | {"gflops_per_second": result["tokens_per_second"] * flops / 1e9}


def hf_model(preset: str, max_positions: int):
  """A randomly initialised transformers LlamaForCausalLM of our preset's shape (fp32, SDPA)."""
  import transformers

  from lm import configs

  cfg = configs.get_preset(preset)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      max_position_embeddings=max_positions, tie_word_embeddings=False,
      attn_implementation="sdpa"))


def hf(preset: str, batch: int, seq: int, steps: int, compile_model: bool) -> dict:
  import torch

  from lm import configs

  cfg = configs.get_preset(preset)
  torch.manual_seed(0)
  model = hf_model(preset, seq)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5,
                          weight_decay=0.1)
  forward = torch.compile(model) if compile_model else model
  tokens = torch.randint(0, cfg.vocab_size, (batch, seq))

  def step():
    loss = forward(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  name = "transformers + torch.compile" if compile_model else "transformers (eager)"
  return _throughput(name, time_steps(step, steps), batch * seq)


def system_environment(lm_settings: bool = True) -> dict:
  """The environment every system's subprocess runs in: this one, plus the glibc malloc settings
  the `lm` command starts itself with on CPU (lm/allocator.py) unless `lm_settings` is False or
  they do not apply here; the same for every system, ours and transformers alike."""
  from lm import allocator as lm_allocator

  tuned = lm_allocator.tuned_environment(os.environ) if lm_settings else None
  return dict(os.environ) if tuned is None else tuned


def allocator(env: dict) -> str:
  """The allocator every system runs under in `env` (system_environment): LD_PRELOAD and
  GLIBC_TUNABLES."""
  described = [f"LD_PRELOAD={env['LD_PRELOAD']}"] if env.get("LD_PRELOAD") else []
  described += [f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}"] if env.get("GLIBC_TUNABLES") else []
  return "; ".join(described) or "system malloc, default settings"


def run_system(cmd: list[str], name: str, env: dict) -> dict | None:
  """Runs one system's subprocess in `env` (system_environment: the same for every system) and
  returns its RESULT line, or None after printing the tail of its stderr."""
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  line = [l for l in out.stdout.splitlines() if l.startswith(RESULT)]
  if not line:
    print(f"{name}: failed\n{out.stderr[-1500:]}")
    return None
  return json.loads(line[0][len(RESULT):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="bench-50M")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--system", choices=["ours", "hf", "hf-compile"], default=None)
  parser.add_argument("--skip-compile", action="store_true", help="skip torch.compile (slow)")
  parser.add_argument("--attention", default="xla", help="our attention (lm/attention.py)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="ours with the layers scanned (scan_layers=True), not unrolled")
  parser.add_argument("--glibc-defaults", action="store_true",
                      help="every system under glibc malloc's default settings")
  args = parser.parse_args()
  if args.system:
    shape = (args.preset, args.batch, args.seq, args.steps)
    if args.system == "ours":
      result = ours(*shape, args.attention, args.scan_layers)
    else:
      result = hf(*shape, args.system == "hf-compile")
    print(RESULT + json.dumps(result))
    return
  env = system_environment(not args.glibc_defaults)
  print(f"{args.preset}, batch {args.batch} x {args.seq} tokens, fp32, AdamW; allocator: "
        f"{allocator(env)}; {os.cpu_count()} CPUs")
  systems = ["ours", "hf"] + ([] if args.skip_compile else ["hf-compile"])
  results = []
  for system in systems:
    cmd = [sys.executable, __file__, f"--system={system}", f"--preset={args.preset}",
           f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}",
           f"--attention={args.attention}"] + (["--scan-layers"] if args.scan_layers else [])
    result = run_system(cmd, system, env)
    if result:
      results.append(result)
  base = next((r["tokens_per_second"] for r in results if r["system"].startswith("ours")), None)
  for r in results:
    ratio = f"{r['tokens_per_second'] / base:.2f}x ours" if base else ""
    extra = f"  ({r['gflops_per_second']:.0f} GFLOP/s)" if "gflops_per_second" in r else ""
    print(f"{r['system']:<32} {r['tokens_per_second']:>10,.0f} tokens/s  {ratio}{extra}  "
          f"[mean {r['mean_tokens_per_second']:,.0f}; {r['page_faults']:,} page faults]")


if __name__ == "__main__":
  main()
