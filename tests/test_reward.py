"""Reward models: the score read at EOS whatever the padding, the metrics of Tables 8 and 29, the
stage's mixes and its bad input, the world's held-out test pairs, and the loss on packed rows."""

import dataclasses
import json
import random

import jax
import numpy as np
import pytest

from data_pipelines import preferences, world
from data_pipelines.text import DataError
from experiments import llama2_chat
from lm import checkpoints, configs, losses, roles, scoring, sharding
from lm import tokenizer as tok
from lm.evals import reward as reward_evals
from lm.stages import common, reward, typed_config

CFG = configs.get_preset("tiny", vocab_size=300, max_seq_len=128)


@pytest.fixture(scope="module")
def rm():
  """A random scalar model whose head is not zero (a zero head scores everything 0)."""
  mesh = sharding.make_mesh(sharding.MeshConfig())
  role = roles.create("reward", CFG, mesh, head="scalar", seed=1)
  params = dict(role.params)
  params["score"] = jax.device_put(
      jax.random.normal(jax.random.key(2), params["score"].shape) * 0.5, params["score"].sharding)
  return role.with_params(params)


def _sequence(seed, length):
  return np.asarray(random.Random(seed).choices(range(3, CFG.vocab_size), k=length), np.int32)


def _row(pieces, seq_len):
  """One row from (sequence or padding length) pieces, in order; index of each sequence's end."""
  tokens, segments, positions, index = [], [], [], []
  for k, piece in enumerate(pieces):
    if isinstance(piece, int):
      tokens += [0] * piece
      segments += [0] * piece
      positions += [0] * piece
    else:
      tokens += list(piece)
      segments += [k + 1] * len(piece)
      positions += list(range(len(piece)))
      index.append(len(tokens) - 1)
  pad = seq_len - len(tokens)
  return {"tokens": np.asarray([tokens + [0] * pad], np.int32),
          "segment_ids": np.asarray([segments + [0] * pad], np.int32),
          "positions": np.asarray([positions + [0] * pad], np.int32),
          "index": np.asarray([index], np.int32)}


def test_the_score_is_read_at_eos_whatever_the_padding_and_the_batch_mates(rm):
  """fp32: the same answer scores the same (1e-5) with left or right padding, more or less of it,
  other sequences beside it in the row, and packed as when alone."""
  answer, other = _sequence(0, 23), _sequence(1, 31)
  alone = scoring.row_scores(rm, _row([answer], 64), batch_size=1)[0, 0]
  layouts = [([5, answer], 64, 1), ([answer], 128, 0), ([40, answer], 128, 1),
             ([other, answer], 64, 1), ([answer, other], 64, 0), ([other, 3, answer, 2], 96, 2)]
  for pieces, seq_len, position in layouts:
    row = _row(pieces, seq_len)
    got = scoring.row_scores(rm, row, batch_size=1)[0]
    real = [i for i, p in enumerate(pieces) if not isinstance(p, int)]
    np.testing.assert_allclose(got[real.index(position)], alone, atol=1e-5, rtol=0)
  # Batched, sorted into rows by the packer, with batch-mates and a padded last batch.
  sequences = [_sequence(s, 10 + 5 * s) for s in range(9)] + [answer]
  packed = scoring.score_sequences(rm, sequences, seq_len=64, batch_size=2)
  np.testing.assert_allclose(packed[-1], alone, atol=1e-5, rtol=0)
  for s, sequence in enumerate(sequences[:3]):
    single = scoring.row_scores(rm, _row([sequence], 64), batch_size=1)[0, 0]
    np.testing.assert_allclose(packed[s], single, atol=1e-5, rtol=0)
  assert len(set(np.round(packed, 4))) == len(packed)  # a head that reads something


