"""Our model against Hugging Face transformers' PyTorch Llama, from the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm import configs, convert, model, sampling  # noqa: E402
from convert_helpers import hf_model  # noqa: E402  (tests/ is on sys.path)

SHAPES = {
    "mha": configs.ModelConfig(vocab_size=320, dim=64, n_layers=3, n_heads=4, ffn_dim=160,
                               max_seq_len=64, compute_dtype="float32", remat="none"),
    "gqa": configs.ModelConfig(vocab_size=320, dim=64, n_layers=3, n_heads=8, n_kv_heads=2,
                               ffn_dim=160, max_seq_len=64, compute_dtype="float32", remat="none"),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request):
  cfg = SHAPES[request.param]
  hf = hf_model(cfg)
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  graphdef, _ = model.create(cfg)
  params = jax.tree.map(jnp.asarray, convert.params_from_hf(state, cfg))
  return cfg, hf, graphdef, params


def test_logits_match_transformers(pair):
  cfg, hf, graphdef, params = pair
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 40))
  with torch.no_grad():
    expected = hf(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(model.apply(graphdef, params, jnp.asarray(tokens))[0])
  assert expected.std() > 1.0  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)  # fp32 on both sides


def test_greedy_generations_match_transformers(pair):
  cfg, hf, graphdef, params = pair
  prompts = [[1, 45, 97, 12, 200, 7], [1, 3, 300, 18, 25, 61]]
  steps = 20
  with torch.no_grad():
    expected = hf.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=steps,
                           min_new_tokens=steps, pad_token_id=0)[:, len(prompts[0]):].tolist()
  sample_cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=steps, eos_id=-1)
  out = sampling.generate(graphdef, cfg, params, *sampling.left_pad(prompts), jax.random.key(0),
                          sample_cfg)
  assert out.tokens.tolist() == expected


def test_weights_round_trip_to_hf_layout(pair):
  cfg, hf, _, params = pair
  for name, array in convert.ours_to_hf(params, cfg):
    np.testing.assert_array_equal(array, hf.state_dict()[name].numpy())
