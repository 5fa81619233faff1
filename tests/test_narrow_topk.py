"""narrow_topk: lax.top_k's columns of short rows, by a Pallas kernel (its interpreter on CPU).

Must rank as `lax.top_k` sorts: float keys in IEEE total order (NaN above inf, -NaN below -inf, +0.0 above
-0.0), ties to the lower column; checked against a NumPy brute force on rows of any width up to MAX_COLUMNS
and any row count (padding), and against `lax.top_k` where XLA sorts (rows shorter than 1,024 columns).
"""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from trackstar_jax import narrow_topk

_SPECIALS = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 3e-39, -3e-39], np.float32)


def _rows(kind, rng, r, n):
  if kind == "normal":
    return rng.normal(size=(r, n)).astype(np.float32)
  if kind == "ties":  # small integers: most keys tie
    return rng.integers(-2, 3, size=(r, n)).astype(np.float32)
  x = rng.choice(_SPECIALS, size=(r, n))  # NaNs of both signs, infinities, signed zeros, subnormals
  x[0] = -np.inf  # a row of nothing valid, as the retrieval step pads
  return x


def _ranked(x):
  """Columns of each row by (total-order key descending, column ascending): the brute-force reference."""
  b = x.view(np.int32).astype(np.int64)
  keys = np.where(b < 0, b ^ 0x7FFFFFFF, b)
  return np.stack([np.lexsort((np.arange(x.shape[1]), -row)) for row in keys])


@pytest.mark.parametrize(
  "r,n,k", [(13, 256, 10), (16, 160, 10), (9, 170, 10), (5, 33, 7), (3, 5, 5), (2, 1, 1), (4, 512, 16), (3, 4096, 10)]
)
@pytest.mark.parametrize("kind", ["normal", "ties", "specials"])
def test_top_k_indices_rank_by_total_order_then_column(r, n, k, kind):
  x = _rows(kind, np.random.default_rng(n * 7 + r), r, n)
  want = _ranked(x)[:, :k]
  np.testing.assert_array_equal(np.asarray(narrow_topk.top_k_indices(jnp.asarray(x), k)), want)
  got = narrow_topk.top_k_indices(jnp.asarray(x), k, ascending=True)
  np.testing.assert_array_equal(np.asarray(got), np.sort(want, axis=1))
  if n < 1024:  # lax.top_k's sorting path (on GPUs XLA takes its own kernel from 1,024 columns: plain compares)
    np.testing.assert_array_equal(want, np.asarray(lax.top_k(jnp.asarray(x), k)[1]))


def test_sort_keys_order_floats_as_lax_top_k():
  """lax.top_k ranks by IEEE total order (unlike lax.sort, which equates -0.0 with 0.0 and all NaNs)."""
  x = np.random.default_rng(0).choice(_SPECIALS, size=(1, 64))
  keys = np.asarray(narrow_topk.sort_keys(jnp.asarray(x)))[0]
  np.testing.assert_array_equal(np.lexsort((np.arange(64), -keys.astype(np.int64))), _ranked(x)[0])
  np.testing.assert_array_equal(_ranked(x)[0], np.asarray(lax.top_k(jnp.asarray(x), 64)[1])[0])


def test_bfloat16_rows_and_inside_jit():
  x = jnp.asarray(np.random.default_rng(1).integers(-3, 4, size=(6, 40)), jnp.bfloat16)
  got = jax.jit(lambda y: narrow_topk.top_k_indices(y, 4))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(lax.top_k(x, 4)[1]))


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="0 < k <= n"):
    narrow_topk.top_k_indices(jnp.zeros((2, 4)), 5)
  with pytest.raises(ValueError, match=r"x \[R, n\]"):
    narrow_topk.top_k_indices(jnp.zeros(4), 1)
