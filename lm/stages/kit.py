"""The kit every language-model stage is built from (it is not a stage): where a stage's model
and tokenizer come from, its loss, trainer and evaluation, the training run, and the train-step
program `lm aot` compiles.

Pretraining, SFT, GAtt and the other self-distillation stages all train with the same next-token
step on packed rows; they differ in their data and loss mask. Their configs share `DataConfig`,
and two sharding plans (lm/sharding.py PLANS): `plan` for training, `rollout_plan` for every
generation their evaluations and data making do.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lm import (checkpoints, configs, hardware, losses, model, optim, roles, rollout, sampling,
                sharding, trainer)
from lm.stages import common
from lm.tokenizer import EncodedDialog, Tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where a stage's rows come from. `source`: an earlier stage that wrote data, a path, or
  "tfds:NAME[@SPLIT]" under `data_dir`; `eval_source`: the held-out rows (default: the source's
  own eval split). `skip_bad_rows` drops bad rows, counted by kind, instead of failing."""

  source: str = ""
  eval_source: str = ""
  seq_len: int = 256
  eval_batches: int = 4
  skip_bad_rows: bool = False
  data_dir: str = ""
  text_field: str = "text"


def resolve_tokenizer(reference: str, ctx: common.StageContext) -> str | None:
  """An earlier stage's tokenizer.model, a path, or None for no tokenizer."""
  if not reference:
    return None
  if reference in ctx.outputs:
    return os.path.join(ctx.outputs[reference], checkpoints.TOKENIZER_FILE)
  if not os.path.exists(reference):
    raise ValueError(f"stage {ctx.name!r}: tokenizer {reference!r} is neither an earlier stage "
                     f"nor a file")
  return reference


def resolve_start(init_from: str, ctx: common.StageContext) -> tuple[configs.ModelConfig, str]:
  """(ModelConfig, directory) of the model a stage starts from. Its head does not matter: a
  role loads any checkpoint with the head it needs (lm/roles.py swaps it)."""
  source = ctx.output_of(init_from)
  model_cfg, _ = checkpoints.read_model_info(source)
  return model_cfg, source


def chat_start(cfg, ctx: common.StageContext, starts_from: str
               ) -> tuple[configs.ModelConfig, str, str]:
  """(ModelConfig, init directory, tokenizer path) of a stage that fine-tunes a chat model."""
  where = f"stages.{ctx.name}"
  if not cfg.init_from:
    raise ValueError(f"{where}.init_from is empty: this stage starts from {starts_from}")
  model_cfg, init_dir = resolve_start(cfg.init_from, ctx)
  tokenizer_path = resolve_tokenizer(cfg.tokenizer, ctx)
  if tokenizer_path is None:
    raise ValueError(f"{where}.tokenizer is empty: this stage needs the chat format's tokenizer")
  return model_cfg, init_dir, tokenizer_path


def encode_last_turn(tokenizer: Tokenizer):
  """encode_dialog with the loss on the last assistant turn only (GAtt's step 6; an RLHF
  prompt's earlier turns are context, not targets)."""

  def encode(messages) -> EncodedDialog:
    encoded = tokenizer.encode_dialog(messages)
    last = encoded.turn == encoded.turn.max()
    return EncodedDialog(encoded.tokens, encoded.loss_mask * last, encoded.turn)

  return encode


