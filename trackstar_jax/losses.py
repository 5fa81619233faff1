"""Masked next-token losses shared by training, encoding and evaluation.

Batches follow `trackstar_jax.batch` (inputs, targets, loss_mask, pad_mask,
ids). loss_mask covers every real token of a corpus example and only the
answer tokens of a query.
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
