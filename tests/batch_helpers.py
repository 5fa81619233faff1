"""Random batches in the batch convention, shared by the numerical tests (gradients, NNX, Gemma)."""

import numpy as np


def random_batch(b: int, *, vocab: int, seq_len: int, seed: int = 0, zero_padding: bool = False) -> dict:
  """b random examples of seq_len tokens; example 0 is right-padded by 2 (token id 0 there with
  `zero_padding`, as models that derive their mask from the tokens need); no loss on position 0."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, vocab, (b, seq_len)).astype(np.int32)
  pad = np.ones((b, seq_len), bool)
  pad[0, seq_len - 2 :] = False
  if zero_padding:
    inputs = np.where(pad, inputs, 0)
  loss_mask = pad.astype(np.float32)
  loss_mask[:, 0] = 0.0
  return dict(
    inputs=inputs,
    targets=np.roll(inputs, -1, axis=1),
    loss_mask=loss_mask,
    pad_mask=pad,
    ids=np.arange(b, dtype=np.int64),
  )
