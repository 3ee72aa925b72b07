"""Our model against Hugging Face transformers' PyTorch Llama, from the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm import configs, convert, model, sampling  # noqa: E402

SHAPES = {
    "mha": configs.ModelConfig(vocab_size=320, dim=64, n_layers=3, n_heads=4, ffn_dim=160,
                               max_seq_len=64, compute_dtype="float32", remat="none"),
    "gqa": configs.ModelConfig(vocab_size=320, dim=64, n_layers=3, n_heads=8, n_kv_heads=2,
                               ffn_dim=160, max_seq_len=64, compute_dtype="float32", remat="none"),
}


def hf_model(cfg: configs.ModelConfig, seed: int = 0):
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
  )
  torch.manual_seed(seed)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  # Weights large enough that logits spread over several units (HF's 0.02 init gives near-zero
  # logits, which would make any tolerance meaningless); norm gains away from 1.
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
  return hf


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
