"""`lm convert` / `lm export` on generated checkpoints: Meta (MP 1 and 2) and Hugging Face, MHA and
GQA, round trips checked with transformers' logits, and the ways a bad input must fail."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import convert_helpers as helpers  # noqa: E402
from lm import checkpoints, model, sharding  # noqa: E402
from lm.interop import exporter, importer, safetensors_io, sources, streaming  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 320, (2, 24))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from lm.tokenizer import train_tokenizer
  text = [f"Rani {i} lives in Dazofa with {i % 7} cats and a dog named Pel." for i in range(400)]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return train_tokenizer(text, 300, path).path


def convert(kind, src, dst, **overrides):
  source = sources.open_source(kind, str(src), compute_dtype="float32", **overrides)
  return importer.import_checkpoint(source, str(dst))


def exported_logits(directory, tmp_path, **kwargs):
  out = tmp_path / "exported"
  exporter.export_hf(str(directory), str(out), max_shard_bytes=60_000, **kwargs)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  return helpers.logits(hf, TOKENS), out


def our_logits(directory, mesh=None):
  cfg, head, graphdef, params = checkpoints.load_model(directory, mesh)
  assert head == "lm"
  return np.asarray(model.apply(graphdef, params, jnp.asarray(TOKENS))[0])


@pytest.mark.parametrize("shape", sorted(helpers.SHAPES))
def test_hf_to_ours_to_hf(shape, tmp_path, tokenizer):
  cfg = helpers.SHAPES[shape]
  hf = helpers.hf_model(cfg)
  src = tmp_path / "hf"
  helpers.write_hf(hf, str(src), tokenizer)
  assert os.path.exists(src / "model.safetensors.index.json")  # several files, with an index
  convert("hf", src, tmp_path / "ours")
  expected = helpers.logits(hf, TOKENS)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
  np.testing.assert_allclose(our_logits(tmp_path / "ours", mesh), expected, atol=1e-4, rtol=0)
  got, out = exported_logits(tmp_path / "ours", tmp_path)
  assert len(glob.glob(str(out / "model-*-of-*.safetensors"))) > 1
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
  assert open(out / "tokenizer.model", "rb").read() == open(tokenizer, "rb").read()


@pytest.mark.parametrize("shape,mp", [("mha", 1), ("mha", 2), ("gqa", 1), ("gqa", 2)])
def test_meta_to_ours_to_hf(shape, mp, tmp_path, tokenizer, monkeypatch):
  if mp == 2:  # storage chunks of a few rows: every piece is written in several blocks
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 3000)
  cfg = helpers.SHAPES[shape]
  hf = helpers.hf_model(cfg, seed=mp)
  helpers.write_meta(hf, cfg, str(tmp_path / "meta"), mp, tokenizer)
  got_cfg = convert("meta", tmp_path / "meta", tmp_path / "ours", max_seq_len=cfg.max_seq_len)
  assert got_cfg.vocab_size == 320 and got_cfg.hidden_dim == 192  # from the embedding; §1.3 rule
  expected = helpers.logits(hf, TOKENS)
  np.testing.assert_allclose(our_logits(tmp_path / "ours"), expected, atol=1e-4, rtol=0)
  got, _ = exported_logits(tmp_path / "ours", tmp_path)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["meta", "hf"])
def test_bfloat16_sources(kind, tmp_path):
  """Released checkpoints are bfloat16: read without a detour through float16, stored as float32."""
  import copy
  cfg = helpers.SHAPES["gqa"]
  reference = helpers.hf_model(cfg)
  with torch.no_grad():
    for p in reference.parameters():
      p.copy_(p.bfloat16().float())
  # Parameters only: `.to(bfloat16)` would also round the RoPE frequency buffer.
  hf = copy.deepcopy(reference)
  for p in hf.parameters():
    p.data = p.data.bfloat16()
  if kind == "meta":
    helpers.write_meta(hf, cfg, str(tmp_path / "src"), 2, None)
  else:
    helpers.write_hf(hf, str(tmp_path / "src"), None)
  assert str(sources.open_source(kind, str(tmp_path / "src")).read("lm_head.weight").dtype) == "bfloat16"
  convert(kind, tmp_path / "src", tmp_path / "ours")
  assert checkpoints.read_model_info(tmp_path / "ours")[0].param_dtype == "float32"
  got, _ = exported_logits(tmp_path / "ours", tmp_path)
  np.testing.assert_allclose(got, helpers.logits(reference, TOKENS), atol=1e-5, rtol=0)


def test_rms_eps_trap_is_kept_and_flagged(tmp_path):
  """A config.json with rms_norm_eps 1e-6 (the shipped Llama-2-hf value, LLAMA2.md §1.5): the
  converter keeps the file's value, warns, and the wrong eps is far outside the parity tolerance,
  so the round-trip tests would catch a converter that silently changed it."""
  cfg = helpers.SHAPES["mha"].replace(norm_eps=1e-6)
  hf = helpers.hf_model(cfg)
  helpers.write_hf(hf, str(tmp_path / "hf"), None)
  source = sources.open_source("hf", str(tmp_path / "hf"), compute_dtype="float32")
  assert source.cfg.norm_eps == 1e-6 and "1e-5" in sources.eps_warning(source.cfg, "config.json")
  assert sources.eps_warning(cfg.replace(norm_eps=1e-5), "config.json") is None
  importer.import_checkpoint(source, str(tmp_path / "ours"))
  got, out = exported_logits(tmp_path / "ours", tmp_path)
  assert json.loads(open(out / "config.json").read())["rms_norm_eps"] == 1e-6
  expected = helpers.logits(hf, TOKENS)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
  # Small activations make the eps visible: the same weights with 1e-5 miss the tolerance.
  tokens = torch.from_numpy(TOKENS)
  with torch.no_grad():
    hf.model.embed_tokens.weight.mul_(1e-3)
    small = hf(tokens).logits.numpy()
    hf.config.rms_norm_eps = 1e-5
    for module in hf.modules():
      if hasattr(module, "variance_epsilon"):
        module.variance_epsilon = 1e-5
    other = hf(tokens).logits.numpy()
  assert np.abs(small - other).max() > 1e-3
  # --norm_eps overrides the file's value.
  assert sources.open_source("hf", str(tmp_path / "hf"), norm_eps=1e-5).cfg.norm_eps == 1e-5


def test_meta_params_json_eps_and_vocab(tmp_path):
  cfg = helpers.SHAPES["gqa"]
  hf = helpers.hf_model(cfg)
  helpers.write_meta(hf, cfg, str(tmp_path / "meta"), 1, None, norm_eps=1e-6)
  source = sources.open_source("meta", str(tmp_path / "meta"))
  assert source.cfg.norm_eps == 1e-6 and sources.eps_warning(source.cfg, "params.json")
  params = json.loads(open(tmp_path / "meta" / "params.json").read())
  params["vocab_size"] = 32000
  json.dump(params, open(tmp_path / "meta" / "params.json", "w"))
  with pytest.raises(ValueError, match=r"vocab_size=32000.*'tok_embeddings.weight' has 320 rows"):
    sources.open_source("meta", str(tmp_path / "meta"))


def test_scalar_head_exports_its_backbone(tmp_path):
  cfg = helpers.SHAPES["gqa"]
  graphdef, params = model.create(cfg, seed=3, head="scalar")
  checkpoints.save_model(tmp_path / "rm", params, cfg, head="scalar")
  out = tmp_path / "hf"
  notes = exporter.export_hf(str(tmp_path / "rm"), str(out))
  assert any("score" in note and "skipped" in note for note in notes)
  backbone = transformers.LlamaModel.from_pretrained(str(out)).eval()
  with torch.no_grad():
    expected = backbone(torch.from_numpy(TOKENS)).last_hidden_state.numpy()
  ours, _ = nnx_merge(graphdef, params).hidden_states(jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def nnx_merge(graphdef, params):
  from flax import nnx
  return nnx.merge(graphdef, params)


# --- bad inputs -------------------------------------------------------------------------------

class _Payload:
  def __reduce__(self):
    return (os.system, ("touch /tmp/lm_convert_pwned",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
  cfg = helpers.SHAPES["mha"]
  helpers.write_meta(helpers.hf_model(cfg), cfg, str(tmp_path), 1, None)
  state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
  if os.path.exists("/tmp/lm_convert_pwned"):
    os.remove("/tmp/lm_convert_pwned")
  torch.save(dict(state, extra=_Payload()), tmp_path / "consolidated.00.pth")
  with pytest.raises(ValueError, match=r"consolidated\.00\.pth: refused"):
    sources.open_source("meta", str(tmp_path))
  assert not os.path.exists("/tmp/lm_convert_pwned")
  # Plain values the weights-only unpickler allows are refused too: only tensors are expected.
  torch.save(dict(state, step=3), tmp_path / "consolidated.00.pth")
  with pytest.raises(ValueError, match=r"consolidated\.00\.pth: refused: entry 'step' is a int"):
    sources.open_source("meta", str(tmp_path))


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
  cfg = helpers.SHAPES["gqa"]
  hf = helpers.hf_model(cfg)
  src = tmp_path / "hf"
  helpers.write_hf(hf, str(src), None, max_shard_size="10GB")
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  write = lambda tensors: safetensors_io.write(
      src / "model.safetensors", [(k, v.dtype, v.shape) for k, v in tensors.items()],
      tensors.values())

  write({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
    sources.open_source("hf", str(src))
  write(dict(state, **{"model.layers.0.bias": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.bias'\]"):
    sources.open_source("hf", str(src))
  write(dict(state, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
  with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                       r"\(64, 64\), config.json implies \(16, 64\)"):
    sources.open_source("hf", str(src))
  write(state)
  config = json.loads(open(src / "config.json").read())
  json.dump(dict(config, vocab_size=32000), open(src / "config.json", "w"))
  with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' has shape \(320, 64\), "
                                       r"config.json implies \(32000, 64\)"):
    sources.open_source("hf", str(src))


def test_meta_shape_disagreeing_with_params_json(tmp_path):
  cfg = helpers.SHAPES["mha"]
  helpers.write_meta(helpers.hf_model(cfg), cfg, str(tmp_path), 2, None)
  params = json.loads(open(tmp_path / "params.json").read())
  json.dump(dict(params, multiple_of=256), open(tmp_path / "params.json", "w"))
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                       r"\(192, 64\), params.json implies \(256, 64\)"):
    sources.open_source("meta", str(tmp_path))


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
  cfg = helpers.SHAPES["mha"]
  helpers.write_hf(helpers.hf_model(cfg), str(tmp_path / "hf"), None)
  source = sources.open_source("hf", str(tmp_path / "hf"))
  reads = []
  real_read = source.read

  def failing_read(name):
    reads.append(name)
    if len(reads) == 7:
      raise KeyboardInterrupt
    return real_read(name)

  monkeypatch.setattr(source, "read", failing_read)
  with pytest.raises(KeyboardInterrupt):
    importer.import_checkpoint(source, str(tmp_path / "ours"))
  assert os.listdir(tmp_path) == ["hf"]  # neither DST nor the scratch directory
  with pytest.raises(FileNotFoundError):
    checkpoints.read_model_info(tmp_path / "ours")
  # A finished DST is not overwritten unless asked.
  importer.import_checkpoint(sources.open_source("hf", str(tmp_path / "hf")), str(tmp_path / "ours"))
  with pytest.raises(FileExistsError, match="--overwrite"):
    importer.import_checkpoint(sources.open_source("hf", str(tmp_path / "hf")),
                               str(tmp_path / "ours"))
  importer.import_checkpoint(sources.open_source("hf", str(tmp_path / "hf")),
                             str(tmp_path / "ours"), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["hf", "ours"]


def test_command_line_convert_sample_export(tmp_path, tokenizer):
  """The verbs as a user runs them: convert a Meta directory, sample from it, export it, and load
  the export (weights and tokenizer) with transformers."""
  import subprocess
  import sys
  cfg = helpers.SHAPES["gqa"]
  hf = helpers.hf_model(cfg)
  helpers.write_meta(hf, cfg, str(tmp_path / "meta"), 2, tokenizer)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  run = lambda *args: subprocess.run([sys.executable, "-m", "lm.cli", *args], env=env,
                                     capture_output=True, text=True, timeout=300)
  ours, back = str(tmp_path / "ours"), str(tmp_path / "back")
  done = run("convert", "--from=meta", str(tmp_path / "meta"), ours, "--compute_dtype=float32")
  assert done.returncode == 0, done.stderr[-2000:]
  again = run("convert", "--from=meta", str(tmp_path / "meta"), ours)
  assert again.returncode != 0 and "--overwrite" in again.stderr
  sampled = run("sample", f"--checkpoint={ours}", "--prompt=Rani lives in", "--max_new_tokens=4",
                "--temperature=0")
  assert sampled.returncode == 0 and "output ids:" in sampled.stdout, sampled.stderr[-2000:]
  done = run("export", "--to=hf", ours, back, "--max_shard_size=100KB")
  assert done.returncode == 0, done.stderr[-2000:]
  got = helpers.logits(transformers.LlamaForCausalLM.from_pretrained(back).eval(), TOKENS)
  np.testing.assert_allclose(got, helpers.logits(hf, TOKENS), atol=1e-5, rtol=0)
  text = "Rani lives in Dazofa with 3 cats."
  from lm.tokenizer import Tokenizer
  assert (transformers.AutoTokenizer.from_pretrained(back)(text).input_ids
          == Tokenizer(tokenizer).encode(text, bos=True))
