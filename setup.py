"""Llama 2, the whole recipe, in JAX/Flax: pretraining, SFT with Ghost Attention, reward models,
rejection sampling, PPO and safety context distillation, from one CPU to a TPU pod slice."""

import setuptools

# Versions that resolve and run together on Python 3.11 (checked on CPU; libtpu via the extra).
JAX_VERSION = "0.10.2"
INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
]

EXTRAS_REQUIRE = {
    # The external references the tests compare against: PyTorch Llama from transformers.
    # nbclient, nbformat and ipykernel execute the notebooks (tests/test_notebooks.py).
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "portpicker==1.6.0", "torch==2.13.0",
             "transformers==5.23.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
    # Reading Meta's consolidated.NN.pth (`lm convert --from meta`); Hugging Face input needs none.
    "convert": ["torch==2.13.0"],
    # libtpu: run on TPU, and compile for TPU topologies on a CPU host (`lm aot`).
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    # Apache Beam: `tfds_sources.build(..., beam_runner=...)` reads and tokenizes a corpus in
    # Beam workers (DirectRunner on one machine, Dataflow or another runner on a cluster). It
    # caps protobuf below 7 and pyarrow below 26, so it resolves older ones than the base does,
    # and transformers (the test extra) cannot then read SentencePiece tokenizers: its generated
    # protobuf code needs protobuf 7. Install it apart from the test extra.
    "beam": ["apache-beam==2.78.0"],
}

setuptools.setup(
    name="lm",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["lm", "lm.*", "data_pipelines", "data_pipelines.*", "experiments"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["lm = lm.cli:main"]},
)
