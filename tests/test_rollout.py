"""The one rollout path and roles: plans, teacher-forced logprobs, ordering, head swaps, moves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoints, configs, kv_cache, model, roles, rollout, sampling, sharding
from lm.evals import chat as chat_evals

CFG = configs.get_preset("tiny", compute_dtype="float32", param_dtype="float32")
PROMPTS = [[1, 17, 33, 90, 4], [1, 250], [1, 5, 6, 7, 8, 9, 10, 11], [1, 40, 41], [1, 99, 98, 97],
           [1, 3], [1, 64, 65, 66, 67, 68]]
TRAIN_MESH = (1, 1, 8, 1)    # FSDP over 8 devices
ROLLOUT_MESHES = {"replicated": (1, 8, 1, 1), "tensor_parallel": (1, 4, 1, 2)}


def mesh_of(shape):
  return sharding.make_mesh(sharding.MeshConfig(*shape))


@pytest.fixture(scope="module")
def policy():
  return roles.create("policy", CFG, mesh_of(TRAIN_MESH), plan="fsdp_tp", seed=11)


def greedy(max_new=6, eos=-1):
  return sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new, eos_id=eos)


@pytest.mark.parametrize("layout", sorted(ROLLOUT_MESHES))
def test_the_same_samples_under_the_training_plan_and_a_rollout_plan(policy, layout):
  cfg = sampling.SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=6, eos_id=-1)
  trained = rollout.generate(policy, PROMPTS, cfg, jax.random.key(3), batch_size=8)
  moved = roles.move(policy, mesh_of(ROLLOUT_MESHES[layout]), "rollout")
  assert moved.plan == "rollout" and moved.params["output"].sharding.spec[0] is None
  sampled = rollout.generate(moved, PROMPTS, cfg, jax.random.key(3), batch_size=8)
  np.testing.assert_array_equal(sampled.tokens, trained.tokens)
  # fp32; the two layouts reduce in another order across devices: rounding only.
  np.testing.assert_allclose(sampled.logprobs, trained.logprobs, atol=1e-5)


def teacher_forced_logprobs(role, samples):
  rows = rollout.training_rows(samples, length=32)
  logits, _ = jax.jit(lambda p, t, pos, seg: model.apply(
      role.graphdef, p, t, positions=pos, segment_ids=seg))(
          role.params, rows["tokens"], rows["positions"], rows["segment_ids"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  forced = np.take_along_axis(np.asarray(logp), rows["targets"][..., None], axis=-1)[..., 0]
  return rows, forced


def test_rollout_logprobs_equal_a_teacher_forced_pass_of_the_trainers_model(policy):
  """So the first PPO ratio is exactly 1: the sampler's logprob of each token it drew (under
  the model's temperature-1 distribution, whatever temperature drew it) is the training
  forward pass's, on the training plan, to fp32 rounding."""
  cfg = sampling.SamplingConfig(temperature=1.2, top_p=1.0, max_new_tokens=8, eos_id=-1)
  samples = rollout.generate(roles.move(policy, policy.mesh, "rollout"), PROMPTS, cfg,
                             jax.random.key(5), batch_size=4)
  rows, forced = teacher_forced_logprobs(policy, samples)
  mask = rows["answer_mask"] == 1
  assert mask.sum() == samples.mask.sum() == len(PROMPTS) * 8
  np.testing.assert_allclose(forced[mask], rows["logprobs"][mask], atol=1e-5)


def sampled_logprob_gap(sampler, trainer) -> float:
  """Max |logprob| gap over sampled tokens: `sampler`'s own against `trainer`'s teacher-forced."""
  cfg = sampling.SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8, eos_id=-1)
  samples = rollout.generate(sampler, PROMPTS, cfg, jax.random.key(5), batch_size=8)
  rows, forced = teacher_forced_logprobs(trainer, samples)
  return np.abs(forced - rows["logprobs"])[rows["answer_mask"] == 1].max()


def test_bf16_rollout_logprobs_stay_near_the_fp32_teacher_forced_ones(policy):
  """With bf16 compute (the real presets) the two passes round differently; stated here."""
  bf16_cfg = configs.get_preset("tiny", compute_dtype="bfloat16")
  role = roles.Role("policy", "lm", bf16_cfg, model.abstract_model(bf16_cfg)[0], policy.params,
                    policy.mesh)
  gap = sampled_logprob_gap(role, policy)
  print(f"bf16 rollout vs fp32 teacher-forced logprobs: max |diff| = {gap:.4f}")
  # Measured 0.0019 on the tiny model (fp32 agrees to 1e-5, above). bf16 keeps 8 bits of
  # mantissa (relative 2^-8 = 0.004) on logits of a few units: 0.02 bounds that rounding.
  assert gap < 0.02


