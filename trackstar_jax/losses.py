"""Masked next-token losses shared by training, encoding and evaluation.

Batch convention used across the package (see `trackstar_jax.data.batching`):
  inputs    [B, T] int32   tokens fed to the model (BOS first)
  targets   [B, T] int32   inputs shifted left by one
  loss_mask [B, T] float32 1 where targets[t] counts: every real token for
                           corpus examples, only the answer tokens for queries
  pad_mask  [B, T] bool    True on real input tokens
  ids       [B]    int64   example id; -1 marks a padding row of a short batch
"""

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log p(targets) per position. logits [..., T, V], targets [..., T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def example_losses(logits: jax.Array, batch) -> jax.Array:
  """L(z) per example: the summed masked NLL, [B] (the paper's loss)."""
  return jnp.sum(token_nll(logits, batch["targets"]) * batch["loss_mask"], axis=-1)


def mean_token_loss(logits: jax.Array, batch) -> jax.Array:
  """Training objective: NLL averaged over all masked tokens of the batch."""
  nll = token_nll(logits, batch["targets"]) * batch["loss_mask"]
  return jnp.sum(nll) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
