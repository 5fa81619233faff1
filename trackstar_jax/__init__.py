"""trackstar_jax: TrackStar training-data attribution on JAX/Flax.

Pipeline stages, one module each: data/ (fact datasets, tokenization,
batching), models/ (the LM), train, checkpointing, projection,
optimizer_correction, gradients, hessian, encoder, store, retrieval,
evaluation.
"""

__version__ = "0.1.0"
