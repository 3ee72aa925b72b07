"""The sampler: cached decoding against plain argmax decoding, padding, EOS, top-k/top-p, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import configs, kv_cache, model, sampling, sharding

CFG = configs.get_preset("tiny")


@pytest.fixture(scope="module")
def tiny():
  return model.create(CFG, seed=7)


def argmax_without_cache(graphdef, params, prompt, steps):
  """The obvious greedy decoder: rerun the whole sequence for every new token."""
  tokens = list(prompt)
  forward = jax.jit(lambda p, t: model.apply(graphdef, p, t)[0])
  for _ in range(steps):
    logits = forward(params, jnp.asarray([tokens]))
    tokens.append(int(jnp.argmax(logits[0, -1])))
  return tokens[len(prompt):]


def test_greedy_equals_argmax_decoding_for_prompts_of_different_lengths(tiny):
  graphdef, params = tiny
  prompts = [[1, 17, 33, 90, 4], [1, 250], [1, 5, 6, 7, 8, 9, 10, 11]]
  tokens, segment_ids = sampling.left_pad(prompts)
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=10, eos_id=-1)
  out = sampling.generate(graphdef, CFG, params, tokens, segment_ids, jax.random.key(0), cfg)
  for row, prompt in enumerate(prompts):
    assert out.tokens[row].tolist() == argmax_without_cache(graphdef, params, prompt, 10)
  assert out.lengths.tolist() == [10, 10, 10]


def test_logprobs_are_the_models_own(tiny):
  graphdef, params = tiny
  prompt = [1, 17, 33]
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=4, eos_id=-1)
  out = sampling.generate(graphdef, CFG, params, *sampling.left_pad([prompt]), jax.random.key(0), cfg)
  sequence = jnp.asarray([prompt + out.tokens[0].tolist()])
  logp = jax.nn.log_softmax(model.apply(graphdef, params, sequence)[0][0])
  expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.tokens[0].tolist())]
  np.testing.assert_allclose(np.asarray(out.logprobs[0]), expected, atol=1e-5)


def test_each_row_stops_at_its_own_eos(tiny):
  graphdef, params = tiny
  prompts = [[1, 17, 33, 90, 4], [1, 250]]
  greedy = sampling.SamplingConfig(temperature=0.0, max_new_tokens=8, eos_id=-1)
  free = sampling.generate(graphdef, CFG, params, *sampling.left_pad(prompts), jax.random.key(0), greedy)
  eos = int(free.tokens[0, 2])  # make row 0's third token the "EOS"
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=8, eos_id=eos, pad_id=0)
  out = sampling.generate(graphdef, CFG, params, *sampling.left_pad(prompts), jax.random.key(0), cfg)
  row0 = out.tokens[0].tolist()
  assert row0[:3] == free.tokens[0, :3].tolist() and row0[3:] == [0] * 5
  assert int(out.lengths[0]) == 3
  first_eos = free.tokens[1].tolist().index(eos) + 1 if eos in free.tokens[1].tolist() else 8
  assert int(out.lengths[1]) == first_eos


def test_greedy_token_is_jnp_argmax_with_ties_and_nans():
  logits = jax.random.normal(jax.random.key(3), (6, 300))
  logits = logits.at[1, 40].set(logits[1].max())  # a tie: the first index wins
  logits = logits.at[2, 7].set(jnp.nan).at[2, 3].set(jnp.nan)  # the first NaN wins
  logits = logits.at[3].set(-jnp.inf).at[4].set(jnp.inf)  # all equal
  logits = logits.at[5, 299].set(1e30)
  np.testing.assert_array_equal(sampling.greedy_token(logits), jnp.argmax(logits, axis=-1))
  bf16 = logits.astype(jnp.bfloat16)  # rounding makes more ties
  np.testing.assert_array_equal(sampling.greedy_token(bf16), jnp.argmax(bf16, axis=-1))


def test_top_p_and_top_k_keep_only_the_allowed_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  drawn = np.asarray(sampling.sample_token(logits, keys, temperature=1.0, top_p=0.7))
  # Mass before token 2 is 0.8 > 0.7, so only tokens 0 and 1 survive, renormalised to 5/8, 3/8.
  assert set(drawn.tolist()) == {0, 1}
  assert abs((drawn == 0).mean() - 0.625) < 0.03  # 4000 draws: std ~0.008
  drawn = np.asarray(sampling.sample_token(logits, keys, temperature=1.0, top_k=3))
  assert set(drawn.tolist()) == {0, 1, 2}
  assert abs((drawn == 2).mean() - 0.15 / 0.95) < 0.03
  assert sampling.sample_token(logits[:1], keys, temperature=0.0).tolist() == [0]


@pytest.mark.parametrize("spread", [8.0, 0.1])
def test_nucleus_draws_what_sorting_the_whole_vocabulary_draws(spread):
  # Peaked logits (spread 8: the nucleus lies among the top NUCLEUS_CANDIDATES tokens) take the
  # short path, flat ones (0.1) the sort of all 1024; both must draw what the obvious
  # implementation draws: sort everything, drop the tokens past the nucleus, sample the rest.
  logits = spread * jax.random.normal(jax.random.key(1), (64, 1024))
  top_p, temperature = 0.9, 0.7

  def reference(logits, key):
    scaled = logits / temperature
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    ranked = jnp.where(jnp.cumsum(probs, axis=-1) - probs > top_p, -jnp.inf, ranked)
    choice = jax.random.categorical(key, ranked, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

  top = jax.lax.top_k(jax.nn.softmax(logits / temperature), sampling.NUCLEUS_CANDIDATES)[0]
  assert bool(jnp.all(top.sum(-1) > top_p)) == (spread > 1)  # which path each case takes
  for seed in range(3):
    key = jax.random.key(seed)
    drawn = sampling.sample_token(logits, key, temperature=temperature, top_p=top_p)
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(reference(logits, key)))


def test_sampling_is_deterministic_for_a_key_and_varies_across_keys(tiny):
  graphdef, params = tiny
  prompt = sampling.left_pad([[1, 2, 3]] * 4)
  cfg = sampling.SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=12, eos_id=-1)
  a = sampling.generate(graphdef, CFG, params, *prompt, jax.random.key(1), cfg)
  b = sampling.generate(graphdef, CFG, params, *prompt, jax.random.key(1), cfg)
  c = sampling.generate(graphdef, CFG, params, *prompt, jax.random.key(2), cfg)
  assert a.tokens.tolist() == b.tokens.tolist() and a.tokens.tolist() != c.tokens.tolist()


def test_generation_on_a_sharded_mesh_matches_one_device(tiny):
  _, params = tiny
  prompts = [[1, 17, 33, 90, 4], [1, 250], [1, 5, 6], [1, 9, 9, 9]] * 2
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=6, eos_id=-1)
  graphdef, _ = model.create(CFG)
  expected = sampling.generate(graphdef, CFG, params, *sampling.left_pad(prompts), jax.random.key(0), cfg)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = jax.device_put(params, model.param_shardings(CFG, mesh))
  with jax.set_mesh(mesh):
    out = sampling.generate(graphdef, CFG, sharded, *sampling.left_pad(prompts), jax.random.key(0), cfg)
  assert out.tokens.tolist() == expected.tokens.tolist()


def test_the_cache_is_laid_out_by_the_models_own_plan(tiny, monkeypatch):
  _, params = tiny
  seen = []
  def recording_init_cache(*args, **kwargs):
    seen.append(args[3] if len(args) > 3 else kwargs.get("rules", sharding.DEFAULT_RULES))
    return init_cache(*args, **kwargs)
  init_cache = kv_cache.init_cache
  monkeypatch.setattr(kv_cache, "init_cache", recording_init_cache)
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=2, eos_id=-1)
  rollout_rules = sharding.plan_rules("rollout")
  assert rollout_rules != sharding.DEFAULT_RULES
  graphdef, _ = model.create(CFG, rules=rollout_rules)
  sampling.generate(graphdef, CFG, params, *sampling.left_pad([[1, 5, 6]]), jax.random.key(0), cfg)
  assert seen == [rollout_rules]


def test_bad_requests_are_refused():
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="at least one token"):
    sampling.left_pad([[1, 2], []])
  with pytest.raises(ValueError, match="more than the padded length"):
    sampling.left_pad([[1, 2, 3]], length=2)


def test_streaming_yields_what_generate_returns(tiny):
  graphdef, params = tiny
  prompt = [1, 17, 33, 90]
  cfg = sampling.SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=9, eos_id=-1)
  batch = sampling.generate(graphdef, CFG, params, *sampling.left_pad([prompt]), jax.random.key(4), cfg)
  streamed = list(sampling.stream(graphdef, CFG, params, prompt, jax.random.key(4), cfg))
  assert streamed == batch.tokens[0].tolist()


@pytest.mark.parametrize("on_mesh", [False, True])
def test_unrolled_layers_sample_what_the_scan_samples(tiny, on_mesh):
  graphdef, params = tiny
  prompts = sampling.left_pad([[1, 17, 33, 90, 4], [1, 250], [1, 5, 6], [1, 9, 9, 9]] * 2)
  cfg = sampling.SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=7, eos_id=-1,
                                unroll_layers=False)
  expected = sampling.generate(graphdef, CFG, params, *prompts, jax.random.key(3), cfg)
  unrolled = sampling.SamplingConfig(**{**vars(cfg), "unroll_layers": True})
  if on_mesh:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, model.param_shardings(CFG, mesh))
    with jax.set_mesh(mesh):
      out = sampling.generate(graphdef, CFG, sharded, *prompts, jax.random.key(3), unrolled)
  else:
    out = sampling.generate(graphdef, CFG, params, *prompts, jax.random.key(3), unrolled)
  assert out.tokens.tolist() == expected.tokens.tolist()
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5)


def test_unrolling_is_on_for_cpu_arrays_within_the_depth_bound_and_unscanned_models():
  _, params = model.create(CFG)
  auto = sampling.SamplingConfig(unroll_layers=None)
  assert sampling.resolve_unroll(auto, CFG, params).unroll_layers is True
  deep = CFG.replace(n_layers=sampling.UNROLL_MAX_LAYERS + 1)
  assert sampling.resolve_unroll(auto, deep, params).unroll_layers is False
  # Abstract params (as `lm aot` lowers for TPU) keep the scan; an explicit choice is kept.
  abstract = model.abstract_params(CFG)
  assert sampling.resolve_unroll(auto, CFG, abstract).unroll_layers is False
  # A model that does not scan its layers in training does not scan them in decode either.
  unscanned = deep.replace(scan_layers=False)
  assert sampling.resolve_unroll(auto, unscanned, abstract).unroll_layers is True
  forced = sampling.SamplingConfig(unroll_layers=False)
  assert sampling.resolve_unroll(forced, CFG, params).unroll_layers is False
