"""Pretraining: next-token prediction on packed text (LLAMA2.md §3).

Config (`Config`; experiments/pretrain.py builds it): model (every ModelConfig field; a stage
with `init_from` continues that model instead), init_from, tokenizer (an earlier stage that wrote
tokenizer.model, or a path), data (see lm/stages/data_sources.py), train, optimizer, z_loss, plan,
rollout_plan.
"""

from __future__ import annotations

import dataclasses

from lm import checkpoints, configs, optim, roles, sharding, trainer
from lm.stages import common, data_sources, kit


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "pretrain"
  model: configs.ModelConfig = configs.ModelConfig()
  init_from: str = ""
  tokenizer: str = ""
  data: data_sources.PretrainData = data_sources.PretrainData()
  train: trainer.TrainConfig = trainer.TrainConfig(steps=1000, batch_size=16)
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  z_loss: float = 0.0
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"


def _model(cfg: Config, ctx) -> tuple[configs.ModelConfig, str | None]:
  if cfg.init_from:
    return kit.resolve_start(cfg.init_from, ctx)
  return cfg.model, None


def _evaluation(cfg: Config, ctx, role: roles.Role, tokenizer_path, tr: trainer.Trainer):
  """Held-out loss and perplexity, plus the data source's probes (fact completion)."""
  rows = tr.process_rows(tr.cfg.batch_size)
  batches = data_sources.eval_batches(cfg.data, tokenizer_path, role.model_cfg.vocab_size,
                                      tr.cfg.batch_size, rows, ctx.outputs)
  probes = data_sources.probes(cfg.data, tokenizer_path, ctx.outputs)
  extra = None
  if probes is not None:
    extra = lambda r: probes(kit.rollout_role(r, cfg.rollout_plan))  # noqa: E731
  return kit.make_evaluate(role, [tr.put_batch(b) for b in batches], extra)


def evaluate(cfg: Config, ctx: common.StageContext, model_dir: str) -> dict:
  """`lm eval`: this stage's evals on any language-model directory."""
  role = roles.load("model", model_dir, ctx.mesh(), head="lm", plan=cfg.plan)
  tr = kit.build_trainer(cfg, role.model_cfg, role.mesh, f"stages.{ctx.name}")
  tokenizer_path = kit.resolve_tokenizer(cfg.tokenizer, ctx)
  return _evaluation(cfg, ctx, role, tokenizer_path, tr)(role.params)


def run(cfg: Config, ctx: common.StageContext) -> dict:
  where = f"stages.{ctx.name}"
  model_cfg, init_dir = _model(cfg, ctx)
  tokenizer_path = kit.resolve_tokenizer(cfg.tokenizer, ctx)
  if cfg.data.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"{where}.data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len="
                     f"{model_cfg.max_seq_len}")
  mesh = ctx.mesh()
  tr = kit.build_trainer(cfg, model_cfg, mesh, where)
  rows = tr.process_rows(tr.cfg.batch_size)
  data = data_sources.pretrain_batches(cfg.data, tokenizer_path, model_cfg.vocab_size,
                                       tr.cfg.batch_size, rows, ctx.seed, ctx.outputs)
  evaluate_fn = _evaluation(cfg, ctx, roles.spec("model", model_cfg, mesh, plan=cfg.plan),
                            tokenizer_path, tr)
  # The stage directory is a model directory from the first checkpoint on.
  checkpoints.write_model_info(ctx.directory, model_cfg, "lm", tokenizer_path)

  def initial_params():
    if init_dir is not None:
      return roles.load("model", init_dir, mesh, head="lm", plan=cfg.plan).params
    return roles.create("model", model_cfg, mesh, plan=cfg.plan, seed=ctx.seed).params

  try:
    result = kit.train(tr, ctx, model_cfg, params=initial_params, data=data,
                       evaluate=evaluate_fn, seq_len=cfg.data.seq_len)
    result.update(kit.dropped(data))
  finally:
    if hasattr(data, "close"):  # the streaming path's grain worker processes
      data.close()
  return result


PROGRAMS = {"train step": kit.train_step_program}
