"""Flax models shipped with trackstar_jax (users can bring their own)."""

from trackstar_jax.models.transformer import DecoderLM, TransformerConfig

__all__ = ["DecoderLM", "TransformerConfig"]
