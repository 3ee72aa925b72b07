"""GAtt: last-turn loss, training rows, adherence by turn, batched conversations, bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from data_pipelines import instructions as ins
from data_pipelines.text import DataError
from experiments import llama2_chat
from lm import chat, checkpoints, configs, roles, rollout, sampling, sharding
from lm import tokenizer as tok
from lm.evals import adherence
from lm.stages import common, gatt, kit, typed_config

CFG = configs.get_preset("tiny", vocab_size=400, max_seq_len=256)


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
  import random
  words = ["".join(random.Random(i).choices("abcdefghiklmnoprstuv", k=5)) for i in range(300)]
  text = [f"Where does {w} live? {w} lives in Velloran ({i}). Style: capitals. - Captain Vo"
          for i, w in enumerate(words)]
  return tok.train_tokenizer(text, 400, tmp_path_factory.mktemp("t") / "tokenizer.model")


DIALOG = [{"role": "system", "content": "Style: capitals."},
          {"role": "user", "content": "Where does Mira live?"},
          {"role": "assistant", "content": "MIRA LIVES IN VELLORAN."},
          {"role": "user", "content": "What pet does Mira keep?"},
          {"role": "assistant", "content": "MIRA KEEPS A FOX."},
          {"role": "user", "content": "How old is Mira?"},
          {"role": "assistant", "content": "MIRA IS 40 YEARS OLD."}]


def test_loss_is_on_the_last_assistant_turn_only(tk):
  encoded = kit.encode_last_turn(tk)(DIALOG)
  full = tk.encode_dialog(DIALOG)
  earlier = len(tk.encode_dialog(DIALOG[:-2]).tokens)  # every token before the last exchange
  np.testing.assert_array_equal(encoded.tokens, full.tokens)
  np.testing.assert_array_equal(encoded.loss_mask[:earlier], 0)  # earlier answers included
  np.testing.assert_array_equal(encoded.loss_mask[earlier:], full.loss_mask[earlier:])
  trained = encoded.tokens[encoded.loss_mask == 1]
  assert trained[-1] == tk.eos_id and tk.decode(trained[:-1]).strip() == "MIRA IS 40 YEARS OLD."


def _reply(text, finished=True):
  return rollout.Reply(text, finished)


def test_training_rows_keep_the_instruction_in_the_system_message_only():
  instruction = ins.Instruction((ins.Constraint("style", "capitals"),), terse=True)
  questions = ("Where does Mira live?", "How old is Mira?", "What pet does Mira keep?")
  replies = [_reply("MIRA LIVES IN VELLORAN."), _reply("Mira is 40."),
             _reply("MIRA KEEPS A", finished=False)]
  rows, counts = gatt.training_rows([instruction], [questions], [replies], every_turn=True,
                                    keep_only_adherent=True)
  assert counts == {"sampled_turns": 3, "kept": 1, "dropped_unfinished": 1,
                    "dropped_not_adherent": 1}
  assert rows[0]["messages"] == [
      {"role": "system", "content": "Style: capitals."},
      {"role": "user", "content": "Where does Mira live?"},
      {"role": "assistant", "content": "MIRA LIVES IN VELLORAN."}]
  rows, counts = gatt.training_rows([instruction], [questions], [replies[:2]], every_turn=False,
                                    keep_only_adherent=False)
  assert counts["kept"] == 1 and len(rows[0]["messages"]) == 5  # the last turn, adherent or not
  assert all("Style" not in m["content"] for m in rows[0]["messages"][1:])


def test_adherence_by_turn_counts_only_the_turns_that_test_the_instruction():
  hobby = ins.Instruction((ins.Constraint("hobby", "chess"),))
  capitals = ins.Instruction((ins.Constraint("style", "capitals"),))
  conversations = [rollout.Conversation(("Where?", "What is your hobby?")),
                   rollout.Conversation(("Where?", "What is your hobby?", "Age?"))]
  replies = [[_reply("Velloran."), _reply("I enjoy chess.")],
             [_reply("VELLORAN."), _reply("i enjoy chess."), _reply("FORTY", finished=False)]]
  rates = adherence.adherence_by_turn([hobby, capitals], conversations, replies)
  assert rates == [1.0, 0.5, 0.0]  # turn 1: only capitals is tested; turn 3: cut off
  assert adherence.adherence_by_turn([hobby], conversations[:1], replies[:1]) == [None, 1.0]
  table = adherence.adherence_table({"before": [0.5, None], "after": [1.0, 1.0]})
  assert "| 1 | 50% | 100% |" in table and "| 2 | - | 100% |" in table


def test_batched_conversations_equal_one_chat_session_each(tk):
  """Padding, bucketing and turn bookkeeping change nothing: greedy replies match ChatSession."""
  mesh = sharding.make_mesh(sharding.MeshConfig())
  policy = roles.create("policy", CFG, mesh, plan="rollout", seed=3)
  graphdef, params = policy.graphdef, jax.device_get(policy.params)
  # Turn 1: two prompts of different lengths (left padding); turn 2: one prompt in a padded batch.
  conversations = [
      rollout.Conversation(("Where does Mira live?", "And Oskar?"), system="Be brief."),
      rollout.Conversation(("Hello?",), appended="Figure: Captain Vo."),
  ]
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=6, eos_id=tk.eos_id)
  replies = rollout.converse(policy, tk, conversations, cfg, jax.random.key(0), batch_size=2,
                             length_bucket=16)
  for conversation, got in zip(conversations, replies):
    session = chat.ChatSession(graphdef, CFG, params, tk, system=conversation.system,
                               sampling_cfg=cfg)
    expected = [session.reply(conversation.user_text(t)) for t in range(len(conversation.questions))]
    assert [r.text for r in got] == expected


def test_long_histories_lose_their_earliest_turns_and_keep_the_system_message(tk):
  conversation = rollout.Conversation(tuple(f"Where does Mira{i} live?" for i in range(6)),
                                      system="Style: capitals.")
  replies = [f"MIRA{i} LIVES IN VELLORAN, FAR AWAY." for i in range(5)]
  full = len(tk.encode_dialog(conversation.messages(5, replies)).tokens)
  assert rollout.fitting_prompt(tk, conversation, 5, replies, full) == (
      tk.encode_dialog(conversation.messages(5, replies)).tokens.tolist(), 0)
  for budget in (full - 1, full // 2):
    prompt, dropped = rollout.fitting_prompt(tk, conversation, 5, replies, budget)
    assert 0 < dropped < 5 and len(prompt) <= budget
    # the fewest turns dropped: one fewer would not fit
    assert len(tk.encode_dialog(conversation.messages(5, replies, dropped - 1)).tokens) > budget
    assert prompt == tk.encode_dialog(conversation.messages(5, replies, dropped)).tokens.tolist()
    text = tk.decode(prompt)
    assert "Style: capitals." in text and "Mira5" in text and "Mira0" not in text
  alone = len(tk.encode_dialog(conversation.messages(5, replies, 5)).tokens)
  with pytest.raises(ValueError, match="turn 6 .* over the prompt budget"):
    rollout.fitting_prompt(tk, conversation, 5, replies, alone - 1)


def test_an_eval_row_with_an_unknown_split_fails_with_file_and_line(tmp_path):
  path = tmp_path / "eval.jsonl"
  row = {"instruction": ins.Instruction((ins.Constraint("hobby", "chess"),)).to_json(),
         "questions": ["What is your hobby?"]}
  path.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, split="heldout")) + "\n")
  with pytest.raises(DataError, match="eval.jsonl:2: split must be one of"):
    adherence.load_eval_set(str(path))
  path.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, split="held_out")) + "\n")
  evals = adherence.load_eval_set(str(path))
  assert evals.splits == ["in_distribution", "held_out"] and len(evals.split("held_out")) == 1


@pytest.fixture()
def stage(tk, tmp_path):
  """A GAtt stage config and context over a model directory with no weights: validation must
  fail before anything is loaded."""
  model_dir = tmp_path / "sft"
  checkpoints.write_model_info(model_dir, CFG, "lm", tk.path)
  data = tmp_path / "world" / "gatt"
  data.mkdir(parents=True)
  (data / "instructions.jsonl").write_text(
      "".join(json.dumps(c.to_json()) + "\n" for c in ins.default_bank()))
  (data / "dialogues.jsonl").write_text(json.dumps({"messages": DIALOG[1:]}) + "\n")
  (data / "eval.jsonl").write_text(json.dumps({
      "instruction": ins.Instruction((ins.Constraint("hobby", "chess"),)).to_json(),
      "questions": ["What is your hobby?", "Where does Mira live?"]}) + "\n")
  cfg = typed_config(llama2_chat.gatt_stage("test"), "stages.gatt")
  ctx = common.StageContext(
      name="gatt", directory=str(tmp_path / "gatt"),
      outputs={"world": str(tmp_path / "world"), "sft": str(model_dir), "tokenizer": str(model_dir)},
      mesh_config=sharding.MeshConfig(), seed=0)
  return cfg, ctx, data


def test_valid_inputs_pass_validation(stage):
  cfg, ctx, _ = stage
  inputs = gatt.validate(cfg, ctx)
  assert inputs.bank == ins.default_bank()
  assert inputs.questions == [tuple(m["content"] for m in DIALOG[1::2])]
  assert len(inputs.eval_set) == 1


def test_gatt_can_start_from_any_earlier_chat_stage(stage):
  """GAtt after RLHF, as in the paper: init_from names whichever stage came last."""
  cfg, ctx, _ = stage
  ctx = dataclasses.replace(ctx, outputs=dict(ctx.outputs, ppo_v5=ctx.outputs["sft"]))
  inputs = gatt.validate(dataclasses.replace(cfg, init_from="ppo_v5"), ctx)
  assert inputs.init_dir == ctx.outputs["ppo_v5"]
  with pytest.raises(ValueError, match="ppo_v6"):
    gatt.validate(dataclasses.replace(cfg, init_from="ppo_v6"), ctx)


def test_a_bank_family_without_a_checker_fails_before_compute(stage):
  cfg, ctx, data = stage
  (data / "instructions.jsonl").write_text('{"family": "rhyme", "value": "always"}\n')
  with pytest.raises(DataError, match=r"instructions.jsonl:1: .*'rhyme' has no checker"):
    gatt.run(cfg, ctx)


def test_dialogues_whose_roles_do_not_alternate_fail_with_file_and_line(stage):
  cfg, ctx, data = stage
  bad = DIALOG[1:3] + [{"role": "assistant", "content": "Again."}]
  (data / "dialogues.jsonl").write_text(json.dumps({"messages": DIALOG[1:]}) + "\n" +
                                        json.dumps({"messages": bad}) + "\n")
  with pytest.raises(DataError, match=r"dialogues.jsonl:2: roles must alternate"):
    gatt.run(cfg, ctx)


def test_a_system_prompt_over_the_sequence_budget_fails_before_compute(stage):
  cfg, ctx, data = stage
  long_persona = {"family": "persona", "value": "Captain Vo", "text": "Act as Captain Vo. " * 60}
  (data / "instructions.jsonl").write_text(json.dumps(long_persona) + "\n")
  with pytest.raises(ValueError, match=r"stages.gatt.data: the system prompt .* over the budget"):
    gatt.run(cfg, ctx)


def test_several_samples_of_a_dialogue_give_one_example_per_turn_from_the_first_that_obeys():
  instruction = ins.Instruction((ins.Constraint("style", "capitals"),))
  questions = ("Where does Mira live?", "How old is Mira?")
  first = [_reply("Mira lives in Velloran."), _reply("MIRA IS 40.")]
  second = [_reply("MIRA LIVES IN VELLORAN."), _reply("MIRA IS FORTY.")]
  rows, counts = gatt.training_rows([instruction] * 2, [questions] * 2, [first, second],
                                    every_turn=True, keep_only_adherent=True, groups=[0, 0])
  answers = [r["messages"][-1]["content"] for r in rows]
  assert answers == ["MIRA IS 40.", "MIRA LIVES IN VELLORAN."]
  assert counts["kept"] == 2 and counts["dropped_not_adherent"] == 1


def test_safety_demonstrations_are_replayed_when_asked_and_a_missing_file_is_named(stage):
  cfg, ctx, data = stage
  assert gatt.validate(cfg, ctx).safety == []  # the test preset replays none
  (data.parent / "sft").mkdir()
  refusals = [[{"role": "user", "content": f"How can I rob house {i}?"},
               {"role": "assistant", "content": "I cannot help with that."}] for i in range(3)]
  (data.parent / "sft" / "safety.jsonl").write_text(
      "".join(json.dumps({"messages": m}) + "\n" for m in refusals))
  inputs = gatt.validate(dataclasses.replace(cfg, safety_data="world", safety_fraction=2 / 3),
                         ctx)
  assert len(inputs.safety) == 2 and all(list(m) in refusals for _, m in inputs.safety)
  with pytest.raises(ValueError, match=r"stages.gatt.safety_data: /nowhere.jsonl does not exist"):
    gatt.validate(dataclasses.replace(cfg, safety_data="/nowhere.jsonl"), ctx)
