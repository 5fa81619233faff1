"""A small decoder-only LM in Flax NNX: an example of an NNX model the encoder traces.

Nothing in it is written for TrackStar: its weight matrices live in standard
NNX layers (`nnx.LinearGeneral` for the attention projections, `nnx.Einsum`
for the attention output and the MLP gate, `nnx.Linear` for the MLP), which
`trackstar_jax.layer_registry` traces. Blocks are attributes `block_{i}`, so
the parameter paths match the default `encoder.param_regex` / block regex:

  block_1/attn/query/kernel   [d_model, n_heads, head_dim]   nnx.LinearGeneral
  block_1/attn/out/kernel     [n_heads, head_dim, d_model]   nnx.Einsum
  block_1/mlp/gate/kernel     [d_model, d_ff]                nnx.Einsum
  block_1/mlp/wi/kernel       [d_model, d_ff]                nnx.Linear
  block_1/mlp/wo/kernel       [d_ff, d_model]                nnx.Linear

  model = NnxLM(TransformerConfig(vocab_size=64, d_model=32), rngs=nnx.Rngs(0))
  apply_fn, params = nnx_adapter.functional(model=model, call=NnxLM.call)
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from trackstar_jax.models.transformer import TransformerConfig


class Attention(nnx.Module):
  """Causal multi-head self-attention."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
    self.query = nnx.LinearGeneral(d, (h, dh), use_bias=False, rngs=rngs)
    self.key = nnx.LinearGeneral(d, (h, dh), use_bias=False, rngs=rngs)
    self.value = nnx.LinearGeneral(d, (h, dh), use_bias=True, rngs=rngs)
    self.out = nnx.Einsum("bthk,hkd->btd", (h, dh, d), (d,), rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, T, D], mask: [B, 1, T, T] (True = attend) -> [B, T, D]."""
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, T, H, Dh]
    logits = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min), axis=-1)
    return self.out(jnp.einsum("bhts,bshk->bthk", probs, v))


class Mlp(nnx.Module):
  """Gated MLP: wo(gelu(gate(x)) * wi(x))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.gate = nnx.Einsum("...d,df->...f", (cfg.d_model, cfg.d_ff), rngs=rngs)
    self.wi = nnx.Linear(cfg.d_model, cfg.d_ff, rngs=rngs)
    self.wo = nnx.Linear(cfg.d_ff, cfg.d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(jax.nn.gelu(self.gate(x)) * self.wi(x))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), mask)
    return x + self.mlp(self.mlp_norm(x))


class NnxLM(nnx.Module):
  """Decoder-only LM with learned positions and tied embeddings (uses d_model, n_layers, n_heads, d_ff, max_len)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.n_layers = cfg.n_layers
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.positions = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
    for i in range(cfg.n_layers):
      setattr(self, f"block_{i}", Block(cfg, rngs=rngs))
    self.final_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array, pad_mask: jax.Array | None = None) -> jax.Array:
    """tokens: [B, T] int, pad_mask: [B, T] bool (True = real token) -> logits [B, T, V]."""
    t = tokens.shape[1]
    x = self.embed(tokens) + self.positions(jnp.arange(t))[None]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if pad_mask is not None:
      mask = mask & pad_mask[:, None, None, :]
    for i in range(self.n_layers):
      x = getattr(self, f"block_{i}")(x, mask)
    return self.embed.attend(self.final_norm(x))

  @staticmethod
  def call(model: NnxLM, inputs: jax.Array, pad_mask: jax.Array) -> jax.Array:
    """The `call` of `nnx_adapter.functional`: passes the padding mask."""
    return model(inputs, pad_mask)
