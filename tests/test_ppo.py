"""PPO: the experience (log-probs, whitened scores, advantages), the update's direction, the
prompt schedule, exact resume from any phase, and bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.preferences import Prompt
from experiments import llama2_chat
from lm import checkpoints, configs, rl, roles, rollout, sampling, sharding
from lm import tokenizer as tok
from lm.stages import common, ppo, ppo_models, typed_config
from lm.stages import ppo_experience as experience

MESH = sharding.MeshConfig()  # fsdp over the 8 test devices
WORDS = ["Mira", "Tika", "lives", "keeps", "a", "fox", "dog", "cat", "in", "Velloran", "is", "old",
         "years", "cannot", "help", "with", "that", "How", "What", "pet", "does", "steal", "I"]


# ---------------------------------------------------------------------------------------------
# The experience.

def test_per_token_logprobs_are_the_rollouts_own():
  cfg = configs.get_preset("tiny", compute_dtype="float32", param_dtype="float32")
  policy = roles.create("policy", cfg, sharding.make_mesh(MESH), seed=2)
  prompts = [[1, 17, 33, 90, 4], [1, 250], [1, 5, 6, 7, 8, 9, 10, 11], [1, 40, 41]] * 2
  samples = rollout.generate(policy, prompts, sampling.SamplingConfig(
      temperature=1.0, top_p=1.0, max_new_tokens=7, eos_id=3), jax.random.key(0), batch_size=8)
  rows = rollout.training_rows(samples, 32)
  logp = experience.per_token(policy, rows, batch_size=8)
  on = rows["answer_mask"] > 0
  # The sampler's log-probs at temperature 1 and a teacher-forced pass, fp32: rounding only.
  np.testing.assert_allclose(logp[on], rows["logprobs"][on], atol=2e-5)
  assert on.sum() == samples.lengths.sum()


def test_whitened_scores_by_batch_by_rm_stats_and_raw():
  scores = {"reward": np.array([0.2, 0.5, 0.9, 0.1]), "safety": np.array([0.9, 0.8, 0.95, 0.1]),
            "helpful": np.array([0.2, 0.5, 0.9, 0.7])}
  is_safety = np.array([False, True, False, False])
  raw = np.log(scores["reward"] / (1 - scores["reward"]))
  batch = experience.whitened_scores(scores, is_safety, "batch")
  np.testing.assert_allclose(batch, (raw - raw.mean()) / raw.std(), atol=1e-5)
  np.testing.assert_allclose(experience.whitened_scores(scores, is_safety, "none"), raw, atol=1e-6)
  stats = {"helpful": (1.0, 2.0), "safety": (-1.0, 4.0)}
  # Row 1 is a safety prompt and row 3's safety score is under 0.15: their R_c is the safety RM's.
  expected = (raw - np.array([1.0, -1.0, 1.0, -1.0])) / np.array([2.0, 4.0, 2.0, 4.0])
  np.testing.assert_allclose(experience.whitened_scores(scores, is_safety, "rm", 0.15, stats),
                             expected, atol=1e-5)


def test_advantages_program_is_eq4_then_gae_then_whitening():
  rng = np.random.default_rng(0)
  mask = np.zeros((3, 8), np.float32)
  mask[0, 2:6], mask[1, 4:8], mask[2, 1:2] = 1, 1, 1
  logp, ref, values = (rng.normal(size=(3, 8)).astype(np.float32) for _ in range(3))
  score = np.array([1.0, -0.5, 0.3], np.float32)
  out = experience.advantages_program(score, logp, ref, values, mask, beta=0.1, gamma=1.0,
                                      lam=0.9)
  rewards = rl.token_rewards(score, logp, ref, mask, 0.1)
  advantages, returns = rl.gae(rewards, values, mask, 1.0, 0.9)
  np.testing.assert_allclose(out["rewards"], rewards, atol=1e-6)
  np.testing.assert_allclose(out["returns"], returns, atol=1e-6)
  np.testing.assert_allclose(out["advantages"], rl.whiten(advantages, mask), atol=1e-5)
  on = mask > 0
  assert float(out["kl_sequence"]) == pytest.approx((logp - ref)[on].sum() / 3, rel=1e-5)
  assert float(out["kl_reward"]) == pytest.approx(-0.1 * float(out["kl_sequence"]), rel=1e-5)


def test_an_update_raises_the_logprob_of_advantaged_tokens_and_fits_the_value():
  """Rows 0-3 carry advantage +1, rows 4-7 -1; three steps at ratio 1 from the start."""
  cfg = configs.get_preset("tiny", compute_dtype="float32", param_dtype="float32")
  mesh = sharding.make_mesh(MESH)
  stage_cfg = typed_config(llama2_chat.ppo_stage("test", "rs_v1"), "stages.ppo")
  stage_cfg = dataclasses.replace(
      stage_cfg, ppo=dataclasses.replace(stage_cfg.ppo, iterations=3, prompts_per_iteration=8,
                                         minibatch_size=8),
      optimizer=dataclasses.replace(stage_cfg.optimizer, lr=3e-3))
  tr = ppo_models.build_trainer(stage_cfg, cfg, cfg, mesh)
  policy = roles.create("policy", cfg, mesh, seed=1)
  value = roles.create("value", cfg, mesh, head="scalar", seed=2)
  tokens = np.random.default_rng(0).integers(4, 250, (8, 16)).astype(np.int32)
  mask = np.zeros((8, 16), np.float32)
  mask[:, 6:12] = 1
  rows = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
          "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
          "segment_ids": np.ones((8, 16), np.int32), "answer_mask": mask}
  logp = lambda params: experience.per_token(policy.with_params(params), rows, 8)  # noqa: E731
  old = logp(policy.params)
  sign = np.where(np.arange(8) < 4, 1.0, -1.0)[:, None] * mask
  batch = dict(rows, old_logprobs=old, old_values=np.zeros((8, 16), np.float32),
               advantages=sign.astype(np.float32), returns=(2.0 * mask).astype(np.float32))
  state = tr.init_state({"policy": policy.params, "value": value.params})
  first = None
  for _ in range(3):
    state, metrics = tr.step(state, batch)
    first = first or {k: float(v) for k, v in metrics.items()}
  # At ratio 1 the surrogate is -mean(A) = 0 here, nothing is clipped, and the value (0) misses
  # its target 2 by 2: value loss 0.5 * 2^2.
  assert first["policy_loss"] == pytest.approx(0.0, abs=1e-6) and first["clip_fraction"] == 0.0
  assert first["value_loss"] == pytest.approx(2.0, abs=1e-5)
  change = (logp(state.params["policy"]) - old)[mask > 0].reshape(8, 6).mean(axis=1)
  assert (change[:4] > 0).all() and (change[4:] < 0).all()
  values = experience.per_token(value.with_params(state.params["value"]), rows, 8)
  # Towards its target 2; once past old_values + 0.2 the clipped error is the larger one and
  # gives no gradient, so it stops short (the first Adam step alone overshoots the clip here).
  assert 0.0 < values[mask > 0].mean() < 1.0


# ---------------------------------------------------------------------------------------------
# The prompt schedule.

def test_iteration_prompts_walk_each_pool_once_per_pass_and_keep_the_safety_share():
  prompts = [Prompt(f"p:{i}", (), is_safety=i % 4 == 0) for i in range(20)]
  first_pass = [i for it in range(5) for i in ppo.iteration_prompts(prompts, -1, 4, it, 0)]
  assert sorted(first_pass) == list(range(20))
  assert ppo.iteration_prompts(prompts, -1, 4, 7, 0) == ppo.iteration_prompts(prompts, -1, 4, 7, 0)
  assert ppo.iteration_prompts(prompts, -1, 4, 7, 0) != ppo.iteration_prompts(prompts, -1, 4, 7, 1)
  for it in range(6):
    picked = ppo.iteration_prompts(prompts, 0.5, 8, it, 0)
    assert sum(prompts[i].is_safety for i in picked) == 4 and len(picked) == 8


# ---------------------------------------------------------------------------------------------
# The stage on tiny random models: resume, outputs, bad input.

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tokenizer, a random policy, two random reward models (random heads, so rewards vary),
  and prompts; returns (outputs, vocabulary)."""
  root = tmp_path_factory.mktemp("ppo_world")
  text = [" ".join(np.random.default_rng(i).choice(WORDS, 8)) for i in range(400)]
  tk = tok.train_tokenizer(text, 400, root / "tokenizer.model")
  cfg = configs.get_preset("tiny", vocab_size=400, compute_dtype="float32", param_dtype="float32")
  mesh = sharding.make_mesh(MESH)
  policy = roles.create("policy", cfg, mesh, seed=5)
  checkpoints.save_model(root / "rs_v1", policy.params, cfg, tokenizer_path=tk.path)
  for seed, name in ((6, "rm_helpful"), (7, "rm_safety")):
    rm = roles.create(name, cfg, mesh, head="scalar", seed=seed)
    params = dict(rm.params, score=jax.random.normal(jax.random.key(seed), (cfg.dim,)) * 0.5)
    checkpoints.save_model(root / name, params, cfg, head="scalar")
    (root / name / "reward.json").write_text(json.dumps({"score_mean": 0.1, "score_std": 2.0}))
  (root / "world" / "prompts").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("eval", 8)):
    (root / "world" / "prompts" / f"{split}.jsonl").write_text("".join(json.dumps({
        "prompt": " ".join(rng.choice(WORDS, 5)) + "?", "is_safety": bool(i % 3 == 0),
        "category": "illicit and criminal activities" if i % 3 == 0 else "",
        "answer": "" if i % 3 == 0 else "Velloran"}) + "\n" for i in range(n)))
  outputs = {name: str(root / name) for name in ("world", "rs_v1", "rm_helpful", "rm_safety")}
  outputs["tokenizer"] = str(root / "rs_v1")
  return outputs


