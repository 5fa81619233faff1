"""A Pallas kernel for the retrieval step: the k best groups of every row, one kernel instead of a dozen.

  gi = topk_kernel.group_topk(maxima, k)    # [R, G] float32 -> [R, k] int32, ascending

`retrieval._merge_both` narrows a [2Q, c] score block to the k column groups
with the largest maxima (the only groups that can hold top-k elements). In XLA
that is a second level of group maxima, two `lax.top_k` and two sorts of the
chosen indices: on the H200 each `lax.top_k` is a full sort (~15-19 us at
[2048, 256]) and every op is its own kernel launch (BENCHMARKS.md, Retrieval).
This kernel does it in one pass per row block: k rounds of (max over the
row, lowest untaken index holding it), then the k indices in ascending order.

It returns exactly what the XLA path returns, the top-k indices of each row by
(value descending, index ascending), as `lax.top_k` ranks them, sorted: ties
(-inf included) go to the lower index. So the step's results stay bitwise
equal (tests/test_retrieval_fused.py). On GPU it lowers through Triton; on
other backends it runs in Pallas' interpreter (tests only: the XLA path is
used there).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

_ROWS = 4  # rows per program


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _kernel(m_ref, o_ref, *, k: int):
  x = m_ref[...]
  rows, width = x.shape
  kp = o_ref.shape[1]
  col = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
  slot = lax.broadcasted_iota(jnp.int32, (rows, kp), 1)
  taken = jnp.zeros((rows, width), jnp.int32)
  chosen = jnp.full((rows, kp), width, jnp.int32)
  for i in range(k):  # the i-th best: largest value, lowest index among equals, never one already taken
    free = taken == 0
    best = jnp.max(jnp.where(free, x, -jnp.inf), axis=1, keepdims=True)
    idx = jnp.min(jnp.where(free & (x == best), col, width), axis=1, keepdims=True)
    idx = jnp.where(idx == width, jnp.min(jnp.where(free, col, width), axis=1, keepdims=True), idx)  # NaN rows
    chosen = jnp.where(slot == i, idx, chosen)
    taken = jnp.where(col == idx, 1, taken)
  out = jnp.full((rows, kp), width, jnp.int32)
  for i in range(k):  # ascending: k rounds of the smallest remaining (the k indices are distinct)
    low = jnp.min(chosen, axis=1, keepdims=True)
    out = jnp.where(slot == i, low, out)
    chosen = jnp.where(chosen == low, width + 1, chosen)
  o_ref[...] = out


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def _group_topk(m: jax.Array, *, k: int, interpret: bool) -> jax.Array:
  r, g = m.shape
  gp, rp, kp = _next_pow2(g), -(-r // _ROWS) * _ROWS, _next_pow2(k)
  # Padding columns are -inf at indices >= g: a tie at -inf still goes to the lower (real) index first.
  m = jnp.pad(m.astype(jnp.float32), ((0, rp - r), (0, gp - g)), constant_values=-jnp.inf)
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top

    kwargs["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=1)
  out = pl.pallas_call(
    functools.partial(_kernel, k=k),
    out_shape=jax.ShapeDtypeStruct((rp, kp), jnp.int32),
    grid=(rp // _ROWS,),
    in_specs=[pl.BlockSpec((_ROWS, gp), lambda i: (i, 0))],
    out_specs=pl.BlockSpec((_ROWS, kp), lambda i: (i, 0)),
    interpret=interpret,
    **kwargs,
  )(m)
  return out[:r, :k]


def available() -> bool:
  """Whether the kernel runs compiled here (a GPU backend); elsewhere only in the interpreter."""
  return jax.default_backend() == "gpu"


def group_topk(m: jax.Array, k: int, *, interpret: bool | None = None) -> jax.Array:
  """Indices [R, k] (int32, ascending) of the k largest entries of each row of m [R, G] (ties: lower index).

  The set `lax.top_k(m, k)[1]` names, sorted. `interpret`: default True off GPU.
  """
  if not 0 < k <= m.shape[1]:
    raise ValueError(f"group_topk needs 0 < k <= {m.shape[1]} columns, got k={k}.")
  return _group_topk(m, k=k, interpret=not available() if interpret is None else interpret)
