"""Pretraining: next-token prediction on packed text (LLAMA2.md §3).

Config (experiments/pretrain.py builds it):
  model        every ModelConfig field (ignored when init_from names a model directory)
  init_from    "" for a fresh model, or an earlier stage / model directory to continue from
  tokenizer    an earlier stage that wrote tokenizer.model, or a path to a SentencePiece model
  data         source, seq_len, eval_batches (see `pretrain_data`)
  train        TrainConfig fields; optimizer: OptimizerConfig fields; z_loss
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoints, configs, hardware, losses, model, optim, sharding, trainer
from lm.stages import common, data_sources


def resolve_model(cfg, ctx: common.StageContext) -> tuple[configs.ModelConfig, str | None]:
  """(ModelConfig, directory to load params from or None for a fresh init)."""
  if cfg.get("init_from"):
    source = ctx.output_of(cfg.init_from)
    model_cfg, head = checkpoints.read_model_info(source)
    if head != "lm":
      raise ValueError(f"stage {ctx.name!r}: init_from {source} holds a {head!r} model")
    return model_cfg, source
  return common.model_config(cfg.model, f"stages.{ctx.name}.model"), None


def resolve_tokenizer(cfg, ctx: common.StageContext) -> str | None:
  reference = cfg.get("tokenizer")
  if not reference:
    return None
  if reference in ctx.outputs:
    return os.path.join(ctx.outputs[reference], checkpoints.TOKENIZER_FILE)
  if not os.path.exists(reference):
    raise ValueError(f"stage {ctx.name!r}: tokenizer {reference!r} is neither an earlier stage "
                     f"nor a file")
  return reference


def resolve_chat_start(cfg, ctx: common.StageContext, starts_from: str):
  """(ModelConfig, init directory, tokenizer path) of a stage that fine-tunes a chat model."""
  where = f"stages.{ctx.name}"
  model_cfg, init_dir = resolve_model(cfg, ctx)
  if init_dir is None:
    raise ValueError(f"{where}.init_from is empty: this stage starts from {starts_from}")
  tokenizer_path = resolve_tokenizer(cfg, ctx)
  if tokenizer_path is None:
    raise ValueError(f"{where}.tokenizer is empty: this stage needs the chat format's tokenizer")
  return model_cfg, init_dir, tokenizer_path


def make_loss_fn(graphdef, z_loss: float = 0.0) -> trainer.LossFn:
  """Batch {tokens, targets, loss_mask, segment_ids, positions} [B, T] -> masked next-token CE."""

  def loss_fn(params, batch, rng):
    del rng  # Llama 2 has no dropout
    logits, _ = model.apply(graphdef, params, batch["tokens"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"])
    return losses.next_token_loss(logits, batch["targets"], batch["loss_mask"], z_loss)

  return loss_fn


def build_trainer(cfg, model_cfg: configs.ModelConfig, mesh, where: str):
  train_cfg = common.train_config(cfg.train, f"{where}.train")
  opt_cfg = common.optimizer(cfg.optimizer, f"{where}.optimizer")
  graphdef, _ = model.abstract_model(model_cfg)
  rules = sharding.DEFAULT_RULES
  tr = trainer.Trainer(
      loss_fn=make_loss_fn(graphdef, cfg.get("z_loss", 0.0)),
      optimizer=optim.make_optimizer(opt_cfg, train_cfg.steps),
      schedule=optim.learning_rate(opt_cfg, train_cfg.steps),
      cfg=train_cfg, mesh=mesh, param_shardings=model.param_shardings(model_cfg, mesh, rules),
      rules=rules)
  return tr, graphdef


def make_evaluate(graphdef, mesh, batches: list[dict], extra=None):
  """params -> {loss, perplexity, accuracy} over fixed eval batches (plus `extra(params)`)."""
  loss_fn = make_loss_fn(graphdef)

  @jax.jit
  def eval_step(params, batch):
    _, metrics = loss_fn(params, batch, None)
    return metrics

  def evaluate(params):
    totals, weight = {}, 0.0
    with jax.set_mesh(mesh):
      for batch in batches:
        metrics = jax.device_get(eval_step(params, batch))
        w = float(metrics["weight"])
        weight += w
        for key in ("loss", "accuracy"):
          totals[key] = totals.get(key, 0.0) + float(metrics[key]) * w
    result = {k: v / max(weight, 1.0) for k, v in totals.items()}
    result["perplexity"] = math.exp(min(result["loss"], 50.0))
    result["eval_tokens"] = weight
    if extra is not None:
      result.update(extra(params))
    return result

  return evaluate


def stage_evaluation(cfg, ctx, tokenizer_path, graphdef, model_cfg, mesh, batch_size, rows,
                     put_batch):
  """The stage's evals: held-out loss and perplexity, plus the data source's probes."""
  eval_batches = data_sources.eval_batches(cfg.data, tokenizer_path, model_cfg.vocab_size,
                                           batch_size, rows, ctx.outputs)
  probes = data_sources.probes(cfg.data, tokenizer_path, graphdef, model_cfg, mesh, ctx.outputs)
  return make_evaluate(graphdef, mesh, [put_batch(b) for b in eval_batches], probes)


def evaluate(cfg, ctx: common.StageContext, model_dir: str) -> dict:
  """`lm eval`: this stage's evals on any language-model directory."""
  mesh = ctx.mesh()
  model_cfg, head, graphdef, params = checkpoints.load_model(model_dir, mesh)
  if head != "lm":
    raise ValueError(f"{model_dir} holds a {head!r} model, not a language model")
  tokenizer_path = resolve_tokenizer(cfg, ctx)
  tr, _ = build_trainer(cfg, model_cfg, mesh, f"stages.{ctx.name}")
  return stage_evaluation(cfg, ctx, tokenizer_path, graphdef, model_cfg, mesh, tr.cfg.batch_size,
                          tr.process_rows(tr.cfg.batch_size), tr.put_batch)(params)