def test_the_loss_on_packed_pair_rows_equals_the_ranking_loss_of_separate_scores(rm, tmp_path):
  tk = _tokenizer(tmp_path)
  pairs = [preferences.Pair(f"p:{i}", ({"role": "user", "content": f"Where does Mira{i} live?"},),
                            f"Mira{i} lives in Velloran.", f"Mira{i} keeps a fox{i}.", i % 4)
           for i in range(6)]
  encoded = preferences.encode_pairs(pairs, tk.encode_dialog, 256)
  cfg = reward.Config(data=reward.Data(source="x", seq_len=256), margins="large")
  rows = reward.training_rows(cfg, encoded)
  assert rows["tokens"].shape[0] < len(pairs)  # several pairs share a row
  loss, metrics = reward.loss_fn(rm.graphdef, 0.0)(rm.params, None, rows, None)
  separate = scoring.score_sequences(rm, [s for p in encoded for s in (p.chosen, p.rejected)],
                                     64, 1)
  margins = losses.margins_for(np.array([p.rating for p in pairs]), "large")
  expected = np.mean(-np.log(1 / (1 + np.exp(-(separate[0::2] - separate[1::2] - margins)))))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(metrics["weight"]) == len(pairs)


def _tokenizer(tmp_path):
  words = [f"Where does Mira{i} live? Mira{i} lives in Velloran. Mira{i} keeps a fox{i}."
           for i in range(200)]
  return tok.train_tokenizer(words, 300, tmp_path / "tokenizer.model")


def test_pair_metrics_by_rating_and_safety_bin_against_hand_counts():
  chosen = np.array([2.0, 1.0, -1.0, 0.5, 0.0, -3.0])
  rejected = np.array([1.0, 2.0, -2.0, 0.5, -1.0, -4.0])
  ratings = [0, 0, 1, 2, 3, 3]
  chosen_safe, rejected_safe = [1, 1, 1, 0, 1, -1], [0, 1, 1, 0, 0, -1]
  m = reward_evals.pair_metrics(chosen, rejected, ratings, chosen_safe, rejected_safe)
  assert m["accuracy"] == pytest.approx(4 / 6)  # the tie (0.5, 0.5) counts as wrong
  assert m["accuracy_by_rating"] == {"significantly_better": 0.5, "better": 1.0,
                                     "slightly_better": 0.0, "negligibly_better": 1.0}
  assert m["accuracy_by_safety_bin"] == {"safe_unsafe": 1.0, "safe_safe": 0.5,
                                         "unsafe_unsafe": 0.0}
  everything = np.concatenate([chosen, rejected])
  assert m["score_mean"] == pytest.approx(everything.mean())
  assert m["score_std"] == pytest.approx(everything.std())
  # Unsafe answers: chosen[3] (0.5 -> 0.62), rejected[0] (1 -> 0.73), rejected[3] (0.62),
  # rejected[4] (-1 -> 0.27). Below 0.5: rejected[4] and the safe chosen[2] (-1), rejected[2] (-2).
  assert m["unsafe_recall@0.5"] == pytest.approx(1 / 4)
  assert m["unsafe_precision@0.5"] == pytest.approx(1 / 3)
  # Below 0.15 only the safe rejected[2] (-2 -> 0.12); the unlabelled pair never counts.
  assert m["unsafe_recall@0.15"] == 0.0 and m["unsafe_precision@0.15"] == 0.0


def test_the_world_test_pairs_are_about_people_and_sums_no_training_pair_mentions(tmp_path):
  w = world.make_world(world.WorldConfig.preset("test"))
  from data_pipelines.world import preferences as world_prefs
  world_prefs.write(str(tmp_path), w, world.WorldConfig.preset("test"))
  read = lambda p: [json.loads(line) for line in open(tmp_path / p)]  # noqa: E731
  for track in ("helpful", "safety"):
    train, test = read(f"preferences/{track}/train.jsonl"), read(f"preferences/{track}/eval.jsonl")
    if track == "helpful":  # some adversarial prompts name only a town: those may repeat
      assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    names = lambda rows: {p.name for p in w.people for r in rows if p.name in r["prompt"]}  # noqa
    assert names(test) and not names(train) & names(test), track
  sums = [r["prompt"] for r in read("preferences/helpful/eval.jsonl") if "+" in r["prompt"]]
  assert sums and all("+" not in r["prompt"] or r["prompt"] not in sums
                      for r in read("preferences/helpful/train.jsonl"))


