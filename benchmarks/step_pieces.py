"""The train step piece by piece, ours against transformers: where a whole-step gap comes from.

  python benchmarks/step_pieces.py [--pairs=3] [--calls=5] [--pieces=mlp,layer,...]
                                   [--attention=blocked] [--glibc-defaults]

bench-50M's shapes at the train step's batch (8 x 512, fp32). Each piece is the real module on
both sides, forward and backward (gradients for its weights and its input):

  mlp        `model.FeedForward` / transformers' `LlamaMLP`
  attention  `model.Attention` (projections, RoPE, our `--attention`) / `LlamaAttention` (SDPA)
  layer      `model.Block` / `LlamaDecoderLayer`
  head       the output projection (512 x 32000) and `losses.next_token_loss` / `lm_head` and
             `cross_entropy`
  optimizer  `optim.make_optimizer` (global-norm clipping, AdamW) / `clip_grad_norm_` and
             `torch.optim.AdamW`, over bench-50M's parameter count

Every system runs in its own process (ours, transformers eager, transformers + torch.compile),
under the same allocator as `train_step.py`; the three alternate `--pairs` times, and each
process reports the best of `--calls` timed calls per piece after two warm-up calls. Printed:
milliseconds per process and the ratio of medians (theirs over ours, so above 1 means ours is
faster). One process's speed here moved by up to 1.3x within minutes, hence the alternation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from train_step import RESULT, allocator, hf_model, run_system, system_environment, timed

PRESET, BATCH, SEQ = "bench-50M", 8, 512
PIECES = ("mlp", "attention", "layer", "head", "optimizer")


def _best_ms(fn, calls: int) -> float:
  """Two warm-up calls of `fn`, then the best of `calls` timed ones, in milliseconds."""
  return timed(fn, calls, warm_up=lambda: (fn(), fn()))["best"] * 1e3


def ours(pieces: list[str], calls: int, attention: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from lm import configs, losses, model, optim, projection, sharding

  cfg = configs.get_preset(PRESET, compute_dtype="float32", remat="none", max_seq_len=SEQ,
                           attention=attention, scan_layers=False)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((BATCH, SEQ, cfg.dim)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32))
  segment_ids = jnp.ones((BATCH, SEQ), jnp.int32)
  sin, cos = model.rope_tables(jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ)), cfg.head_dim,
                               cfg.rope_theta)
  modules = {"mlp": (model.FeedForward, lambda m, x: m(x)),
             "attention": (model.Attention, lambda m, x: m(x, sin, cos, segment_ids)[0]),
             "layer": (model.Block, lambda m, x: m(x, sin, cos, segment_ids)[0])}
  results = {}
  for piece in pieces:
    if piece in modules:
      cls, call = modules[piece]
      graphdef, params = nnx.split(cls(cfg, sharding.DEFAULT_RULES, rngs=nnx.Rngs(0)))

      def objective(params, x, graphdef=graphdef, call=call):
        return jnp.sum(call(nnx.merge(graphdef, params), x) ** 2)

      grad = jax.jit(jax.grad(objective, argnums=(0, 1)))
      args = (params, x)
    elif piece == "head":
      weight = jnp.asarray(rng.standard_normal((cfg.dim, cfg.vocab_size)).astype(np.float32)
                           * cfg.init_std)

      def head_loss(weight, x):
        logits = projection.project(x, weight, out_dtype=jnp.float32)
        return losses.next_token_loss(logits, targets, jnp.ones_like(targets))[0]

      grad = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
      args = (weight, x)
    else:
      params = {"all": jnp.zeros(configs.param_count(cfg), jnp.float32)}
      optimizer = optim.make_optimizer(optim.OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
      opt_state = optimizer.init(params)
      grads = {"all": jnp.full_like(params["all"], 1e-3)}

      @jax.jit
      def grad(params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      args = (params, opt_state)
    results[piece] = _best_ms(lambda: jax.block_until_ready(grad(*args)), calls)
  return {"system": "ours", "ms": results}


def hf(pieces: list[str], calls: int, compile_model: bool) -> dict:
  import torch
  import torch.nn.functional as F

  from lm import configs

  cfg = configs.get_preset(PRESET)
  torch.manual_seed(0)
  llama = hf_model(PRESET, SEQ)
  x = torch.randn(BATCH, SEQ, cfg.dim, requires_grad=True)
  targets = torch.randint(0, cfg.vocab_size, (BATCH * SEQ,))
  positions = torch.arange(SEQ)[None].expand(BATCH, SEQ)
  rope = llama.model.rotary_emb(x, positions)
  layer = llama.model.layers[0]
  forwards = {"mlp": lambda x: layer.mlp(x),
              "attention": lambda x: layer.self_attn(x, position_embeddings=rope)[0],
              "layer": lambda x: layer(x, position_embeddings=rope),
              "head": lambda x: F.cross_entropy(llama.lm_head(x).view(-1, cfg.vocab_size),
                                                targets)}
  results = {}
  for piece in pieces:
    if piece == "optimizer":
      params = [torch.zeros(configs.param_count(cfg), requires_grad=True)]
      optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5,
                                    weight_decay=0.1)
      grads = torch.full_like(params[0], 1e-3)

      def step():
        params[0].grad = grads
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    else:
      forward = torch.compile(forwards[piece]) if compile_model else forwards[piece]
      objective = (forward if piece == "head" else
                   lambda x, forward=forward: (forward(x) ** 2).sum())

      def step(objective=objective):
        objective(x).backward()
        llama.zero_grad(set_to_none=True)
        x.grad = None
    results[piece] = _best_ms(step, calls)
  return {"system": "torch.compile" if compile_model else "eager", "ms": results}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=3, help="rounds of the three processes")
  parser.add_argument("--calls", type=int, default=5, help="timed calls per piece per process")
  parser.add_argument("--pieces", default=",".join(PIECES))
  parser.add_argument("--attention", default="blocked", choices=("xla", "blocked"))
  parser.add_argument("--glibc-defaults", action="store_true",
                      help="every system under glibc malloc's default settings")
  parser.add_argument("--system", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  pieces = args.pieces.split(",")
  unknown = sorted(set(pieces) - set(PIECES))
  if unknown or args.pairs < 1 or args.calls < 1:
    parser.error(f"--pieces from {','.join(PIECES)} (got {','.join(unknown) or 'none'}); "
                 "--pairs and --calls at least 1")
  if args.system:
    if args.system == "ours":
      result = ours(pieces, args.calls, args.attention)
    else:
      result = hf(pieces, args.calls, args.system == "compile")
    print(RESULT + json.dumps(result))
    return

  env = system_environment(not args.glibc_defaults)
  print(f"{PRESET} pieces at batch {BATCH} x {SEQ}, fp32, forward and backward; allocator: "
        f"{allocator(env)}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
  runs = {"ours": [], "eager": [], "compile": []}
  for _ in range(args.pairs):
    for system, found in runs.items():
      cmd = [sys.executable, os.path.abspath(__file__), f"--system={system}",
             f"--calls={args.calls}", f"--pieces={args.pieces}", f"--attention={args.attention}"]
      result = run_system(cmd, system, env)
      if result:
        found.append(result["ms"])
  print(f"{'piece':<10} {'ours, ms':<24} {'eager, ms':<24} {'compile, ms':<24} "
        "eager/ours compile/ours")
  for piece in pieces:
    cells, medians = [], {}
    for system, found in runs.items():
      values = [run[piece] for run in found]
      medians[system] = statistics.median(values) if values else float("nan")
      cells.append(", ".join(f"{v:,.0f}" for v in values) or "failed")
    ratios = [medians[s] / medians["ours"] for s in ("eager", "compile")]
    print(f"{piece:<10} {cells[0]:<24} {cells[1]:<24} {cells[2]:<24} "
          f"{ratios[0]:10.2f} {ratios[1]:12.2f}")


if __name__ == "__main__":
  main()
