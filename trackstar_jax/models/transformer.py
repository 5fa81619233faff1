"""A decoder-only transformer LM in Flax Linen.

Every weight matrix lives in a standard Flax layer (`nn.DenseGeneral` for the
attention projections, `nn.Dense` for the MLP) so that the TrackStar encoder
can trace per-example gradients of any of them by intercepting those layers,
without changes to this file. Parameter paths look like

  params/block_3/attn/query/kernel   [d_model, n_heads, head_dim]
  params/block_3/attn/out/kernel     [n_heads, head_dim, d_model]
  params/block_3/mlp/wi/kernel       [d_model, d_ff]
  params/block_3/mlp/wo/kernel       [d_ff, d_model]

which the default block grouping (layer groups x {attn, mlp}) relies on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and numerics of `DecoderLM`."""

  vocab_size: int
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int = 512
  max_len: int = 128
  tied_embeddings: bool = True
  rope_base: float = 10_000.0
  # Activations/matmul dtype; parameters are always float32.
  dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    assert self.d_model % self.n_heads == 0, (self.d_model, self.n_heads)
    return self.d_model // self.n_heads

  @classmethod
  def from_config(cls, cfg, *, vocab_size: int | None = None) -> TransformerConfig:
    """Builds from an ml_collections model config (`config.model`)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in cfg.items() if k in fields}
    if vocab_size is not None:
      kwargs["vocab_size"] = vocab_size
    if isinstance(kwargs.get("dtype"), str):
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return cls(**kwargs)

  def num_params(self) -> int:
    """Number of parameters (embeddings included)."""
    d, f, v = self.d_model, self.d_ff, self.vocab_size
    per_block = 4 * d * d + 2 * d * f + 2 * d
    head = 0 if self.tied_embeddings else d * v
    return v * d + self.n_layers * per_block + d + head


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding. x: [B, T, H, Dh], positions: [B, T]."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda name: nn.DenseGeneral(
      features=(cfg.n_heads, cfg.head_dim), use_bias=False, dtype=cfg.dtype, name=name
    )
    q = rope(dense("query")(x), positions, cfg.rope_base)  # [B, T, H, Dh]
    k = rope(dense("key")(x), positions, cfg.rope_base)
    v = dense("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(cfg.head_dim).astype(jnp.float32)
    logits = jnp.where(mask[:, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(features=cfg.d_model, axis=(-2, -1), use_bias=False, dtype=cfg.dtype, name="out")(y)


class Mlp(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = nn.Dense(cfg.d_ff, use_bias=False, dtype=cfg.dtype, name="wi")(x)
    h = nn.gelu(h)
    return nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.dtype, name="wo")(h)


class Block(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    cfg = self.config
    x = x + Attention(cfg, name="attn")(nn.RMSNorm(dtype=cfg.dtype, name="attn_norm")(x), positions, mask)
    x = x + Mlp(cfg, name="mlp")(nn.RMSNorm(dtype=cfg.dtype, name="mlp_norm")(x))
    return x


class DecoderLM(nn.Module):
  """Causal LM: tokens [B, T] int32 -> logits [B, T, V] float32.

  `pad_mask` [B, T] (True = real token) keeps padding out of attention; with
  right padding it does not change the logits of real tokens anyway, but it
  makes left-padded inputs safe too.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, pad_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    b, t = tokens.shape
    if pad_mask is None:
      pad_mask = jnp.ones((b, t), bool)
    positions = jnp.maximum(jnp.cumsum(pad_mask, axis=-1) - 1, 0)
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    mask = causal & pad_mask[:, None, :]
    # Padding rows attend to themselves only, so softmax never sees all -inf.
    mask = mask | jnp.eye(t, dtype=bool)[None]
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=nn.initializers.normal(stddev=1.0),
      name="embed",
    )
    x = embed(tokens).astype(cfg.dtype)
    for i in range(cfg.n_layers):
      x = Block(cfg, name=f"block_{i}")(x, positions, mask)
    x = nn.RMSNorm(dtype=cfg.dtype, name="final_norm")(x)
    if cfg.tied_embeddings:
      logits = embed.attend(x.astype(jnp.float32)) / jnp.sqrt(cfg.d_model)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.float32, name="lm_head")(x)
    return logits.astype(jnp.float32)
