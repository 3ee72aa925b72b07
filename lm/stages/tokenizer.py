"""The `tokenizer` stage: trains SentencePiece with the Llama 2 settings on a corpus.

Config: corpus (an earlier stage that wrote text, or a path of .jsonl/.txt files), vocab_size.
Output: DIR/tokenizer.model.
"""

from __future__ import annotations

import os

from data_pipelines import text
from lm import checkpoints
from lm.tokenizer import train_tokenizer

PRETRAIN_TEXT = os.path.join("pretrain", "train.jsonl")


def corpus_path(reference: str, ctx) -> str:
  """An earlier stage's pretraining text, or a path as given."""
  if reference in ctx.outputs:
    return os.path.join(ctx.outputs[reference], PRETRAIN_TEXT)
  return reference


def run(cfg, ctx) -> dict:
  documents = text.read_documents(corpus_path(cfg.corpus, ctx))
  tokenizer = train_tokenizer(documents, cfg.vocab_size,
                              os.path.join(ctx.directory, checkpoints.TOKENIZER_FILE))
  pieces = sum(len(tokenizer.encode(d)) for d in documents[:1000])
  characters = sum(len(d) for d in documents[:1000])
  return {"vocab_size": tokenizer.vocab_size, "documents": len(documents),
          "characters_per_token": characters / max(pieces, 1)}
