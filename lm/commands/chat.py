"""`lm chat --checkpoint=DIR [--system=TEXT]`: talk to a chat model in the Llama 2 format.

Replies stream as they are sampled (temperature 0.6, top-p 0.9 by default, as Meta's code);
the history is kept in the exact chat format. Type /reset to clear it, /exit to leave.
"""

from __future__ import annotations

import os

from absl import flags

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model directory with tokenizer.model.")
SYSTEM = flags.DEFINE_string("system", None, "A system prompt kept for the whole conversation.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "0 means greedy.")
TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass.")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest reply, in tokens.")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm chat: unexpected arguments {argv[1:]}")
  if CHECKPOINT.value is None:
    raise SystemExit("usage: lm chat --checkpoint=DIR [--system=TEXT]")
  from lm import chat, checkpoints, sampling
  from lm.tokenizer import Tokenizer
  tokenizer_path = os.path.join(CHECKPOINT.value, checkpoints.TOKENIZER_FILE)
  if not os.path.exists(tokenizer_path):
    raise SystemExit(f"lm chat: {CHECKPOINT.value} has no {checkpoints.TOKENIZER_FILE}")
  model_cfg, head, graphdef, params = checkpoints.load_model(CHECKPOINT.value)
  if head != "lm":
    raise SystemExit(f"lm chat: {CHECKPOINT.value} holds a {head!r} model")
  tokenizer = Tokenizer(tokenizer_path)
  cfg = sampling.SamplingConfig(temperature=TEMPERATURE.value, top_p=TOP_P.value,
                                max_new_tokens=MAX_NEW.value, eos_id=tokenizer.eos_id)
  session = chat.ChatSession(graphdef, model_cfg, params, tokenizer, system=SYSTEM.value,
                             sampling_cfg=cfg, seed=SEED.value)
  chat.repl(session)