def small_config(**ppo_overrides):
  cfg = typed_config(llama2_chat.ppo_stage("test", "rs_v1"), "stages.ppo")
  return dataclasses.replace(
      cfg, data=dataclasses.replace(cfg.data, seq_len=64),
      rollout=dataclasses.replace(cfg.rollout, max_new_tokens=8, batch_size=8,
                                  scoring_batch_size=8),
      reward=dataclasses.replace(cfg.reward, seq_len=64, batch_size=8),
      ppo=dataclasses.replace(cfg.ppo, **{**dict(iterations=3, prompts_per_iteration=16,
                                                 minibatch_size=8), **ppo_overrides}),
      eval=dataclasses.replace(cfg.eval, every=2, max_new_tokens=8, batch_size=8),
      checkpoint_every=1)


def context(world, directory):
  return common.StageContext("ppo", str(directory), dict(world), MESH, 0)


class Killed(Exception):
  pass


def iteration_rows(directory):
  rows = [json.loads(l) for l in (directory / "state" / "metrics.jsonl").read_text().splitlines()]
  timing = ("seconds", "per_second", "share")
  return [{k: v for k, v in r.items() if not any(t in k for t in timing)}
          for r in rows if r["kind"] == "iteration"]


@pytest.fixture(scope="module")
def whole_run(world, tmp_path_factory):
  directory = tmp_path_factory.mktemp("ppo_whole")
  result = ppo.run(small_config(), context(world, directory), log=lambda m: None)
  return directory, result


