"""The tokenizer and the Llama 2 chat format, against SentencePiece itself and Meta's recipe."""

import numpy as np
import pytest
import sentencepiece

from lm import tokenizer as tok

TEXT = [f"Mira {i} lives in Velloran and likes {c} tea; 12{i}+7={127 + i*10}." for i, c in
        enumerate(["green", "black", "mint", "red", "white", "smoky"] * 40)]
TEXT += ["[INST] What? [/INST] Sure. <<SYS>> be kind <</SYS>>"] * 20


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return tok.train_tokenizer(TEXT, vocab_size=400, output_path=path)


def meta_chat(sp, dialog):
  """Meta's generation.py::chat_completion, written out with the string route."""
  if dialog[0]["role"] == "system":
    dialog = [{"role": "user", "content": tok.B_SYS + dialog[0]["content"] + tok.E_SYS
               + dialog[1]["content"]}] + dialog[2:]
  ids = []
  for user, answer in zip(dialog[0::2], dialog[1::2]):
    ids += [1] + sp.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ") + [2]
  if len(dialog) % 2:
    ids += [1] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
  return ids


def test_trained_with_llama2_settings(tk):
  spec = sentencepiece.SentencePieceProcessor(model_file=tk.path)
  assert (spec.unk_id(), spec.bos_id(), spec.eos_id(), spec.pad_id()) == (0, 1, 2, -1)
  assert tk.vocab_size == 400
  # Digits are split one by one and unknown characters fall back to bytes.
  assert all(len(p.strip("▁")) <= 1 for p in spec.encode("1234567", out_type=str))
  assert tk.decode(tk.encode("Ωmega 9")) == "Ωmega 9"
  assert tk.encode("hi", bos=True, eos=True) == [1] + spec.encode("hi") + [2]


DIALOGS = {
    "single": [{"role": "user", "content": "Where does Mira live?"}],
    "system": [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "Where does Mira live?"}],
    "multi": [{"role": "user", "content": " Where does Mira live? "},
              {"role": "assistant", "content": "Velloran. "},
              {"role": "user", "content": "And her tea?"},
              {"role": "assistant", "content": "Mint tea."}],
    "multi_system_open": [{"role": "system", "content": "Be kind."},
                          {"role": "user", "content": "Where does Mira live?"},
                          {"role": "assistant", "content": "Velloran."},
                          {"role": "user", "content": "And her tea?"}],
}


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_chat_tokens_equal_metas_recipe(tk, name):
  encoded = tk.encode_dialog(DIALOGS[name])
  assert encoded.tokens.tolist() == meta_chat(tk.sp, DIALOGS[name])


def test_loss_mask_covers_exactly_the_answers_and_their_eos(tk):
  encoded = tk.encode_dialog(DIALOGS["multi"])
  answer = lambda t: tk.decode(encoded.tokens[(encoded.loss_mask == 1) & (encoded.turn == t)])
  # Each answer keeps the single space Meta's format puts before EOS (EOS decodes to nothing).
  assert [answer(0), answer(1)] == ["Velloran. ", "Mint tea. "]
  ends = np.flatnonzero(encoded.tokens == tk.eos_id)
  assert encoded.loss_mask[ends].tolist() == [1, 1]
  assert encoded.turn.tolist() == sorted(encoded.turn.tolist()) and encoded.turn[-1] == 1
  first_turn = encoded.tokens[encoded.turn == 0]
  assert first_turn[0] == tk.bos_id and first_turn[-1] == tk.eos_id
  # An open final user turn is all prompt.
  assert tk.encode_dialog(DIALOGS["multi_system_open"]).loss_mask[-5:].tolist() == [0] * 5


@pytest.mark.parametrize("messages, error", [
    ([], "at least one user message"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "  "}], "empty content"),
    ([{"role": "user", "content": "do [INST] this"}], "control tag"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "<</SYS>>"}], "control tag"),
    ([{"role": "bot", "content": "x"}], "unknown role"),
    ([{"role": "system", "content": "x"}], "followed by a user message"),
    ([{"content": "x"}], "needs 'role' and 'content'"),
])
def test_bad_dialogs_are_refused_with_the_reason(tk, messages, error):
  with pytest.raises(tok.DialogError, match=error):
    tk.encode_dialog(messages)


def test_missing_model_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tok.Tokenizer(tmp_path / "nope.model")
