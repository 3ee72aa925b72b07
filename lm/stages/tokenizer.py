"""The `tokenizer` stage: trains SentencePiece with the Llama 2 settings on a corpus.

Config: corpus (an earlier stage that wrote text, or a path of .jsonl/.txt files), vocab_size.
Output: DIR/tokenizer.model.
"""

from __future__ import annotations

import dataclasses
import os

from data_pipelines import chat as chat_data
from data_pipelines import text
from lm import checkpoints
from lm.tokenizer import train_tokenizer

PRETRAIN_TEXT = os.path.join("pretrain", "train.jsonl")


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "tokenizer"
  corpus: str = "world"
  vocab_size: int = 32000


def corpus_path(reference: str, ctx) -> str:
  """An earlier stage's pretraining text, or a path as given."""
  if reference in ctx.outputs:
    return os.path.join(ctx.outputs[reference], PRETRAIN_TEXT)
  return reference


def _chat_text(reference: str, ctx) -> list[str]:
  """The chat data of the corpus stage, rendered with the [INST] tags the model will see."""
  if reference not in ctx.outputs:
    return []
  path = os.path.join(ctx.outputs[reference], "sft", "train.jsonl")
  if not os.path.exists(path):
    return []
  lines = []
  for _, messages in chat_data.read_dialogues(path):
    lines += [f"[INST] {m['content']} [/INST]" if m["role"] != "assistant" else m["content"]
              for m in messages]
  return lines


def run(cfg, ctx) -> dict:
  documents = text.read_documents(corpus_path(cfg.corpus, ctx)) + _chat_text(cfg.corpus, ctx)
  tokenizer = train_tokenizer(documents, cfg.vocab_size,
                              os.path.join(ctx.directory, checkpoints.TOKENIZER_FILE))
  pieces = sum(len(tokenizer.encode(d)) for d in documents[:1000])
  characters = sum(len(d) for d in documents[:1000])
  return {"vocab_size": tokenizer.vocab_size, "documents": len(documents),
          "characters_per_token": characters / max(pieces, 1)}
