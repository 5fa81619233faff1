"""Top-k of short rows in one Pallas kernel: the retrieval step's selections without a sort.

  idx = narrow_topk.top_k_indices(x, k)                  # [R, n] float32 -> [R, k] int32, by rank
  idx = narrow_topk.top_k_indices(x, k, ascending=True)  # the same set, in increasing column order

The fused retrieval step (`retrieval._merge_both`) narrows each score block to
a few hundred candidates per row and then calls `lax.top_k` three times on
rows of 160-256 columns. XLA:GPU has its own top-k kernel only for rows of at
least 1,024 columns; shorter rows are sorted whole (~15-19 us each at
[2048, 256] on the H200, five sorts per step with the index sorts:
BENCHMARKS.md, Retrieval). Here each program holds a few rows in registers and
takes k successive maxima, then (`ascending`) puts the k columns in order.

Exactly what `lax.top_k` returns where XLA sorts: float keys compare in IEEE
total order (-NaN < -inf < ... < -0.0 < +0.0 < ... < inf < NaN, as the sort's
comparator orders them), mapped here to int32 keys with the same order; equal
keys go to the lower column. So the step's results stay bitwise equal to the
XLA path (tests/test_narrow_topk.py, tests/test_retrieval_fused.py). It lowers
through Triton on GPUs; elsewhere it runs in Pallas' interpreter (tests only:
the retrieval step uses `lax.top_k` there). On the H200 its three calls took
20 us of the step where the five sorts took 57 us (BENCHMARKS.md, Retrieval).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp

ELEMENTS = 2048  # keys per program: [8, 256], [2, 1024]: 16 registers of keys a thread at 4 warps
NUM_WARPS = 4
# Where the retrieval step uses the kernel: rows of at most 512 columns. Wider rows cost more than the levels
# of group maxima that shorten them: the k best of all 4,096 first-level maxima at once took 80 us a step
# (one row a program), against 20 us for the kernel on the levels' rows of 256 and 160 (H200, run F5), and a
# [4, 4096] tile spilled registers (0.26 ms, BENCHMARKS.md, Retrieval).
MAX_COLUMNS = 512
_INT_MIN = -(2**31)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def sort_keys(x: jax.Array) -> jax.Array:
  """int32 keys of float32 x whose signed order is x's total order (jax's sort comparator's)."""
  b = lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)  # negative floats: larger magnitude, smaller key


def _kernel(x_ref, out_ref, *, n: int, k: int, ascending: bool):
  rows, width = x_ref.shape
  kp = out_ref.shape[1]
  col = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
  key = jnp.where(col < n, sort_keys(x_ref[...]), _INT_MIN)  # padding columns: the lowest key, after every real one
  slot = lax.broadcasted_iota(jnp.int32, (rows, kp), 1)
  free = col < width  # all True
  chosen = jnp.full((rows, kp), width, jnp.int32)
  for i in range(k):  # the i-th best: the largest free key, the lowest column holding it
    best = jnp.max(jnp.where(free, key, _INT_MIN), axis=1, keepdims=True)
    idx = jnp.min(jnp.where(free & (key == best), col, width), axis=1, keepdims=True)
    chosen = jnp.where(slot == i, idx, chosen)
    free = free & (col != idx)
  if ascending:  # k rounds of the smallest remaining column (the k are distinct; unused slots hold width)
    out = jnp.full((rows, kp), width, jnp.int32)
    for i in range(k):
      low = jnp.min(chosen, axis=1, keepdims=True)
      out = jnp.where(slot == i, low, out)
      chosen = jnp.where(chosen == low, width + 1, chosen)
    chosen = out
  out_ref[...] = chosen


@functools.partial(jax.jit, static_argnames=("k", "ascending", "interpret"))
def _top_k_indices(x: jax.Array, *, k: int, ascending: bool, interpret: bool) -> jax.Array:
  r, n = x.shape
  width, kp = _next_pow2(n), _next_pow2(k)
  block = max(1, ELEMENTS // width)
  rows_p = -(-r // block) * block
  x = jnp.pad(x.astype(jnp.float32), ((0, rows_p - r), (0, width - n)))  # Triton blocks are powers of two
  out = pl.pallas_call(
    functools.partial(_kernel, n=n, k=k, ascending=ascending),
    out_shape=jax.ShapeDtypeStruct((rows_p, kp), jnp.int32),
    grid=(rows_p // block,),
    in_specs=[pl.BlockSpec((block, width), lambda i: (i, 0))],
    out_specs=pl.BlockSpec((block, kp), lambda i: (i, 0)),
    compiler_params=pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
    interpret=interpret,
  )(x)
  return out[:r, :k]


def available() -> bool:
  """Whether the kernel runs compiled here (a GPU backend); elsewhere only in Pallas' interpreter."""
  return jax.default_backend() == "gpu"


def top_k_indices(x: jax.Array, k: int, *, ascending: bool = False, interpret: bool | None = None) -> jax.Array:
  """Columns [R, k] (int32) of the k largest entries of each row of x [R, n], as `lax.top_k(x, k)[1]`.

  ascending: the same k columns sorted by column instead of by rank. x is cast to float32 (exact for
  float32 and bfloat16). interpret: default True off GPU.
  """
  if x.ndim != 2 or not 0 < k <= x.shape[1]:
    raise ValueError(f"top_k_indices needs x [R, n] and 0 < k <= n, got shape {x.shape} and k={k}.")
  return _top_k_indices(x, k=k, ascending=ascending, interpret=not available() if interpret is None else interpret)