def test_batching_sorting_and_padding_change_nothing(policy):
  """Rows come back in the prompts' order, each as it would alone, each stopping at its EOS."""
  together = rollout.generate(policy, PROMPTS, greedy(), jax.random.key(0), batch_size=3,
                              length_bucket=4)
  for row, prompt in enumerate(PROMPTS):
    alone = rollout.generate(policy, [prompt], greedy(), jax.random.key(0), batch_size=1,
                             length_bucket=1)
    assert together.answer(row) == alone.answer(0)
  eos = together.tokens[2, 1]  # make row 2's second token the EOS
  stopped = rollout.generate(policy, PROMPTS, greedy(eos=int(eos)), jax.random.key(0),
                             batch_size=3)
  assert stopped.answer(2) == together.answer(2)[:2] and stopped.finished[2]
  assert stopped.mask[2].tolist() == [1, 1, 0, 0, 0, 0]


def test_the_kv_cache_is_laid_out_by_the_plan():
  mesh = mesh_of(ROLLOUT_MESHES["tensor_parallel"])  # data 4, tensor 2; tiny has 2 KV heads
  with jax.set_mesh(mesh):
    cache = jax.jit(lambda: kv_cache.init_cache(CFG, 8, 16, sharding.ROLLOUT_RULES))()
  # [L, B, K, S, H]: rows over the batch axes, KV heads over `tensor`.
  assert tuple(cache.k.sharding.spec)[:3] == (None, "data", "tensor")
  assert tuple(cache.segment_ids.sharding.spec)[:1] == ("data",)


def test_a_language_model_loads_as_a_scalar_model_and_back(policy, tmp_path):
  checkpoints.save_model(tmp_path / "lm", jax.device_get(policy.params), CFG)
  reward = roles.load("rm", str(tmp_path / "lm"), policy.mesh, head="scalar")
  assert reward.head == "scalar" and "output" not in reward.params
  np.testing.assert_array_equal(reward.params["score"], np.zeros(CFG.dim))
  jax.tree.map(np.testing.assert_array_equal, reward.params["layers"],
               jax.device_get(policy.params["layers"]))
  # The same backbone: a zero head scores 0 everywhere; hidden states match the LM's.
  scores, _ = model.apply(reward.graphdef, reward.params, jnp.asarray([PROMPTS[0]]))
  np.testing.assert_array_equal(scores, 0.0)
  checkpoints.save_model(tmp_path / "rm", jax.device_get(reward.params), CFG, head="scalar")
  back = roles.load("policy", str(tmp_path / "rm"), policy.mesh, head="lm", seed=1)
  assert back.params["output"].shape == (CFG.dim, CFG.vocab_size)
  frozen = roles.load("ref", str(tmp_path / "lm"), policy.mesh, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(frozen.params)} == {jnp.dtype("bfloat16")}
  with pytest.raises(ValueError, match="unknown head 'value'"):
    roles.load("v", str(tmp_path / "lm"), policy.mesh, head="value")


def test_only_an_lm_head_generates(policy, tmp_path):
  reward = roles.Role("rm", "scalar", CFG, None, None, policy.mesh)
  with pytest.raises(ValueError, match="only an lm head generates"):
    rollout.generate(reward, PROMPTS, greedy(), jax.random.key(0))


def test_a_token_id_outside_the_vocabulary_is_refused(policy):
  with pytest.raises(ValueError, match=f"prompt 1 has token id {CFG.vocab_size}, outside"):
    rollout.generate(policy, [[1, 5], [1, CFG.vocab_size]], greedy(), jax.random.key(0))
  with pytest.raises(ValueError, match="prompt 0 has token id -1"):
    rollout.generate(policy, [[1, -1]], greedy(), jax.random.key(0))


def test_answers_match_whole_words_only():
  assert chat_evals.contains_answer("Mira is 4 years old.", 4)
  assert not chat_evals.contains_answer("Mira is 41 years old.", 4)
  assert chat_evals.contains_answer("She lives in Velloran.", "velloran")
  assert not chat_evals.contains_answer("She lives in Vellorana.", "Velloran")


def test_a_bf16_rollout_copy_reads_half_width_weights_and_leaves_the_policy_alone(policy):
  """`rollout_dtype="bfloat16"`: the rollout copy's weights and KV cache are bf16, the trainer's
  params stay fp32, and its logprobs stay near the fp32 teacher-forced ones."""
  copy = roles.in_dtype(roles.move(policy, policy.mesh, "rollout"), "bfloat16")
  assert {a.dtype for a in jax.tree.leaves(copy.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {a.dtype for a in jax.tree.leaves(policy.params)} == {jnp.dtype(jnp.float32)}
  assert copy.model_cfg.compute_dtype == "bfloat16" and policy.model_cfg.compute_dtype == "float32"
  # On CPU the copy's projection weights are [out, in] (lm/projection.py); the policy's are not.
  assert (copy.model_cfg.weight_layout, policy.model_cfg.weight_layout) == ("out_in", "in_out")
  assert copy.params["output"].shape == policy.params["output"].shape[::-1]
  gap = sampled_logprob_gap(copy, policy)
  print(f"bf16-weight rollout vs fp32 teacher-forced logprobs: max |diff| = {gap:.4f}")
  # Measured 0.0019, as above: bf16 compute already rounds each weight to bf16 where it is used,
  # so storing them in bf16 changes where the rounding happens, not how much.
  assert gap < 0.02
  with pytest.raises(ValueError, match="rollout_dtype 'bf16' must be one of"):
    roles.in_dtype(policy, "bf16")
