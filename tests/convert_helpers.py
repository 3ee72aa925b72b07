"""Generated checkpoints for the conversion tests: random Hugging Face models and their Meta twins.

`write_meta` is deliberately slow and literal (loops over heads and rows) so it shares no code with
the converter it checks: it undoes Hugging Face's Q/K permutation row by row and splits tensors
into model-parallel shards on the axes of LLAMA2.md §1.4.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

from lm import configs

# Widths whose SwiGLU width follows Meta's rule: int(2 * 4 * 64 / 3) = 170 -> multiple of 32 = 192.
SHAPES = {
    "mha": configs.ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, multiple_of=32,
                               max_seq_len=64, compute_dtype="float32", remat="none"),
    "gqa": configs.ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                               multiple_of=32, max_seq_len=64, compute_dtype="float32",
                               remat="none"),
}


def hf_model(cfg: configs.ModelConfig, seed: int = 0):
  """A transformers LlamaForCausalLM of `cfg`'s shape with weights large enough to spread logits."""
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
  )
  torch.manual_seed(seed)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
  return hf


def logits(hf, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.from_numpy(tokens)).logits.numpy()


def write_hf(hf, directory: str, tokenizer: str | None, max_shard_size: str = "40KB") -> None:
  """transformers' own writer: sharded safetensors with an index once past max_shard_size."""
  hf.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
  if tokenizer:
    with open(tokenizer, "rb") as src, open(os.path.join(directory, "tokenizer.model"), "wb") as dst:
      dst.write(src.read())


def hf_rows_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
  """Rotate-half rows back to Meta's interleaved pairs: within each head, HF row i (first half)
  and row i + H/2 (second half) become Meta rows 2i and 2i + 1."""
  head_dim = weight.shape[0] // n_heads
  out = torch.empty_like(weight)
  for head in range(n_heads):
    base = head * head_dim
    for i in range(head_dim // 2):
      out[base + 2 * i] = weight[base + i]
      out[base + 2 * i + 1] = weight[base + head_dim // 2 + i]
  return out


def write_meta(hf, cfg: configs.ModelConfig, directory: str, mp: int, tokenizer: str | None,
               norm_eps: float | None = None) -> None:
  """Writes consolidated.NN.pth (mp shards), params.json (vocab_size -1) and tokenizer.model."""
  os.makedirs(directory, exist_ok=True)
  state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  meta = {
      "tok_embeddings.weight": (state["model.embed_tokens.weight"], 1),
      "norm.weight": (state["model.norm.weight"], None),
      "output.weight": (state["lm_head.weight"], 0),
  }
  for i in range(cfg.n_layers):
    hf_layer = lambda s: state[f"model.layers.{i}.{s}"]
    meta.update({
        f"layers.{i}.attention.wq.weight": (hf_rows_to_meta(hf_layer("self_attn.q_proj.weight"),
                                                            cfg.n_heads), 0),
        f"layers.{i}.attention.wk.weight": (hf_rows_to_meta(hf_layer("self_attn.k_proj.weight"),
                                                            cfg.kv_heads), 0),
        f"layers.{i}.attention.wv.weight": (hf_layer("self_attn.v_proj.weight"), 0),
        f"layers.{i}.attention.wo.weight": (hf_layer("self_attn.o_proj.weight"), 1),
        f"layers.{i}.feed_forward.w1.weight": (hf_layer("mlp.gate_proj.weight"), 0),
        f"layers.{i}.feed_forward.w3.weight": (hf_layer("mlp.up_proj.weight"), 0),
        f"layers.{i}.feed_forward.w2.weight": (hf_layer("mlp.down_proj.weight"), 1),
        f"layers.{i}.attention_norm.weight": (hf_layer("input_layernorm.weight"), None),
        f"layers.{i}.ffn_norm.weight": (hf_layer("post_attention_layernorm.weight"), None),
    })
  freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
  for shard in range(mp):
    piece = {"rope.freqs": freqs}
    for name, (tensor, axis) in meta.items():
      piece[name] = (tensor if axis is None else
                     torch.chunk(tensor, mp, dim=axis)[shard]).contiguous().clone()
    torch.save(piece, os.path.join(directory, f"consolidated.{shard:02d}.pth"))
  params = {"dim": cfg.dim, "multiple_of": cfg.multiple_of, "n_heads": cfg.n_heads,
            "n_layers": cfg.n_layers, "norm_eps": cfg.norm_eps if norm_eps is None else norm_eps,
            "vocab_size": -1}
  if cfg.n_kv_heads is not None:
    params["n_kv_heads"] = cfg.n_kv_heads
  if cfg.ffn_dim_multiplier is not None:
    params["ffn_dim_multiplier"] = cfg.ffn_dim_multiplier
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(params, f)
  if tokenizer:
    with open(tokenizer, "rb") as src, open(os.path.join(directory, "tokenizer.model"), "wb") as dst:
      dst.write(src.read())