def test_a_run_writes_a_policy_a_value_model_the_curves_and_the_report(whole_run):
  directory, result = whole_run
  assert result["iterations"] == 3 and [e["iteration"] for e in result["eval_curve"]] == [0, 2, 3]
  assert checkpoints.read_model_info(directory)[1] == "lm"
  assert checkpoints.read_model_info(directory / "value")[1] == "scalar"
  assert checkpoints.Manager(directory).all_steps() == [result["best_iteration"]]
  rows = iteration_rows(directory)
  assert len(rows) == 3 and rows[0]["kl_k1"] == pytest.approx(0.0, abs=1e-6)  # π = π_0 at first
  assert rows[-1]["kl_k3"] > 0
  assert all(result[f"{p}_seconds"] > 0 for p in ("rollout", "scoring", "update", "move"))
  assert "Where the time went" in (directory / "report.md").read_text()
  assert (directory / "ppo.png").stat().st_size > 1000


@pytest.mark.parametrize("phase", ["rollout", "scoring", "update"])
def test_killed_in_any_phase_a_run_resumes_to_the_same_iterations(world, whole_run, tmp_path,
                                                                 monkeypatch, phase):
  directory, result = whole_run
  if phase == "rollout":
    target, name = rollout, "generate"
  elif phase == "scoring":  # the evaluation before PPO reads twice; the third is iteration 1
    target, name = experience, "per_token"
  else:
    from lm import trainer
    target, name = trainer.Trainer, "step"
  real, calls = getattr(target, name), []

  def dies_on_the_third_call(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise Killed
    return real(*args, **kwargs)

  monkeypatch.setattr(target, name, dies_on_the_third_call)
  with pytest.raises(Killed):
    ppo.run(small_config(), context(world, tmp_path), log=lambda m: None)
  monkeypatch.setattr(target, name, real)
  resumed = ppo.run(small_config(), context(world, tmp_path), log=lambda m: None)
  assert iteration_rows(tmp_path) == iteration_rows(directory)
  assert resumed["eval_curve"] == result["eval_curve"]
  assert resumed["best_iteration"] == result["best_iteration"]


def test_bad_input_fails_before_any_model_is_loaded(world, tmp_path):
  ctx = context(world, tmp_path)
  with pytest.raises(ValueError, match="is not a multiple of minibatch_size"):
    small_config(prompts_per_iteration=12)
  cfg = small_config()
  with pytest.raises(ValueError, match="reward.safety is empty"):
    ppo.validate(dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, safety="")), ctx)
  with pytest.raises(ValueError, match="leaves no room for a prompt"):
    ppo.validate(dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, max_new_tokens=64)), ctx)
  with pytest.raises(ValueError, match="safety_share"):
    ppo.validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, safety_share=1.5)),
                 ctx)
  with pytest.raises(ValueError, match="neither an earlier stage"):
    ppo.validate(dataclasses.replace(cfg, value_from="rm_nope"), ctx)
  with pytest.raises(ValueError, match="'ref_nope' is neither an earlier stage"):
    ppo.validate(dataclasses.replace(cfg, reference_from="ref_nope"), ctx)
  with pytest.raises(ValueError, match=r"whiten_rewards='rm' needs .*rs_v1/reward.json"):
    ppo.validate(dataclasses.replace(
        cfg, reward=dataclasses.replace(cfg.reward, helpful="rs_v1"),
        ppo=dataclasses.replace(cfg.ppo, whiten_rewards="rm")), ctx)


