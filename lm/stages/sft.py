"""Supervised fine-tuning on chat dialogues (LLAMA2.md §4).

Loss on assistant tokens only (every assistant turn, and its EOS), examples packed whole with
segment masking so neither attention nor loss crosses examples. The paper's recipe is the default
for the real sizes: LR 2e-5 cosine, weight decay 0.1, batch 64, seq 4096, 2 epochs.

Config: init_from (an earlier stage or model directory), tokenizer, data (source: an earlier
stage that wrote sft/ data, e.g. "world", a path of dialogue JSONL, or "tfds:NAME[@SPLIT]" of a
dialogues dataset under data_dir (data_pipelines/tfds_sources.py); eval_source; seq_len;
eval_batches; skip_bad_rows: drop bad rows, counted by kind, instead of failing), train, optimizer,
model (read by `lm aot` only, which compiles without a checkpoint: at run time the model is the
one in init_from).
"""

from __future__ import annotations

import os

from data_pipelines import chat as chat_data
from data_pipelines import text
from lm import checkpoints, configs, hardware, trainer
from lm.evals import chat as chat_evals
from lm.stages import common
from lm.stages.pretrain import (build_trainer, make_evaluate, resolve_chat_start,
                                resolve_tokenizer)
# The SFT step is the pretraining step on packed chat rows, so `lm aot` compiles it the same way.
from lm.stages.pretrain import train_step_for_aot  # noqa: F401
from lm.tokenizer import Tokenizer


def _source(cfg, ctx, split: str) -> str:
  if cfg.data.source in ctx.outputs:
    return os.path.join(ctx.outputs[cfg.data.source], "sft", f"{split}.jsonl")
  if not cfg.data.source:
    raise ValueError(f"stages.{ctx.name}.data.source is empty: give dialogue JSONL files")
  return cfg.data.source if split == "train" else (cfg.data.get("eval_source") or cfg.data.source)


def packed(cfg, ctx, tokenizer: Tokenizer, split: str):
  report, bad = chat_data.PackReport(), text.BadRows(cfg.data.get("skip_bad_rows", False))
  source = _source(cfg, ctx, split)
  if source.startswith("tfds:"):
    from data_pipelines import tfds_sources  # imports TFDS only for TFDS sources
    dialogues = tfds_sources.dialogues(*tfds_sources.parse_source(source, split),
                                       cfg.data.get("data_dir") or None)
  else:
    dialogues = chat_data.read_dialogues(source, bad)
  examples = chat_data.encode_examples(dialogues, tokenizer.encode_dialog, cfg.data.seq_len, bad)
  return chat_data.pack_examples(examples, cfg.data.seq_len, report), (report, bad)


def _questions(cfg, ctx):
  if cfg.data.source in ctx.outputs:
    path = os.path.join(ctx.outputs[cfg.data.source], "sft", "questions.jsonl")
    if os.path.exists(path):
      return chat_evals.load_questions(path)
  return None


def _evaluation(cfg, ctx, tokenizer, graphdef, model_cfg, mesh, tr):
  rows = tr.process_rows(tr.cfg.batch_size)
  eval_rows, _ = packed(cfg, ctx, tokenizer, "eval")
  batches = text.fixed_batches(eval_rows, tr.cfg.batch_size, cfg.data.eval_batches, rows)
  questions = _questions(cfg, ctx)
  extra = None
  if questions:
    extra = lambda params: chat_evals.answer_metrics(  # noqa: E731
        graphdef, model_cfg, params, tokenizer, questions, mesh)
  return make_evaluate(graphdef, mesh, [tr.put_batch(b) for b in batches], extra)


def evaluate(cfg, ctx, model_dir: str) -> dict:
  mesh = ctx.mesh()
  model_cfg, _, graphdef, params = checkpoints.load_model(model_dir, mesh)
  tokenizer = Tokenizer(resolve_tokenizer(cfg, ctx))
  tr, _ = build_trainer(cfg, model_cfg, mesh, f"stages.{ctx.name}")
  return _evaluation(cfg, ctx, tokenizer, graphdef, model_cfg, mesh, tr)(params)


def run(cfg, ctx) -> dict:
  where = f"stages.{ctx.name}"
  model_cfg, init_dir, tokenizer_path = resolve_chat_start(cfg, ctx, "a pretrained model")
  tokenizer = Tokenizer(tokenizer_path)
  mesh = ctx.mesh()
  tr, graphdef = build_trainer(cfg, model_cfg, mesh, where)
  train_rows, (report, bad) = packed(cfg, ctx, tokenizer, "train")
  data = text.PackedBatches(train_rows, text.PackingConfig(
      cfg.data.seq_len, tr.cfg.batch_size, ctx.seed, tr.process_rows(tr.cfg.batch_size)))
  evaluate_fn = _evaluation(cfg, ctx, tokenizer, graphdef, model_cfg, mesh, tr)
  checkpoints.write_model_info(ctx.directory, model_cfg, "lm", tokenizer_path)
  initial = checkpoints.load_model(init_dir, mesh)[3]
  # The starting model's scores, so the report shows what fine-tuning changed.
  before = {f"{k}_before": v for k, v in evaluate_fn(initial).items()
            if k in ("answer_accuracy", "stop_at_eos", "loss")}
  result = trainer.run(
      tr, params=initial, data=data, workdir=ctx.directory, evaluate=evaluate_fn,
      tokens_per_step=tr.cfg.batch_size * cfg.data.seq_len,
      flops_per_token=hardware.flops_per_token(configs.param_count(model_cfg),
                                               model_cfg.n_layers, cfg.data.seq_len,
                                               model_cfg.dim))
  result.update(before)
  result.update(packed_examples=report.examples, packed_rows=report.rows, row_fill=report.fill,
                **{f"dropped_{k.replace(' ', '_')}": v for k, v in bad.dropped.items()})
  return result
