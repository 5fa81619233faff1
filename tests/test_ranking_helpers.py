"""The tests' tie-aware top-k check accepts a near-tie in either order and nothing else."""

import numpy as np
import pytest
import ranking_helpers

SCORES = np.array([[0.9, 0.5, 0.5 + 1e-7, 0.1, 0.7]])


def test_a_near_tie_in_either_order_is_a_top_k():
  ranking_helpers.assert_is_top_k([[0, 4, 1, 2]], SCORES, atol=1e-6)
  ranking_helpers.assert_is_top_k([[0, 4, 2, 1]], SCORES, atol=1e-6)
  ranking_helpers.assert_is_top_k([[0, 4, 1]], SCORES, atol=1e-6)  # the tie runs past the list's end
  ranking_helpers.assert_is_top_k([[3, 1]], SCORES, atol=1e-6, largest=False)


@pytest.mark.parametrize(
  "ids, atol",
  [([[4, 0, 2]], 1e-6), ([[0, 4, 3]], 1e-6), ([[0, 0, 4]], 1e-6), ([[0, 4, 1, 2]], 1e-8)],
  ids=["swapped", "outside", "repeated", "gap_above_atol"],
)
def test_a_wrong_ranking_fails(ids, atol):
  with pytest.raises(AssertionError):
    ranking_helpers.assert_is_top_k(ids, SCORES, atol=atol)