def run(cfg, ctx: common.StageContext) -> dict:
  where = f"stages.{ctx.name}"
  model_cfg, init_dir = resolve_model(cfg, ctx)
  tokenizer_path = resolve_tokenizer(cfg, ctx)
  mesh = ctx.mesh()
  tr, graphdef = build_trainer(cfg, model_cfg, mesh, where)
  seq_len = cfg.data.seq_len
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"{where}.data.seq_len={seq_len} exceeds the model's max_seq_len="
                     f"{model_cfg.max_seq_len}")
  rows = tr.process_rows(tr.cfg.batch_size)
  train_data = data_sources.pretrain_batches(cfg.data, tokenizer_path, model_cfg.vocab_size,
                                             tr.cfg.batch_size, rows, ctx.seed, ctx.outputs)
  evaluate_fn = stage_evaluation(cfg, ctx, tokenizer_path, graphdef, model_cfg, mesh,
                                 tr.cfg.batch_size, rows, tr.put_batch)
  # The stage directory is a model directory from the first checkpoint on.
  checkpoints.write_model_info(ctx.directory, model_cfg, "lm", tokenizer_path)

  def initial_params():
    if init_dir is not None:
      return checkpoints.load_model(init_dir, mesh)[3]
    return model.create(model_cfg, mesh, seed=ctx.seed)[1]

  result = trainer.run(
      tr, params=initial_params, data=train_data, workdir=ctx.directory, evaluate=evaluate_fn,
      tokens_per_step=tr.cfg.batch_size * seq_len,
      flops_per_token=hardware.flops_per_token(configs.param_count(model_cfg),
                                               model_cfg.n_layers, seq_len, model_cfg.dim))
  # Rows skipped under data.skip_bad_rows, by kind, so nothing is dropped unreported.
  result.update({f"dropped_{k.replace(' ', '_')}": v
                 for k, v in getattr(train_data, "dropped", {}).items()})
  return result


def train_step_for_aot(cfg, mesh):
  """(jitted step, abstract (state, batch), rules, model FLOPs per step) for compiling on `mesh`.

  Serves every stage whose step is this next-token step on packed rows: pretraining, and SFT and
  GAtt, which differ only in their data and loss mask. Reads the stage's `model` (at run time a
  fine-tuning stage takes its model from `init_from` instead), train, optimizer, data.seq_len and
  z_loss; nothing is allocated.
  """
  if "model" not in cfg:
    raise ValueError("the stage has no `model` section, so there is no model to compile")
  model_cfg = common.model_config(cfg.model, "model")
  tr, _ = build_trainer(cfg, model_cfg, mesh, "aot")
  state = tr.abstract_state(model.abstract_params(model_cfg, mesh, tr.rules))
  shape = (tr.cfg.batch_size, cfg.data.seq_len)
  batch = {name: jax.ShapeDtypeStruct(shape, jnp.float32 if name == "loss_mask" else jnp.int32,
                                      sharding=tr.batch_sharding(2))
           for name in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
  step = tr.jit_step(jax.tree.map(lambda a: a.sharding, state), batch)
  flops = hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers,
                                   cfg.data.seq_len, model_cfg.dim) * shape[0] * shape[1]
  return step, (state, batch), tr.rules, flops
