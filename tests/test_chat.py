"""The chat session: history in the exact format, trimming, streaming, and the `lm chat` REPL."""

import os
import subprocess
import sys

import jax
import pytest

from lm import chat, checkpoints, configs, model, sampling
from lm import tokenizer as tok

CFG = configs.get_preset("tiny", vocab_size=400, max_seq_len=128)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  directory = tmp_path_factory.mktemp("chat")
  import random
  words = ["".join(random.Random(i).choices("abcdefghijklmnoprstuvy", k=5)) for i in range(400)]
  text = [f"Mira lives in Velloran; Oskar keeps a red fox near {w} ({i})." for i, w in enumerate(words)]
  tokenizer = tok.train_tokenizer(text, vocab_size=400, output_path=directory / "tokenizer.model")
  graphdef, params = model.create(CFG, seed=1)
  return directory, tokenizer, graphdef, params


def test_each_turn_is_sampled_from_the_whole_history_in_chat_format(parts):
  _, tokenizer, graphdef, params = parts
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=6, eos_id=tokenizer.eos_id)
  session = chat.ChatSession(graphdef, CFG, params, tokenizer, system="Be brief.", sampling_cfg=cfg)
  first = session.reply("Where does Mira live?")
  prompt = session.prompt("And Oskar?")
  expected = tokenizer.encode_dialog([
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Where does Mira live?"},
      {"role": "assistant", "content": first or "..."},
      {"role": "user", "content": "And Oskar?"}]).tokens.tolist()
  assert prompt == expected
  # The streamed reply is the greedy continuation of that prompt.
  out = sampling.generate(graphdef, CFG, params, *sampling.left_pad([prompt]), jax.random.key(0), cfg)
  streamed = []
  second = session.reply("And Oskar?", on_text=streamed.append)
  assert "".join(streamed).strip() == second
  produced = [t for t in out.tokens[0, :int(out.lengths[0])].tolist() if t != tokenizer.eos_id]
  assert second == tokenizer.decode(produced).strip()


def test_old_turns_are_dropped_when_the_context_is_full(parts):
  _, tokenizer, graphdef, params = parts
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=40, eos_id=tokenizer.eos_id)
  session = chat.ChatSession(graphdef, CFG, params, tokenizer, system="Keep it.", sampling_cfg=cfg)
  session.turns = [{"role": "user", "content": "Mira lives in Velloran " * 3},
                   {"role": "assistant", "content": "Oskar keeps a red fox " * 3}] * 4
  prompt = session.prompt("Hello?")
  assert len(prompt) <= CFG.max_seq_len - 40 and len(session.turns) < 8
  assert tokenizer.decode(prompt).count("Keep it.") == 1
  with pytest.raises(ValueError, match="tokens with the system prompt"):
    session.prompt("Mira " * 200)


def test_lm_chat_repl_end_to_end(parts, tmp_path):
  directory, tokenizer, graphdef, params = parts
  checkpoints.save_model(tmp_path, params, CFG, tokenizer_path=directory / "tokenizer.model")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "lm.cli", "chat", f"--checkpoint={tmp_path}", "--system=Be brief.",
       "--max_new_tokens=5"], input="Where does Mira live?\n/reset\nAnd Oskar?\n/exit\n",
      capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.count("assistant> ") == 2 and "(history cleared)" in result.stdout