def test_the_best_evaluation_is_the_stages_model_and_patience_stops_the_run(tmp_path):
  cfg = small_config()
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, patience=2))
  progress = ppo.Progress()
  params = lambda value: {"w": jnp.full((8,), value)}  # noqa: E731
  rewards = {0: 0.50, 2: 0.60, 4: 0.55, 6: 0.60, 8: 0.40}
  stopped_at = None
  for iteration, reward in rewards.items():
    ppo._record_eval(cfg, progress, iteration, {
        "rm_reward_sampled": reward, "kl_sampled": 0.0, "rm_reward": 0.0, "gold_helpful": 0.0,
        "gold_safe_rate": 0.0}, params(iteration), str(tmp_path), lambda m: None)
    if ppo._stopped(cfg, progress):
      stopped_at = iteration
      break
  # 0.60 at iteration 6 ties the best, which is not a gain: two evaluations without one stop it.
  assert stopped_at == 6 and progress.best == {"iteration": 2, "value": 0.60}
  manager = checkpoints.Manager(tmp_path)
  assert manager.all_steps() == [2]  # only the best is kept
  restored = manager.restore(2, {"w": jax.ShapeDtypeStruct((8,), jnp.float32)})["params"]
  np.testing.assert_array_equal(restored["w"], np.full((8,), 2.0))


