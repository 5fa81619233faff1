"""The batch convention shared by every stage: field names and padding to a fixed shape.

A batch is a dict of numpy (or jax) arrays with one row per example:

  inputs     [B, T] int32    token ids fed to the model
  targets    [B, T] int32    next-token ids (inputs shifted left)
  loss_mask  [B, T] float32  1 where the target token's loss counts
  pad_mask   [B, T] bool     True on real (non-padding) input positions
  ids        [B]    int64    example id; -1 marks a padding row

`trackstar_jax.data.batching` builds such batches from text; users with their
own tokenization build them directly. `losses.example_losses` defines the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BATCH_KEYS = ("inputs", "targets", "loss_mask", "pad_mask", "ids")


def pad_rows(
  batch: Mapping[str, np.ndarray], size: int, *, fill: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
  """`batch` padded with rows up to `size` rows: the one padding helper (fixed shapes, one compilation).

  Padding rows get ids -1 and 0 elsewhere (no tokens, no loss), unless `fill`
  gives a field's value (e.g. `{"pad_mask": True}` for one real-looking token).
  """
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f"A batch of {n} rows does not fit in {size}.")
  if n == size:
    return dict(batch)
  values = {"ids": -1, **(fill or {})}
  return {
    k: np.concatenate([np.asarray(v), np.full((size - n,) + np.shape(v)[1:], values.get(k, 0), np.asarray(v).dtype)])
    for k, v in batch.items()
  }
