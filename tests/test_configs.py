"""Model presets and parameter counting against the published Llama 2 sizes."""

import pytest

from lm import configs


@pytest.mark.parametrize("name, expected", [
    ("7b", 6_738_415_616), ("13b", 13_015_864_320), ("70b", 68_976_648_192),
    # Llama 2 34B was not released; Code Llama 34B has its shape (dim 8192, 48 layers, GQA 64/8,
    # ffn 22016, vocab 32000) and 33,743,970,304 parameters.
    ("34b", 33_743_970_304),
])
def test_parameter_counts_match_the_released_models(name, expected):
  assert configs.param_count(configs.PRESETS[name]) == expected


@pytest.mark.parametrize("name, ffn", [("7b", 11008), ("13b", 13824), ("34b", 22016), ("70b", 28672)])
def test_ffn_width_rule(name, ffn):
  assert configs.PRESETS[name].hidden_dim == ffn


def test_gqa_only_on_34b_and_70b():
  assert configs.PRESETS["7b"].kv_heads == 32 and configs.PRESETS["13b"].kv_heads == 40
  assert configs.PRESETS["34b"].kv_heads == 8 and configs.PRESETS["70b"].kv_heads == 8
  assert all(configs.PRESETS[n].head_dim == 128 for n in ("7b", "13b", "34b", "70b"))


def test_bench_preset_shape():
  cfg = configs.PRESETS["bench-50M"]
  assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == (
      32000, 512, 8, 8, 2, 1536)


@pytest.mark.parametrize("fields, message", [
    (dict(dim=100, n_heads=8), "not divisible by n_heads"),
    (dict(n_heads=8, n_kv_heads=3), "not a multiple of n_kv_heads"),
    (dict(remat="sometimes"), "remat"),
    (dict(attention="flash"), "attention"),
    (dict(compute_dtype="float99"), "compute_dtype"),
])
def test_bad_configs_say_what_is_wrong(fields, message):
  with pytest.raises(ValueError, match=message):
    configs.ModelConfig(**fields)


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown model preset"):
    configs.get_preset("8b")
  with pytest.raises(ValueError, match="unknown ModelConfig fields"):
    configs.ModelConfig.from_dict({"dim": 64, "n_head": 8})


def test_dict_round_trip():
  cfg = configs.PRESETS["70b"]
  assert configs.ModelConfig.from_dict(cfg.to_dict()) == cfg