@pytest.fixture(scope="module")
def no_reward_world(world, tmp_path_factory):
  """The world with reward models that score every answer alike (a zero score head: the
  reward removed) and a policy that starts away from the reference π_0 = rs_v1."""
  root = tmp_path_factory.mktemp("no_reward")
  cfg, _ = checkpoints.read_model_info(world["rs_v1"])
  mesh = sharding.make_mesh(MESH)
  reference = roles.load("reference", world["rs_v1"], mesh, head="lm")
  noise = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape, p.dtype),
                       reference.params, jax.tree.unflatten(jax.tree.structure(
                           reference.params), list(jax.random.split(jax.random.key(3), len(
                               jax.tree.leaves(reference.params))))))
  checkpoints.save_model(root / "drifted", noise, cfg)
  for name in ("rm_helpful", "rm_safety"):
    rm = roles.load(name, world[name], mesh, head="scalar")
    checkpoints.save_model(root / f"flat_{name}", dict(rm.params, score=jnp.zeros((cfg.dim,))),
                           cfg, head="scalar")
  return dict(world, drifted=str(root / "drifted"), flat_rm_helpful=str(root / "flat_rm_helpful"),
              flat_rm_safety=str(root / "flat_rm_safety"))


def kl_run(world, directory, beta, **fields):
  """6 iterations at a large LR with the value model starting at 0 (the flat RM): held-out KL
  to π_0 (4 samples of each of 8 prompts, a fixed key) at iterations 0, 3 and 6."""
  cfg = small_config(iterations=6, beta=beta, missing_eos_penalty=0.0)
  cfg = dataclasses.replace(
      cfg, value_from="flat_rm_helpful",
      eval=dataclasses.replace(cfg.eval, every=3, samples_per_prompt=4),
      optimizer=dataclasses.replace(cfg.optimizer, lr=3e-3), **fields)
  result = ppo.run(cfg, common.StageContext("ppo", str(directory), world, MESH, 0),
                   log=lambda m: None)
  return [e["kl_sampled"] for e in result["eval_curve"]]


def test_with_the_reward_removed_the_kl_term_alone_pulls_the_policy_back_to_pi0(
    no_reward_world, tmp_path):
  """The policy starts 0.67 nats/answer from π_0 and every answer scores alike. With β = 1 the
  KL penalty is the only signal (measured on this CPU: 0.67 -> 0.39 in 6 iterations); with
  β = 0 nothing moves but weight decay (0.672 -> 0.671)."""
  flat = dataclasses.replace(small_config().reward, helpful="flat_rm_helpful",
                             safety="flat_rm_safety")
  pulled, left = (kl_run(no_reward_world, tmp_path / str(beta), beta, init_from="drifted",
                         reference_from="rs_v1", reward=flat) for beta in (1.0, 0.0))
  assert pulled[0] == pytest.approx(left[0]) and pulled[0] > 0.3
  assert pulled[-1] < 0.75 * pulled[0]
  assert left[-1] == pytest.approx(left[0], abs=0.02)


def test_with_beta_large_the_policy_stays_near_pi0(no_reward_world, tmp_path):
  """From π_0 with the random RMs' reward: at β = 0 the KL grows every evaluation (measured
  0 -> 0.20 -> 0.48), at β = 1 it stays bounded (0 -> 0.17 -> 0.14)."""
  held, free = (kl_run(no_reward_world, tmp_path / str(beta), beta) for beta in (1.0, 0.0))
  assert held[0] == free[0] == pytest.approx(0.0, abs=1e-5)
  assert free[-1] > free[1] > 0.05
  assert held[-1] < 0.5 * free[-1]
