"""Tie-aware comparisons of top-k lists, for tests whose two sides sum in different orders.

Two float32 computations of the same scores (a brute-force reference and the
fused path, or two meshes) differ by rounding: where two corpus rows score
within that rounding of each other, either order is right. `assert_is_top_k`
accepts exactly that and nothing more: every returned row must score, by the
reference, what its rank says, to `atol`.
"""

import numpy as np


def assert_is_top_k(ids, scores, *, atol: float, largest: bool = True) -> None:
  """ids [Q, k] (column indices into scores) are a top-k (bottom-k) of each row of the reference scores [Q, N].

  Each row's ids are distinct and their reference scores equal the reference's
  own k best, rank by rank, to `atol`: a near-tie may come back in either order,
  a row that ranks wrongly by more than `atol` fails.
  """
  ids, scores = np.asarray(ids), np.asarray(scores, np.float64)
  sign = 1.0 if largest else -1.0
  k = ids.shape[1]
  for i, row in enumerate(ids):
    assert len(set(row.tolist())) == k, f"query {i}: repeated ids {row}"
    want = sign * np.sort(sign * scores[i])[::-1][:k]
    got = scores[i, row]
    bad = np.abs(got - want) > atol
    assert not bad.any(), (
      f"query {i}: ids {row} score {got} by the reference, its best {k} are {want} (atol {atol}); "
      f"rank {int(np.argmax(bad))} is off by {np.max(np.abs(got - want)):.3g}"
    )
