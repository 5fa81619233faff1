"""trackstar_jax: TrackStar training-data attribution on JAX/Flax.

From a trained LM and its optax state to the training examples that most
influenced each answer, in four calls:

  import trackstar_jax as tsj
  encoder = tsj.build_encoder(model=model, params=params, opt_state=opt_state)
  store = tsj.encode(encoder, corpus, store="/tmp/enc.zarr")
  hessian = tsj.fit_hessian(encoder=encoder, train=corpus, queries=queries)
  results = tsj.retrieve(encoder=encoder, queries=queries, store=store, hessian=hessian)

The names below are the public API (see `trackstar_jax.api`). Below them:
library modules, one per stage (projection, optimizer_correction, gradients,
encoder, hessian, store, retrieval, results, evaluation/, data/, models/),
and the jobs layer (`trackstar_jax.jobs`, one module per `launch/` entry point).
"""

from trackstar_jax.api import build_encoder, encode, fit_hessian, retrieve, score
from trackstar_jax.encoder import EncoderOptions, TrackStarEncoder
from trackstar_jax.hessian import Hessian, HessianOptions
from trackstar_jax.results import load_results, write_results
from trackstar_jax.retrieval import InMemoryEncodings, RetrievalResult
from trackstar_jax.store import EncodingStore, open_store

__version__ = "0.2.0"

__all__ = [
    "build_encoder", "encode", "fit_hessian", "retrieve", "score",
    "EncoderOptions", "TrackStarEncoder", "Hessian", "HessianOptions", "RetrievalResult", "InMemoryEncodings",
    "EncodingStore", "open_store", "load_results", "write_results",
]  # fmt: skip