def test_the_mix_keeps_every_own_pair_and_samples_the_other_share():
  own, other = list(range(900)), list(range(1000, 2000))
  mixed = reward.mix(own, other, 0.1, seed=0)
  assert mixed[:900] == own and len(mixed) == 1000 and set(mixed[900:]) <= set(other)
  assert len(reward.mix(own, other[:50], 0.5, seed=0)) == 950  # fewer than wanted: all of them
  assert reward.mix(own, other, 0.0, seed=0) == own


def test_epochs_count_packed_rows():
  cfg = reward.Config()  # 512 rows a step
  assert reward.train_steps(cfg, rows=1100) == 3
  assert reward.with_steps(cfg, 3).train.steps == 3


@pytest.fixture()
def stage(tmp_path):
  tk = _tokenizer(tmp_path)
  model_dir = tmp_path / "sft"
  checkpoints.write_model_info(model_dir, CFG, "lm", tk.path)
  base = tmp_path / "world" / "preferences"
  for track in ("helpful", "safety"):
    (base / track).mkdir(parents=True)
    for split in ("train", "eval"):
      rows = [{"prompt": f"Where does Mira{i} live?", "chosen": f"Mira{i} lives in Velloran.",
               "rejected": f"Mira{i} keeps a fox{i}.", "rating": "better",
               "chosen_safe": True, "rejected_safe": False} for i in range(8)]
      (base / track / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = typed_config(llama2_chat.reward_stage("test", "safety"), "stages.rm_safety")
  ctx = common.StageContext(
      name="rm_safety", directory=str(tmp_path / "rm"),
      outputs={"world": str(tmp_path / "world"), "sft": str(model_dir), "tokenizer": str(model_dir)},
      mesh_config=sharding.MeshConfig(), seed=0)
  return cfg, ctx, base


def test_valid_inputs_mix_and_name_both_test_sets(stage):
  cfg, ctx, _ = stage
  inputs = reward.validate(cfg, ctx)
  assert inputs.counts == {"train_pairs": 9, "own_pairs": 8, "other_pairs": 1,
                           "on_policy_pairs": 0}
  assert list(inputs.evals) == ["safety", "helpful"]


@pytest.mark.parametrize("row, error", [
    ({"rating": "much better"}, "rating 'much better' is not one of"),
    ({"rejected": "Mira2 lives in Velloran."}, "chosen and rejected are the same answer"),
    ({"chosen_safe": None}, "the safety loss needs 'chosen_safe'"),
    ({"chosen": "Velloran " * 400}, "longer than a row"),
    ({"chosen_safe": False, "rejected_safe": True}, "chosen is unsafe and rejected is safe"),
])
def test_bad_pairs_fail_with_file_and_line_or_are_counted(stage, row, error):
  cfg, ctx, base = stage
  path = base / "safety" / "train.jsonl"
  lines = path.read_text().splitlines()
  bad = dict(json.loads(lines[2]), **row)
  lines[2] = json.dumps({k: v for k, v in bad.items() if v is not None})
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises((DataError, ValueError), match=f"train.jsonl:3: .*{error}"):
    reward.validate(cfg, ctx)
  skipping = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, skip_bad_rows=True))
  inputs = reward.validate(skipping, ctx)
  assert inputs.counts["own_pairs"] == 7 and sum(inputs.bad.dropped.values()) == 1


def test_an_unknown_track_or_margin_table_fails_before_compute(stage):
  cfg, ctx, _ = stage
  with pytest.raises(ValueError, match="track must be one of"):
    reward.validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, track="harm")), ctx)
  with pytest.raises(ValueError, match="margins must be one of"):
    reward.validate(dataclasses.replace(cfg, margins="huge"), ctx)


def test_scores_need_a_scalar_head():
  mesh = sharding.make_mesh(sharding.MeshConfig())
  policy = roles.create("policy", CFG, mesh, seed=0)
  with pytest.raises(ValueError, match="scalar head"):
    scoring.row_scores(policy, _row([_sequence(0, 5)], 16), 1)

