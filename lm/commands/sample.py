"""`lm sample`: generate from a checkpoint, or from a random model of a preset.

  lm sample --checkpoint=DIR --prompt="The capital of" [--temperature=0.6 --top_p=0.9]
  lm sample --preset=tiny --prompt_ids=1,17,33 --max_new_tokens=16
"""

from __future__ import annotations

import os

from absl import flags

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A model directory (model.json + checkpoints/).")
PRESET = flags.DEFINE_string("preset", None, "Build a random model of this preset instead.")
PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text (needs a tokenizer); repeatable.")
PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", [], "Comma-separated token ids; repeatable.")
TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                "SentencePiece model (default: DIR/tokenizer.model).")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "0 means greedy (Meta's default is 0.6).")
TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (Meta's default is 0.9).")
TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: off).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def _parse_ids(text: str) -> list[int]:
  try:
    return [int(piece) for piece in text.replace(" ", "").split(",") if piece]
  except ValueError:
    raise SystemExit(f"lm sample: --prompt_ids={text!r} must be comma-separated integers")


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm sample: unexpected arguments {argv[1:]}")
  if (CHECKPOINT.value is None) == (PRESET.value is None):
    raise SystemExit("lm sample: give exactly one of --checkpoint=DIR or --preset=NAME")
  if not PROMPT.value and not PROMPT_IDS.value:
    raise SystemExit("lm sample: give --prompt=TEXT or --prompt_ids=1,2,3")

  import jax

  from lm import checkpoints, configs, roles, rollout, sampling, sharding
  from lm.tokenizer import Tokenizer

  one_device = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  if CHECKPOINT.value is not None:
    cfg, head = checkpoints.read_model_info(CHECKPOINT.value)
    if head != "lm":
      raise SystemExit(f"lm sample: {CHECKPOINT.value} holds a {head!r} model, not a language model")
    policy = roles.load("policy", CHECKPOINT.value, one_device, step=STEP.value)
  else:
    cfg = configs.get_preset(PRESET.value)
    policy = roles.create("policy", cfg, one_device, seed=SEED.value)

  tokenizer = None
  tokenizer_path = TOKENIZER.value or (
      os.path.join(CHECKPOINT.value, checkpoints.TOKENIZER_FILE) if CHECKPOINT.value else None)
  if tokenizer_path and os.path.exists(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
  if PROMPT.value and tokenizer is None:
    raise SystemExit("lm sample: --prompt needs a tokenizer (--tokenizer=FILE, or a checkpoint "
                     "directory holding tokenizer.model); use --prompt_ids otherwise")

  prompts = [tokenizer.encode(text, bos=True) for text in PROMPT.value]
  prompts += [_parse_ids(text) for text in PROMPT_IDS.value]
  for prompt in prompts:
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
      raise SystemExit(f"lm sample: token ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
  eos = tokenizer.eos_id if tokenizer is not None else 2
  sample_cfg = sampling.SamplingConfig(
      temperature=TEMPERATURE.value, top_p=TOP_P.value, top_k=TOP_K.value,
      max_new_tokens=MAX_NEW.value, eos_id=eos)
  samples = rollout.generate(policy, prompts, sample_cfg, jax.random.key(SEED.value),
                             batch_size=len(prompts), length_bucket=1)
  for row, prompt in enumerate(prompts):
    new = samples.answer(row)
    print(f"prompt ids: {prompt}")
    print(f"output ids: {new}")
    if tokenizer is not None:
      print(f"prompt: {tokenizer.decode(prompt)}")
      print(f"output: {tokenizer.decode([t for t in new if t != eos])}")
