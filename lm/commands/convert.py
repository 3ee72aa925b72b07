"""`lm convert`: import a Meta or Hugging Face Llama checkpoint as our model directory.

  lm convert --from meta SRC_DIR DST    # consolidated.NN.pth + params.json + tokenizer.model
  lm convert --from hf SRC_DIR DST      # config.json + model*.safetensors (+ index) + tokenizer

DST gets model.json, tokenizer.model and an Orbax checkpoint: use it as a stage's `init_from` or
with `lm sample --checkpoint=DST`. Tensors are streamed one at a time; DST appears only when whole.
"""

from __future__ import annotations

from absl import flags, logging

FROM = flags.DEFINE_enum("from", None, ["meta", "hf"], "Layout of SRC_DIR.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace DST if it exists.")
PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32",
                                  "Stored parameter dtype (training keeps float32 masters).")
COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", None,
                                    "model.json compute dtype (default: ModelConfig's, bfloat16).")
NORM_EPS = flags.DEFINE_float("norm_eps", None, "Override the RMSNorm eps of the source config.")
MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None, "Override the context length.")


def main(argv):
  if FROM.value is None or len(argv) != 3:
    raise SystemExit("usage: lm convert --from=meta|hf SRC_DIR DST [--overwrite]")
  src, dst = argv[1], argv[2]

  from lm.interop import importer, sources

  overrides = dict(param_dtype=PARAM_DTYPE.value, compute_dtype=COMPUTE_DTYPE.value,
                   norm_eps=NORM_EPS.value, max_seq_len=MAX_SEQ_LEN.value)
  try:
    source = sources.open_source(FROM.value, src, **overrides)
    warning = sources.eps_warning(source.cfg, src)
    if warning and NORM_EPS.value is None:
      logging.warning(warning)
    cfg = importer.import_checkpoint(source, dst, overwrite=OVERWRITE.value)
  except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
    raise SystemExit(f"lm convert: {e}")
  print(f"wrote {dst}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads "
        f"({cfg.kv_heads} KV), ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}, "
        f"norm_eps {cfg.norm_eps:g}, params {cfg.param_dtype}")
