"""trackstar_jax: TrackStar training-data attribution on JAX/Flax.

Pipeline stages, one module each: data/ (fact datasets, tokenization,
batching), models/ (the LM; an NNX example; Gemma helpers), train,
checkpointing, projection, optimizer_correction, layer_registry (which
Linen / NNX / gemma layers are traced), gradients, nnx_adapter (NNX modules
for the encoder), hessian, encoder, store, retrieval, evaluation.
"""

__version__ = "0.1.0"