def loss_fn(graphdef, z_loss: float = 0.0) -> trainer.LossFn:
  """Batch {tokens, targets, loss_mask, segment_ids, positions} [B, T] -> masked next-token CE."""

  def next_token(params, frozen, batch, rng):
    del frozen, rng  # nothing frozen; Llama 2 has no dropout
    logits, _ = model.apply(graphdef, params, batch["tokens"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"])
    return losses.next_token_loss(logits, batch["targets"], batch["loss_mask"], z_loss)

  return next_token


def build_trainer(cfg, model_cfg: configs.ModelConfig, mesh, where: str, *, head: str = "lm",
                  loss: trainer.LossFn | None = None) -> trainer.Trainer:
  """The stage's Trainer: its train/optimizer sections, its training plan; the next-token loss
  unless `loss` is given (a scalar-head stage gives its own)."""
  rules = sharding.plan_rules(cfg.plan)
  if loss is None:
    graphdef, _ = model.abstract_model(model_cfg, head, rules)
    loss = loss_fn(graphdef, cfg.z_loss)
  try:
    steps = cfg.train.steps
    return trainer.Trainer(
        loss_fn=loss, optimizer=optim.make_optimizer(cfg.optimizer, steps),
        schedule=optim.learning_rate(cfg.optimizer, steps), cfg=cfg.train, mesh=mesh,
        param_shardings=model.param_shardings(model_cfg, mesh, rules, head), rules=rules)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def rollout_role(role: roles.Role, plan: str, dtype: str = "") -> roles.Role:
  """`role` laid out for generation: a copy on `plan` computing in `dtype` ("" keeps the
  model's), or the role itself when it already is. A stage's `rollout_dtype` "bfloat16" halves
  the bytes each decode step reads (every weight, every step); its training state is untouched."""
  return roles.in_dtype(roles.move(role, role.mesh, plan), dtype)


def make_evaluate(role: roles.Role, batches: list[dict],
                  extra: Callable[[roles.Role], dict] | None = None):
  """params -> {loss, perplexity, accuracy, eval_tokens} over fixed eval batches, plus
  `extra(role with those params)` (generation-based evals)."""
  step = jax.jit(lambda params, batch: loss_fn(role.graphdef)(params, None, batch, None)[1])

  def evaluate(params):
    totals, weight = {}, 0.0
    with jax.set_mesh(role.mesh):
      for batch in batches:
        metrics = jax.device_get(step(params, batch))
        w = float(metrics["weight"])
        weight += w
        for key in ("loss", "accuracy"):
          totals[key] = totals.get(key, 0.0) + float(metrics[key]) * w
    result = {k: v / max(weight, 1.0) for k, v in totals.items()}
    result["perplexity"] = math.exp(min(result.get("loss", 0.0), 50.0))
    result["eval_tokens"] = weight
    if extra is not None:
      result.update(extra(role.with_params(params)))
    return result

  return evaluate


def train(tr: trainer.Trainer, ctx: common.StageContext, model_cfg: configs.ModelConfig, *,
          params, data, evaluate, seq_len: int, log=print) -> dict:
  """The training run of an LM stage, with its tokens/s and MFU figures."""
  return trainer.run(
      tr, params=params, data=data, workdir=ctx.directory, evaluate=evaluate,
      tokens_per_step=tr.cfg.batch_size * seq_len, log=log,
      flops_per_token=hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers,
                                               seq_len, model_cfg.dim))


def dropped(bad) -> dict:
  """Rows skipped under skip_bad_rows, by kind, as metrics (nothing dropped goes unreported)."""
  return {f"dropped_{k.replace(' ', '_')}": v for k, v in getattr(bad, "dropped", {}).items()}


def train_step_program(cfg, model_cfg: configs.ModelConfig, mesh) -> tuple[Any, tuple, float]:
  """(jitted step, abstract (state, batch), model FLOPs per step) of an LM stage's train step on
  `mesh`, for `lm aot`; nothing is allocated."""
  tr = build_trainer(cfg, model_cfg, mesh, "aot")
  state = tr.abstract_state(model.abstract_params(model_cfg, mesh, tr.rules))
  shape = (tr.cfg.batch_size, cfg.data.seq_len)
  batch = {name: jax.ShapeDtypeStruct(shape, jnp.float32 if name == "loss_mask" else jnp.int32,
                                      sharding=tr.batch_sharding(2))
           for name in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
  step = tr.jit_step(jax.tree.map(lambda a: a.sharding, state), batch)
  flops = hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers,
                                   cfg.data.seq_len, model_cfg.dim) * shape[0] * shape[1]
  return step, (state, batch, None), flops


def sampling_program(model_cfg: configs.ModelConfig, mesh, plan: str,
                     sampling_cfg: sampling.SamplingConfig, batch_size: int, prompt_tokens: int):
  """(jitted generate, abstract args, model FLOPs per call) of one rollout call of `batch_size`
  prompts of `prompt_tokens` (padded to the rollout's length bucket), then
  `max_new_tokens` decode steps over a KV cache of that many slots, on `plan`; nothing is
  allocated."""
  rules = sharding.plan_rules(plan)
  graphdef, _ = model.abstract_model(model_cfg, "lm", rules)
  params = model.abstract_params(model_cfg, mesh, rules)
  shape = (batch_size, rollout.padded_length(prompt_tokens))
  prompts = jax.ShapeDtypeStruct(shape, jnp.int32,
                                 sharding=sharding.data_sharding(mesh, 2, rules, shape))
  key = jax.eval_shape(jax.random.key, 0)
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  args = (graphdef, model_cfg, sampling_cfg, params, prompts, prompts, rng)
  # Forward only: a third of the training FLOPs per token, over prompt and new tokens.
  length = shape[1] + sampling_cfg.max_new_tokens
  flops = hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers, length,
                                   model_cfg.dim) / 3 * shape[0] * length
  return sampling.generate_program, args, flops
