"""Exact top-k / bottom-k retrieval over an encoding store, streamed by chunks.

For query encodings e_q [Q, d] (already R^{-1/2}-transformed and unit-norm,
replicated on every device) and the raw corpus encodings phi [N, d] of a
`store.EncodingStore`, computes per query the k highest scores (proponents)
and the k lowest (opponents) of

  score(q, z) = e_q . e_z,   e_z = T(phi_z) / ||T(phi_z)||,   T(phi) = phi @ inv_sqrt

without ever holding the [Q, N] score matrix: the corpus is read in chunks of
`rows_per_chunk` rows (chunk j goes to host j % process_count), each chunk is
split by rows over this host's devices, and every device keeps a running
[Q, k] top-k and bottom-k that it merges with each new [Q, rows/devices] score
block (inside `shard_map`). At the end the per-device lists are all-gathered
and merged on device, then the per-host lists are all-gathered across
processes and merged once more on the host. Memory per device: a
[Q, rows/devices] score block plus one chunk of phi, whatever N.

Speed. R^{-1/2} is folded into the queries once (e_q . R^{-1/2} phi =
(R^{-1/2} e_q) . phi), so only the norm ||R^{-1/2} phi|| needs the train-side
transform and scaled encodings are never written. The norms are computed by
their own jitted function and kept per Hessian (`norms.NormCache`, in memory
and beside an `EncodingStore`), so a later scan, e.g. another query set,
skips the transform: with a full [d, d] R^{-1/2} it costs C x d^2 FLOP per
chunk, several times the score matmul. The selection first narrows each score
block hierarchically to a few groups of columns (group maxima, see
`_candidates`) so that `lax.top_k` never runs over a long row; the "fused"
step (`_merge_both`) does it for both sides at once: the raw [Q, c] scores are
the only block-sized buffer (keys recomputed where read) and every later op
runs once over both sides' rows. On a GPU (select="auto", the default, picks
"kernel") the three selections over short rows that remain run in
`narrow_topk`'s Pallas kernel, not as `lax.top_k`, which sorts such rows whole.
select="reference" keeps the previous step (two `_merge_running` calls, norms
inside the step).

Feeding (`retrieve`): the store keeps `reads_in_flight` chunk reads
outstanding (a local store reads its chunk files directly, `chunk_files`; on
CUDA GPUs it maps them, and the copy reads the page cache, `mapped_chunks`), a
background thread pads each chunk and copies it to the devices (optionally
in pieces, `put_in_pieces`, or staged in pinned host memory)
`transfers_ahead` chunks in front of the step, so reads, copies and compute
overlap. Devices slower than the feed (CPU devices, many queries) hold at most
`STEPS_IN_FLIGHT` dispatched steps and their chunks (`StreamingTopK.throttle`),
not every chunk fed to them.

Tie order (deterministic, independent of device count, host count and chunk
size): equal scores are ordered by lower store row first, for the top-k and the
bottom-k alike, both within the returned lists and at the k-th place. It holds
because each device sees its rows in increasing order, candidates keep
increasing-row order, `lax.top_k` keeps the lower index of equal values, and
the merges sort by (score, row).

Compact stores (int8 / int4, `quantize`): a chunk crosses to the device as
codes and scales (`StreamingTopK.put(scale=)`) and is dequantized there, in
its own small jitted program right after the copy, so the host-to-device copy
shrinks with the store while the step sees the very input a float store of the
dequantized rows would give it (see `StreamingTopK(store_dtype=)`).

Exactness: the fused step and the reference step fed the same norms return
bitwise the same values and rows (same ops on the same values); XLA may round
a norm computed inside a bigger fusion differently by an ulp, which is why
the comparison shares the norms (tests/test_retrieval_fused.py).

Scores are float32. `matmul_dtype="bfloat16"` feeds the matmuls (scores, and
the R^{-1/2} of the norms) bf16 inputs with float32 accumulation (the GPU fast
path); "float32" runs them at full float32 precision (no TF32).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import copy
import dataclasses
import functools
import math
from typing import Any, NamedTuple

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from trackstar_jax import hessian as hessian_lib
from trackstar_jax import host_buffers, mapped_chunks, narrow_topk, quantize
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import norms as norms_lib
from trackstar_jax import prefetch as prefetch_lib
from trackstar_jax import progress as progress_lib
from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib


@dataclasses.dataclass(frozen=True)
class RetrieveOptions:
  """Retrieval defaults (config section `retrieve`).

  Attributes:
    k: proponents and opponents per query.
    chunk_rows: corpus rows read per host per step, split over its devices.
    normalize: unit-normalize the encodings (cosine); False: raw dot product.
    matmul_dtype: "bfloat16" (float32 accumulation; the fast path) or "float32" (exact).
    select: "fused" (both sides' selection batched, norms computed outside the step or cached),
      "kernel" (the same with its selections over short rows by `narrow_topk`'s Pallas kernel instead of
      `lax.top_k` and sorts; GPU), "auto" (the default: "kernel" on a GPU, else "fused") or "reference"
      (the previous step, kept to check the others against). All give bitwise-equal results.
    cache_norms: keep 1 / ||R^{-1/2} phi|| per chunk from the first scan (`norms.NormCache`; beside
      an `EncodingStore` on storage) so that later scans skip the transform.
    reads_in_flight: store chunk reads outstanding while the devices work.
    transfers_ahead: chunks already sent to the devices ahead of the step (2 = double buffering).
    pinned: stage host chunks in pinned host memory before the device copy (where the device has it);
      off by default: it measured no faster in store scans.
    copy_piece_mib: host chunks cross to the devices in copies of at most this many MiB, joined there
      (`put_in_pieces`: alone 2.3x the rate of one large copy on the H200 host, but no faster in a
      store scan, where reads share the host's memory bandwidth); 0 (default): one copy per chunk.
    pinned_reads: a local store's chunks are read into reused host buffers page-locked with the
      devices' client (`host_buffers`), which the device copy reads at the DMA rate with no staging
      copy; off where the client cannot (`dma_map`: not on CPU). The buffers are kept for later
      scans (at most a quarter of host memory; `host_buffers.clear()` frees them).
    mapped_reads: on CUDA GPUs, a local store's chunk files are mapped read-only and page-locked
      with the CUDA driver (`mapped_chunks`), so the device copy reads the page cache itself by DMA
      (checksums still checked on every read). The windows stay registered for later scans, at most
      a quarter of host memory (env TRACKSTAR_MAPPED_BYTES; `mapped_chunks.clear()` lets them go);
      chunks beyond that, and everywhere else, are read as `pinned_reads` says.
  """

  k: int = 10
  chunk_rows: int = 65536
  normalize: bool = True
  matmul_dtype: str = "bfloat16"
  select: str = "auto"  # H200, d = 4096: "kernel" 0.82-0.88x the matmul, "fused" 0.76-0.82x (BENCHMARKS.md)
  cache_norms: bool = True
  reads_in_flight: int = 4
  transfers_ahead: int = 2
  pinned: bool = False  # H200 store scans: 9.06 GB/s pageable vs 8.29 pinned (BENCHMARKS.md, Streaming)
  copy_piece_mib: int = 0  # H200 store feed: one copy 10.0-12.3 GB/s vs 32 MiB pieces 9.65 (BENCHMARKS.md)
  pinned_reads: bool = True
  mapped_reads: bool = True


@dataclasses.dataclass
class RetrievalResult:
  """Per query, best first. Missing entries (only if the corpus has fewer valid
  rows than k, i.e. -1 padding rows) have id -1, row -1 and score nan.

  `to_records` / `write_jsonl` give the published TrackStar results schema;
  `to_arrays` plain numpy arrays.
  """

  top_ids: np.ndarray  # [Q, k] int64
  top_scores: np.ndarray  # [Q, k] float32, descending
  top_rows: np.ndarray  # [Q, k] int64 corpus rows
  bottom_ids: np.ndarray  # [Q, k] int64
  bottom_scores: np.ndarray  # [Q, k] float32, ascending
  bottom_rows: np.ndarray  # [Q, k] int64

  @property
  def num_queries(self) -> int:
    return int(self.top_ids.shape[0])

  @property
  def k(self) -> int:
    return int(self.top_ids.shape[1])

  def to_arrays(self) -> dict[str, np.ndarray]:
    """{field: [Q, k] array} of every field (proponents = top_*, opponents = bottom_*)."""
    return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}

  def to_records(self, *, queries: Sequence[Mapping[str, Any]], text_of) -> list[dict[str, Any]]:
    """Results records (`results.build_results`): one per query.

    Args:
      queries: per query, in encoding order, a dict with `query_id`, `prompt`,
        `target` and optionally `fact_id`, `relation`, `gold_sentence_ids`
        (gives `proponent_correct`), `frequency`.
      text_of: training example id -> its text (a dict or a function).
    """
    return results_lib.build_results(queries=queries, result=self, text_of=text_of)

  def write_jsonl(
    self, path: str, *, queries: Sequence[Mapping[str, Any]], text_of, metadata: Mapping[str, Any] | None = None
  ) -> str:
    """Writes `to_records(...)` to `path` (local, file:// or gs://) atomically, `metadata` beside it."""
    meta = dict(num_queries=self.num_queries, k=self.k, **(metadata or {}))
    results_lib.write_results(path, self.to_records(queries=queries, text_of=text_of), metadata=meta)
    return path


class InMemoryEncodings:
  """Raw corpus encodings phi [N, d] held in memory, read like an `EncodingStore`.

  Lets `retrieve` score in-memory phis (e.g. from `trackstar_jax.encode` with
  no store) through the same streaming, sharded step as a store on disk.
  `dtype="int8"` / `"int4"` holds them quantized (`quantize`), as such a store would.
  """

  def __init__(self, phi, ids=None, *, name: str = "memory", dtype: str | None = None):
    self.phi = np.asarray(phi)
    if self.phi.ndim != 2:
      raise ValueError(f"Corpus encodings must be [N, d], got shape {self.phi.shape}.")
    self._dim, self.dtype, self.scale = int(self.phi.shape[1]), str(self.phi.dtype), None
    if dtype is not None and quantize.is_quantized(dtype):
      self.dtype, (self.phi, self.scale) = dtype, quantize.quantize(self.phi, dtype)
    elif dtype is not None:
      self.phi = self.phi.astype(jnp.dtype(quantize.layout(dtype, self._dim).codes_dtype))
      self.dtype = dtype
    self._set_ids(ids, name)

  def _set_ids(self, ids, name: str) -> None:
    self.ids = np.arange(len(self.phi), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if self.ids.shape != (len(self.phi),):
      raise ValueError(f"ids has shape {self.ids.shape}; expected one per row ({len(self.phi)},).")
    self.url = f"<in-memory {name}: {self.phi.shape[0]} x {self.dim} {self.dtype}>"

  @classmethod
  def from_codes(cls, codes, scale, ids=None, *, dtype: str, dim: int, name: str = "memory") -> InMemoryEncodings:
    """Rows already quantized to `dtype` (int8 | int4; e.g. a store's `Chunk.phi` and `Chunk.scale`), as they are."""
    lay = quantize.layout(dtype, dim)
    codes, scale = np.asarray(codes), np.asarray(scale, np.float32)
    if (
      not quantize.is_quantized(dtype)
      or codes.shape[1:] != (lay.codes_cols,)
      or scale.shape != (len(codes), lay.scale_cols)
    ):
      raise ValueError(
        f"from_codes needs int8 / int4 codes [n, {lay.codes_cols}] and scales [n, {lay.scale_cols}] for d={dim}, "
        f"got dtype {dtype!r}, {codes.shape} and {scale.shape}."
      )
    self = cls.__new__(cls)
    self.phi, self.scale, self.dtype, self._dim = codes, scale, dtype, int(dim)
    self._set_ids(ids, name)
    return self

  @property
  def num_rows(self) -> int:
    return int(self.phi.shape[0])

  @property
  def dim(self) -> int:
    return self._dim

  def require_complete(self) -> None:
    return None

  def read_ids(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    return np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)

  def iter_chunks(self, *, rows_per_chunk: int, process_index: int = 0, process_count: int = 1):
    for a in range(process_index * rows_per_chunk, self.num_rows, process_count * rows_per_chunk):
      b = min(a + rows_per_chunk, self.num_rows)
      yield store_lib.Chunk(a, self.ids[a:b], self.phi[a:b], None if self.scale is None else self.scale[a:b])


def group_sizes(rows: int, k: int) -> tuple[int, ...]:
  """Group sizes of the hierarchical pre-selection for a [Q, rows] score block ((), (g,) or (g, g))."""
  g = 1 << max(3, min(8, round(math.log2(max(rows / k, 1)) / 3)))
  if rows >= 4 * k * g * g:
    return (g, g)
  if rows >= 4 * k * g:
    return (g,)
  return ()


def _best_columns(x: jax.Array, k: int, kernel: bool) -> jax.Array:
  """The columns of the k largest entries of each row of x [R, n], in increasing order (`lax.top_k`'s set).

  kernel: picked by `narrow_topk`'s Pallas kernel (GPU; rows of at most `narrow_topk.MAX_COLUMNS`) instead
  of `lax.top_k` and a sort: the same columns.
  """
  if kernel and x.shape[1] <= narrow_topk.MAX_COLUMNS:
    return narrow_topk.top_k_indices(x, k, ascending=True)
  return jnp.sort(lax.top_k(x, k)[1], axis=-1)


def _top_k(x: jax.Array, k: int, kernel: bool) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(x, k)`, or the same values and columns by `narrow_topk`'s kernel (see `_best_columns`)."""
  if kernel and x.shape[1] <= narrow_topk.MAX_COLUMNS:
    i = narrow_topk.top_k_indices(x, k)
    return jnp.take_along_axis(x, i, axis=-1), i
  return lax.top_k(x, k)


def _candidates(vals: jax.Array, k: int, groups: tuple[int, ...], kernel: bool = False) -> tuple[jax.Array, jax.Array]:
  """A superset of the top-k columns of vals [Q, c], as (values, column indices), indices increasing.

  Columns are split into groups of groups[0]; only the k groups with the largest
  maxima can hold top-k elements (a group whose max ranks below k other groups'
  maxima has k larger elements above all of its own), and those k groups are
  found the same way one level up (groups[1:]). The result has k * groups[0]
  columns. Ties rank by lower column, as `lax.top_k` does, because candidate
  indices stay increasing at every level (so the k best, taken in increasing
  candidate order, are in increasing column order). kernel: see `_best_columns`.
  """
  q, c = vals.shape
  if not groups:
    return vals, jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (q, c))
  g = groups[0]
  grouped = vals.reshape(q, c // g, g)
  cand_v, cand_i = _candidates(grouped.max(axis=-1), k, groups[1:], kernel)
  gi = jnp.take_along_axis(cand_i, _best_columns(cand_v, k, kernel), axis=-1)  # [Q, k] best groups, in column order
  new_vals = jnp.take_along_axis(grouped, gi[:, :, None], axis=1).reshape(q, k * g)
  return new_vals, (gi[:, :, None] * g + jnp.arange(g, dtype=jnp.int32)).reshape(q, k * g)


def _merge_running(vals, rows, new_vals, row0, k, groups=()):
  """Exact top-k of [running (vals, rows) [Q, k], new_vals [Q, c] at rows row0 + column].

  `groups` (see `_candidates`) first narrows the c new columns to a few k * g
  candidates, so that `lax.top_k` never runs over a long row: on a GPU the
  selection then costs a fraction of the score matmul. Candidates follow the
  running list, whose rows are all lower, in increasing-row order, so
  `lax.top_k`'s lower-index-first rule breaks ties by lower row.
  """
  span = math.prod(groups)
  pad = -new_vals.shape[1] % span
  if pad:
    new_vals = jnp.pad(new_vals, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  new_vals, cols = _candidates(new_vals, k, tuple(groups))
  v, i = lax.top_k(jnp.concatenate([vals, new_vals], axis=-1), k)
  return v, jnp.take_along_axis(jnp.concatenate([rows, row0 + cols], axis=-1), i, axis=-1)


def _merge_both(run_v, run_r, s, scale, valid, row0, k, groups=(), kernel=False):
  """`_merge_running` of both sides at once, bitwise equal to the two calls the reference step makes.

  run_v, run_r: [2Q, k] running lists, top side (keys s * scale) then bottom side (keys -(s * scale));
  s: [Q, c] raw scores; scale: [c] or None; valid: [c]. Returns the new [2Q, k] lists.

  The same selection as `_merge_running`, arranged for the accelerator: s is the only [Q, c] buffer
  (the keys are recomputed where they are read: in the group maxima, one pass over s for both sides,
  and at the k * g gathered candidates), and every later op runs once over both sides' [2Q, ...]
  rows instead of once per side (half the small kernels). Same ops on the same values, same order.
  kernel: the selections by `narrow_topk`'s Pallas kernel instead of `lax.top_k` and sorts: the k best
  groups straight from all first-level maxima where they fit in its rows (else the levels' k best groups),
  then the final k. The same columns, so the same result.
  """
  q = s.shape[0]
  pad = -s.shape[1] % math.prod(groups)
  if pad:  # padded columns are invalid: -inf keys on both sides, as the reference pads its keys
    s, valid = jnp.pad(s, ((0, 0), (0, pad))), jnp.pad(valid, (0, pad))
    scale = None if scale is None else jnp.pad(scale, (0, pad), constant_values=1)

  def keys(raw, sc, ok):  # (top keys, bottom keys) of raw scores: the reference's where(valid, +-(s * scale), -inf)
    x = raw if sc is None else raw * sc
    return jnp.where(ok, x, -jnp.inf), jnp.where(ok, -x, -jnp.inf)

  if not groups:
    top, bot = keys(s, None if scale is None else scale[None], valid[None])
    cand_v = jnp.concatenate([top, bot])
    cols = jnp.broadcast_to(jnp.arange(s.shape[1], dtype=jnp.int32), cand_v.shape)
  else:
    g, c = groups[0], s.shape[1]
    top, bot = keys(s, None if scale is None else scale[None], valid[None])
    maxima = jnp.concatenate([top.reshape(q, c // g, g).max(axis=-1), bot.reshape(q, c // g, g).max(axis=-1)])
    if kernel and maxima.shape[1] <= narrow_topk.MAX_COLUMNS:  # the kernel takes the k best of all maxima at once
      gi = _best_columns(maxima, k, kernel)  # the same k groups as the levels above find (see `_candidates`)
    else:
      cand_v, cand_i = _candidates(maxima, k, tuple(groups[1:]), kernel)
      gi = jnp.take_along_axis(cand_i, _best_columns(cand_v, k, kernel), axis=-1)  # [2Q, k] best groups, in order
    cols = (gi[:, :, None] * g + jnp.arange(g, dtype=jnp.int32)).reshape(2 * q, k * g)
    raw = jnp.concatenate([jnp.take_along_axis(s, cols[:q], axis=-1), jnp.take_along_axis(s, cols[q:], axis=-1)])
    sc = None if scale is None else scale[cols]
    ok = valid[cols]
    top, _ = keys(raw[:q], None if sc is None else sc[:q], ok[:q])
    _, bot = keys(raw[q:], None if sc is None else sc[q:], ok[q:])
    cand_v = jnp.concatenate([top, bot])
  v, i = _top_k(jnp.concatenate([run_v, cand_v], axis=-1), k, kernel)
  return v, jnp.take_along_axis(jnp.concatenate([run_r, row0 + cols], axis=-1), i, axis=-1)


class DeviceChunk(NamedTuple):
  """A chunk on the devices, ready for `StreamingTopK.update_device` (see `StreamingTopK.put`)."""

  start: int
  rows: int  # valid length before padding
  phi: jax.Array  # [c, d], sharded by rows
  valid: jax.Array  # [c] bool
  inv_norms: jax.Array | None  # [c] float32 from a NormCache, or None (computed by the step's norm function)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """x with zero rows appended up to `rows` (first axis)."""
  out = np.zeros((rows,) + x.shape[1:], x.dtype)
  out[: x.shape[0]] = x
  return out


def _pad_rows_any(x, rows: int):
  """`_pad_rows` of a host array, or the same on the devices for a `jax.Array`."""
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0))) if isinstance(x, jax.Array) else _pad_rows(x, rows)


@functools.lru_cache(maxsize=32)
def _dequantizer(mesh: Mesh, store_dtype: str, dim: int, matmul_dtype: str):
  """Jitted (codes, scales) -> [c, dim] rows in the matmul dtype, row-sharded like a float chunk (`quantize`)."""
  mm = jnp.bfloat16 if matmul_dtype == "bfloat16" else jnp.float32
  return jax.jit(
    lambda codes, scale: quantize.dequantize(codes, scale, store_dtype, dim=dim, xp=jnp).astype(mm),
    out_shardings=NamedSharding(mesh, P(tuple(mesh.axis_names), None)),
  )


def put_in_pieces(x: np.ndarray, sharding: NamedSharding, *, piece_bytes: int, pinned: bool = False) -> jax.Array:
  """Host rows x [c, ...] on the devices of `sharding` (rows split over them), copied `piece_bytes` at a time.

  Each device's rows cross as back-to-back copies of at most `piece_bytes` and are joined on that device.
  Why: on the H200 host one 256 MiB `device_put` from pageable memory ran at 7.4 GB/s, the same bytes as
  32 MiB pieces at 16.9 GB/s (PJRT overlaps one piece's staging copy with the previous one's DMA;
  BENCHMARKS.md, Streaming). The join costs one device-side copy of the chunk (and its memory). `pinned`: each piece is
  first staged in pinned host memory (where the devices have it), then copied at the DMA rate.
  piece_bytes <= 0: one `device_put` of the whole chunk (staged whole when `pinned`).
  """
  if piece_bytes <= 0:
    stage = _pinned_like(sharding) if pinned else None
    return jax.device_put(x if stage is None else jax.device_put(x, stage), sharding)
  rows = max(1, piece_bytes // max(1, x[:1].nbytes))
  shards = []
  for device, index in sharding.addressable_devices_indices_map(x.shape).items():
    part, dst = x[index], jax.sharding.SingleDeviceSharding(device)
    stage = _pinned_like(dst) if pinned else None
    pieces = []
    for a in range(0, max(1, part.shape[0]), rows):
      piece = part[a : a + rows]
      if stage is not None:
        piece = jax.device_put(piece, stage)
      pieces.append(jax.device_put(piece, dst))
    shards.append(pieces[0] if len(pieces) == 1 else _join(pieces))
  return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


@jax.jit
def _join(pieces):
  return jnp.concatenate(pieces)


def _pinned_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding | None:
  """`sharding` in pinned host memory, or None where the devices have none."""
  try:
    if all("pinned_host" in [m.kind for m in d.addressable_memories()] for d in sharding.device_set):
      return sharding.with_memory_kind("pinned_host")
  except (AttributeError, NotImplementedError, ValueError):  # older jax / backends without memory kinds
    pass
  return None


def _sort_by_value_then_row(vals, rows, k):
  """[Q, M] (value descending, row ascending) -> first k; padding (-inf) last."""
  neg, r = lax.sort((-vals, rows), dimension=-1, num_keys=2)
  return -neg[:, :k], r[:, :k]


@functools.lru_cache(maxsize=32)
def _compiled(
  mesh: Mesh, *, k: int, normalize: bool, matmul_dtype: str, hierarchical: bool, select: str, has_inv: bool
):
  """(step, norms, final) jitted functions of a `StreamingTopK` configuration.

  Shared by every instance with the same configuration, so a second `retrieve`
  call (another query batch, another scan) reuses the compiled step.
  """
  axes = tuple(mesh.axis_names)
  mm = jnp.bfloat16 if matmul_dtype == "bfloat16" else jnp.float32
  hi = lax.Precision.HIGHEST if mm == jnp.float32 else None  # no TF32 in the exact mode

  def local_norms(inv, phi):  # the reference step's 1 / ||R^{-1/2} phi||, as its own function
    return hessian_lib.inv_norm(phi if inv is None else hessian_lib.apply_inv_sqrt(phi, inv, dtype=mm))

  def local_step(qm, inv, state, phi, scale, valid, row0):  # select="reference": the previous step
    q = qm.shape[0]
    (top_v, bot_v), (top_r, bot_r) = ((x[0, :q], x[0, q:]) for x in state)
    c = phi.shape[0]
    row0 = row0 + lax.axis_index(axes) * c  # this device's first row
    groups = group_sizes(c, k) if hierarchical else ()
    phi = phi.astype(mm)
    s = jnp.dot(qm, phi.T, precision=hi, preferred_element_type=jnp.float32)  # [Q, c]
    if normalize:  # scale score columns by 1 / ||R^{-1/2} phi|| (given: the fused step's norms, to compare)
      if scale is None:
        scale = hessian_lib.inv_norm(phi if inv is None else hessian_lib.apply_inv_sqrt(phi, inv, dtype=mm))
      s = s * scale[None, :]
    top_v, top_r = _merge_running(top_v, top_r, jnp.where(valid, s, -jnp.inf), row0, k, groups)
    bot_v, bot_r = _merge_running(bot_v, bot_r, jnp.where(valid, -s, -jnp.inf), row0, k, groups)
    return jnp.concatenate([top_v, bot_v])[None], jnp.concatenate([top_r, bot_r])[None]

  def local_step_fused(qm, state, phi, scale, valid, row0):
    c = phi.shape[0]
    row0 = row0 + lax.axis_index(axes) * c  # this device's first row
    groups = group_sizes(c, k) if hierarchical else ()
    s = jnp.dot(qm, phi.astype(mm).T, precision=hi, preferred_element_type=jnp.float32)  # [Q, c]
    v, r = _merge_both(state[0][0], state[1][0], s, scale, valid, row0, k, groups, kernel=select == "kernel")
    return v[None], r[None]

  def local_final(state):
    out = []
    q = state[0].shape[1] // 2
    for side in (slice(0, q), slice(q, 2 * q)):
      # [1, Q, k] per device -> [Q, n_dev * k], merged by (value desc, row asc).
      v = lax.all_gather(state[0][0, side], axes, axis=1, tiled=True)
      r = lax.all_gather(state[1][0, side], axes, axis=1, tiled=True)
      out += list(_sort_by_value_then_row(v, r, k))
    return tuple(out)

  sspec = (P(axes, None, None),) * 2  # `state_layout`
  inv_spec = P() if has_inv else None
  scale_spec = P(axes) if normalize else None
  if select == "reference":
    step = {  # norms inside the step (the previous step), or given
      given: jax.jit(
        mesh_lib.shard_map(
          local_step,
          mesh=mesh,
          in_specs=(P(), inv_spec, sspec, P(axes, None), scale_spec if given else None, P(axes), P()),
          out_specs=sspec,
        ),
        donate_argnums=(2,),
      )
      for given in (False, True)
    }
  else:
    step = jax.jit(
      mesh_lib.shard_map(
        local_step_fused,
        mesh=mesh,
        in_specs=(P(), sspec, P(axes, None), scale_spec, P(axes), P()),
        out_specs=sspec,
      ),
      donate_argnums=(1,),
    )
  norms = jax.jit(mesh_lib.shard_map(local_norms, mesh=mesh, in_specs=(inv_spec, P(axes, None)), out_specs=P(axes)))
  final = jax.jit(mesh_lib.shard_map(local_final, mesh=mesh, in_specs=(sspec,), out_specs=(P(),) * 4))
  return step, norms, final


def state_layout(n_dev: int, q: int, k: int) -> tuple[tuple[tuple[int, ...], Any, float], ...]:
  """(shape, dtype, initial value) of `StreamingTopK`'s running state: values and rows [n_dev, 2Q, k].

  Rows [0, Q) are the top side (keys: scores), [Q, 2Q) the bottom side (keys: -scores); both maximize. Two
  distinct buffers, donated to each step, in the layout `_merge_both` works in (four [Q, k] arrays cost the
  fused step a concatenation and four copies per chunk).
  """
  return ((n_dev, 2 * q, k), np.float32, -np.inf), ((n_dev, 2 * q, k), np.int32, -1)


STEPS_IN_FLIGHT = 4  # `retrieve`: steps dispatched and not seen done (each holds its chunk on the devices)


class StreamingTopK:
  """Running exact top-k / bottom-k of e_q . T(phi) over chunks fed in row order.

  Args:
    queries: [Q, d] unit query encodings (numpy or jax array).
    k: how many proponents / opponents per query (<= rows that will be fed).
    mesh: mesh of this host's devices (default: all local devices); chunk rows
      are split over all of its axes.
    inv_sqrt: train-side R^{-1/2}, [d, d] or [B, d/B, d/B], or None.
    normalize: unit-normalize train encodings (cosine); False = dot product.
    matmul_dtype: "bfloat16" (f32 accumulation) or "float32".
    hierarchical: group-max pre-selection before `lax.top_k` (exact; faster on GPU).
    select: "auto" (default), "fused", "kernel" or "reference" (see `RetrieveOptions`).
    store_dtype: the chunks' dtype (`EncodingStore.dtype`). "int8" / "int4":
      `put` / `update` take the stored codes and scales, which go to the device as
      they are and are dequantized there, into the matmul dtype, right after the
      copy (scores equal, bit for bit, those of a float32 store of the dequantized
      rows with matmul_dtype="float32", of a bfloat16 one with "bfloat16").

  Feeding: `update(start=, ids=, phi=)` per chunk, or `put(...)` (pad, copy to the devices; may run
  on another thread, ahead of the step) then `update_device(chunk)`. Except with select="reference" the norms
  1 / ||R^{-1/2} phi|| come from `put(inv_norms=...)` (a `norms.NormCache`) or are computed by a
  separate jitted function that `update_device` returns, for the caller to cache.
  """

  def __init__(
    self,
    queries,
    *,
    k: int,
    mesh: Mesh | None = None,
    inv_sqrt=None,
    normalize: bool = RetrieveOptions.normalize,
    matmul_dtype: str = RetrieveOptions.matmul_dtype,
    hierarchical: bool = True,
    select: str = RetrieveOptions.select,
    store_dtype: str = "float32",
    copy_piece_mib: int = RetrieveOptions.copy_piece_mib,
  ):
    queries = np.asarray(queries, np.float32) if not isinstance(queries, jax.Array) else queries
    if queries.ndim != 2 or queries.shape[0] == 0:
      raise ValueError(f"Query encodings must be [Q, d] with Q > 0, got shape {queries.shape}: no queries to score.")
    if k <= 0:
      raise ValueError(f"k (config.retrieve.k) must be > 0, got {k}.")
    if matmul_dtype not in ("bfloat16", "float32"):
      raise ValueError(f"matmul_dtype must be 'bfloat16' or 'float32', got {matmul_dtype!r}.")
    if select == "auto":
      select = "kernel" if narrow_topk.available() else "fused"
    if select not in ("fused", "kernel", "reference"):
      raise ValueError(
        f"select (config.retrieve.select) must be 'auto', 'fused', 'kernel' or 'reference', got {select!r}."
      )
    self.mesh = mesh or Mesh(np.asarray(jax.local_devices()), ("data",))
    if any(d.process_index != jax.process_index() for d in self.mesh.devices.flat):
      raise ValueError("StreamingTopK needs a mesh of this process's devices (jax.local_devices()).")
    self.k, self.dim, self.hierarchical, self.select = k, queries.shape[1], hierarchical, select
    self.normalize = normalize
    self.piece_bytes = int(copy_piece_mib) << 20
    quantized = quantize.is_quantized(store_dtype)
    self.store_dtype = store_dtype
    self._store_layout = quantize.layout(store_dtype if quantized else "float32", self.dim)
    self.n_dev = self.mesh.devices.size
    axes = tuple(self.mesh.axis_names)
    rep = NamedSharding(self.mesh, P())
    self._rows_sharding = NamedSharding(self.mesh, P(axes))
    self._phi_sharding = NamedSharding(self.mesh, P(axes, None))
    self._pinned_sharding = _pinned_like(self._phi_sharding)
    mm = jnp.bfloat16 if matmul_dtype == "bfloat16" else jnp.float32
    if inv_sqrt is not None:
      inv_sqrt = jnp.asarray(inv_sqrt, jnp.float32)
      if inv_sqrt.shape[-1] * (inv_sqrt.shape[0] if inv_sqrt.ndim == 3 else 1) != self.dim:
        raise ValueError(f"inv_sqrt shape {inv_sqrt.shape} does not match encoding dim {self.dim}.")
      inv_sqrt = jax.device_put(inv_sqrt, rep)
    # R^{-1/2} is folded into the queries once: e_q . (R^{-1/2} phi) = (R^{-1/2} e_q) . phi. Only the
    # norm ||R^{-1/2} phi|| needs the train-side transform, so the scaled encodings are never stored.
    q_fold = jnp.asarray(queries, jnp.float32)
    if inv_sqrt is not None:
      q_fold = hessian_lib.apply_inv_sqrt(q_fold, inv_sqrt)
    self._q = jax.device_put(q_fold.astype(mm), rep)
    self._inv = None if inv_sqrt is None or not normalize else inv_sqrt.astype(mm)
    q, n_dev = queries.shape[0], self.n_dev
    state_sharding = NamedSharding(self.mesh, P(axes))  # as shard_map returns it: one jit cache entry
    self._state = tuple(
      jax.device_put(np.full(shape, fill, dtype), state_sharding) for shape, dtype, fill in state_layout(n_dev, q, k)
    )
    self._unseen = 0  # steps dispatched since the devices were last seen done with them (`throttle`)
    self.step_waits = 0  # how often `throttle` waited for the devices
    self._step, self._norms, self._final = _compiled(
      self.mesh, k=k, normalize=normalize, matmul_dtype=matmul_dtype, hierarchical=hierarchical, select=select,
      has_inv=self._inv is not None,
    )  # fmt: skip

    # int8 / int4 chunks cross to the device as codes + scales and become rows in the matmul dtype there, in
    # their own small program (`put`): the step is then the very program (and input) of a float store of the
    # dequantized rows, so the scores are the same bit for bit (fused into the step, XLA would reorder the
    # norms' reductions). Costs nothing extra: the matmul reads a materialized operand either way.
    self._dequantize = _dequantizer(self.mesh, store_dtype, self.dim, matmul_dtype) if quantized else None

  def layout(self, rows_per_chunk: int) -> str:
    """The per-device shape the step computes norms over (part of a `norms.NormCache` key)."""
    return f"{self.padded_rows(rows_per_chunk) // self.n_dev}x{self.n_dev}"

  def padded_rows(self, rows: int) -> int:
    """Chunk rows rounded up to a multiple of the device count (one compiled shape)."""
    return -(-rows // self.n_dev) * self.n_dev

  def put(
    self,
    *,
    start: int,
    ids: np.ndarray,
    phi,
    pad_to: int | None = None,
    inv_norms: np.ndarray | None = None,
    pinned: bool = False,
    scale=None,
  ) -> DeviceChunk:
    """Pads rows [start, start + n) and copies them to the devices (asynchronously where jax can).

    Rows with id -1 are ignored. `pad_to` pads the chunk (to keep one compiled
    shape); it is rounded up to a multiple of the device count. `inv_norms`
    [n]: cached 1 / ||R^{-1/2} phi|| of these rows (what `update_device` returned).
    `pinned` stages a host `phi` in pinned host memory first (where the devices
    have it): the device copy then runs at the link's DMA rate. For an int8 /
    int4 `store_dtype`, `phi` is the chunk's codes and `scale` its scales: both
    are copied as they are and dequantized on the devices (the chunk's `phi`).
    """
    n = ids.shape[0]
    lay = self._store_layout
    want_scale = (n, lay.scale_cols) if lay.scale_cols else None
    if phi.shape != (n, lay.codes_cols) or (None if scale is None else tuple(scale.shape)) != want_scale:
      raise ValueError(
        f"Chunk phi shape {phi.shape} != ({n}, {lay.codes_cols}) of {self.store_dtype} rows of d={self.dim}, "
        f"or scale shape {None if scale is None else scale.shape} != {want_scale} (scales: int8 / int4 only)."
      )
    if scale is not None and scale.dtype != np.float32:
      scale = scale.astype(np.float32)
    c = self.padded_rows(max(n, pad_to or 0))
    if start + c >= 2**31:
      raise ValueError("Store rows beyond 2**31 are not supported (int32 row indices).")
    valid = np.zeros((c,), bool)
    valid[:n] = ids >= 0
    if c != n:
      phi, scale = (None if x is None else _pad_rows_any(x, c) for x in (phi, scale))
    if pinned and self._pinned_sharding is not None and scale is not None and not isinstance(scale, jax.Array):
      scale = jax.device_put(scale, self._pinned_sharding)
    if isinstance(phi, jax.Array):
      phi = jax.device_put(phi, self._phi_sharding)
    else:
      phi = put_in_pieces(
        phi, self._phi_sharding, piece_bytes=self.piece_bytes, pinned=pinned and self._pinned_sharding is not None
      )
    if self._dequantize is not None:  # codes + scales crossed; rows in the matmul dtype from here on
      phi = self._dequantize(phi, jax.device_put(scale, self._phi_sharding))
    if inv_norms is not None:
      if not self.normalize:
        raise ValueError("inv_norms (cached norms) need normalize=True.")
      inv_norms = np.asarray(inv_norms, np.float32)
      if inv_norms.shape != (n,):
        raise ValueError(f"inv_norms has shape {inv_norms.shape}; expected ({n},).")
      inv_norms = jax.device_put(_pad_rows(inv_norms, c), self._rows_sharding)
    return DeviceChunk(start, n, phi, jax.device_put(valid, self._rows_sharding), inv_norms)

  def update_device(self, chunk: DeviceChunk) -> jax.Array | None:
    """Dispatches the step over a chunk from `put`; returns its [c] inverse norms when it computed them."""
    computed = None
    if self.select == "reference":
      step = self._step[chunk.inv_norms is not None]
      self._state = step(
        self._q, self._inv, self._state, chunk.phi, chunk.inv_norms, chunk.valid, np.int32(chunk.start)
      )
      self._unseen += 1
      return None
    scale = chunk.inv_norms
    if self.normalize and scale is None:
      scale = computed = self._norms(self._inv, chunk.phi)
    self._state = self._step(self._q, self._state, chunk.phi, scale, chunk.valid, np.int32(chunk.start))
    self._unseen += 1
    return computed

  def throttle(self, max_in_flight: int) -> None:
    """Waits for the devices once `max_in_flight` steps were dispatched since they were last seen done.

    For a loop that feeds the devices faster than they score: its dispatched steps, and the chunks
    they hold, then stay bounded. The state is donated to each step, so only the newest one can be
    waited on; once it is ready, every step before it is done. In a loop bound by the copies it
    never waits. (Not in `update_device`: the step benchmarks time unbounded dispatch.)
    """
    if self._unseen and self._state[0].is_ready():
      self._unseen = 0
    if self._unseen >= max(1, max_in_flight):
      self.step_waits += 1
      jax.block_until_ready(self._state)
      self._unseen = 0

  def update(
    self,
    *,
    start: int,
    ids: np.ndarray,
    phi,
    pad_to: int | None = None,
    inv_norms: np.ndarray | None = None,
    scale=None,
  ) -> jax.Array | None:
    """Scores rows [start, start + n) against the queries (asynchronous dispatch): `put` + `update_device`."""
    return self.update_device(self.put(start=start, ids=ids, phi=phi, pad_to=pad_to, inv_norms=inv_norms, scale=scale))

  def programs(self, rows_per_chunk: int) -> dict[str, Any]:
    """The compiled programs a chunk of `rows_per_chunk` rows runs: "step", and "norms" where the step needs them.

    Their `memory_analysis()` is what a chunk costs on each device (it depends on Q, k, d and the chunk's
    rows, not on the store's size). On an `abstract()` copy they compile with no device at all.
    """
    c = self.padded_rows(rows_per_chunk)
    phi = jax.ShapeDtypeStruct((c, self.dim), jnp.bfloat16, sharding=self._phi_sharding)
    valid = jax.ShapeDtypeStruct((c,), jnp.bool_, sharding=self._rows_sharding)
    if self.select == "reference":
      return {
        "step": self._step[False].lower(self._q, self._inv, self._state, phi, None, valid, jnp.int32(0)).compile()
      }
    out = {}
    scale = None
    if self.normalize:
      scale = jax.ShapeDtypeStruct((c,), jnp.float32, sharding=self._rows_sharding)
      out["norms"] = self._norms.lower(self._inv, phi).compile()
    out["step"] = self._step.lower(self._q, self._state, phi, scale, valid, jnp.int32(0)).compile()
    return out

  def abstract(self) -> StreamingTopK:
    """A copy whose queries, R^{-1/2} and state are shapes only: its `programs` compile for a topology with
    no devices attached (`jobs/compile_check.py` builds it under `jax.eval_shape`)."""
    out = copy.copy(self)
    rep = NamedSharding(self.mesh, P())
    out._q = jax.ShapeDtypeStruct(self._q.shape, self._q.dtype, sharding=rep)
    if self._inv is not None:
      out._inv = jax.ShapeDtypeStruct(self._inv.shape, self._inv.dtype, sharding=rep)
    state_sharding = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    out._state = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding) for x in self._state)
    return out

  def wait(self) -> None:
    """Blocks until every dispatched `update` has run (for timing; results need no wait)."""
    jax.block_until_ready(self._state)

  def local_result(self) -> tuple[np.ndarray, ...]:
    """This host's merged (top_v, top_rows, bottom_negv, bottom_rows), each [Q, k]."""
    return tuple(np.asarray(x) for x in self._final(self._state))


def _merge_hosts(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
  """Merges per-host [Q, k] (value, row) lists by (value desc, row asc)."""
  v = np.concatenate([p[0] for p in parts], axis=1)
  r = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
  order = np.lexsort((r, -v), axis=1)[:, :k]  # last key is primary
  return np.take_along_axis(v, order, 1), np.take_along_axis(r, order, 1)


def device_chunks(
  topk: StreamingTopK, chunks, *, pad_to: int, ahead: int = 2, pinned: bool = False, norms=None, buffers=None
):
  """`topk.put` of every chunk of the iterable `chunks`, run on a background thread `ahead` chunks in front.

  The copy of chunk j + 1 to the devices then overlaps the step over chunk j
  (double buffering at ahead=2), and the store reads that `chunks` keeps in
  flight overlap both. `norms` (a `norms.NormCache`) supplies cached inverse
  norms. `buffers`: the `host_buffers.BufferPool` the chunks were read into
  (`EncodingStore.iter_chunks(buffers=)`); each chunk's buffer goes back to it
  once its copy to the devices is done. A chunk with a `check` (mapped, read
  with `defer_checks`) is copied while its crc32c checks run, and is yielded
  only once they passed: the first chunk's copy no longer waits for them. Yields
  `DeviceChunk`s in order; an error in the reader or a check is raised here. At
  most `ahead` + 2 chunks are on the devices at once; ahead=0 copies inline
  (the previous loop).
  """

  def put_all():
    for ch in chunks:
      cached = None if norms is None else norms.get(ch.start, ch.start + len(ch.ids))
      dev = topk.put(
        start=ch.start, ids=ch.ids, phi=ch.phi, pad_to=pad_to, inv_norms=cached, pinned=pinned, scale=ch.scale
      )
      if buffers is not None and ch.buffer is not None:
        buffers.release(ch.buffer, after=dev.phi)  # ready = copied (or dequantized from the copy)
      if ch.lease is not None:
        ch.lease.release(after=dev.phi)  # a mapped window: evictable once copied (the checks hold their views)
      yield dev, ch.check

  def checked(feed):
    try:
      for dev, check in feed:
        if check is not None:
          check()  # here, not on the feeding thread: the next chunks' copies go on meanwhile
        yield dev
    finally:
      feed.close()  # stops the feeding thread when the caller stops early

  return checked(prefetch_lib.ahead(put_all(), depth=ahead, name="retrieve-feed") if ahead > 0 else put_all())


def _windows_for(store, devices: Sequence[Any], mapped_reads: bool) -> mapped_chunks.MappedWindows | None:
  """The mapped windows `retrieve` reads `store` through, or None (not an `EncodingStore` read directly, no CUDA)."""
  if not mapped_reads or not isinstance(store, store_lib.EncodingStore) or not store.direct_reads:
    return None
  return mapped_chunks.shared_windows(devices)


def map_store_ahead(
  store,
  *,
  rows_per_chunk: int = RetrieveOptions.chunk_rows,
  mesh: Mesh | None = None,
  mapped_reads: bool = RetrieveOptions.mapped_reads,
) -> Any:
  """Starts registering `store`'s windows for this host's next `retrieve` (`mapped_chunks`), in the background.

  A process's first scan otherwise registers them as it reads, which stalls its device copies
  (about half the rate of later scans on the H200). `tsj.retrieve` calls this before it encodes
  the queries; `retrieve` itself calls it before its first step compiles. Returns the warm-up's
  future, or None where mapped reads do not apply.
  """
  devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()
  windows = _windows_for(store, devices, mapped_reads)
  if windows is None or store.num_rows == 0:
    return None
  pi, pc = jax.process_index(), jax.process_count()
  return store.map_ahead(
    windows, rows_per_chunk=min(rows_per_chunk, store.num_rows), process_index=pi, process_count=pc
  )


def retrieve(
  store: store_lib.EncodingStore | InMemoryEncodings,
  queries,
  *,
  k: int = RetrieveOptions.k,
  rows_per_chunk: int = RetrieveOptions.chunk_rows,
  mesh: Mesh | None = None,
  inv_sqrt=None,
  normalize: bool = RetrieveOptions.normalize,
  matmul_dtype: str = RetrieveOptions.matmul_dtype,
  select: str = RetrieveOptions.select,
  cache_norms: bool = RetrieveOptions.cache_norms,
  reads_in_flight: int = RetrieveOptions.reads_in_flight,
  transfers_ahead: int = RetrieveOptions.transfers_ahead,
  pinned: bool = RetrieveOptions.pinned,
  copy_piece_mib: int = RetrieveOptions.copy_piece_mib,
  pinned_reads: bool = RetrieveOptions.pinned_reads,
  mapped_reads: bool = RetrieveOptions.mapped_reads,
) -> RetrievalResult:
  """Exact top-k and bottom-k of every query over the whole (complete) store.

  `store`: an `EncodingStore`, or `InMemoryEncodings` for phis in memory.
  `queries`: [Q, d] query encodings, already R^{-1/2}-transformed and unit
  (see `hessian.transform`). The other options: see `RetrieveOptions`.

  Multi-host: every process calls this with the same queries; each reads its own
  chunks and all processes get the same result. k > num_rows is clamped (with a
  warning). See the module docstring for the math, tie order and memory.
  """
  store.require_complete()
  queries = np.asarray(queries, np.float32)
  if queries.ndim != 2 or queries.shape[0] == 0:
    raise ValueError(f"Query encodings must be [Q, d] with Q > 0, got shape {queries.shape}: no queries to score.")
  if queries.shape[1] != store.dim:
    raise ValueError(f"Query dim {queries.shape[1]} != store dim {store.dim} ({store.url}).")
  if k > store.num_rows:
    logging.warning("k=%d > %d rows in %s; clamping k to %d.", k, store.num_rows, store.url, store.num_rows)
    k = store.num_rows
  rows_per_chunk = min(rows_per_chunk, store.num_rows)
  topk = StreamingTopK(
    queries,
    k=k,
    mesh=mesh,
    inv_sqrt=inv_sqrt,
    normalize=normalize,
    matmul_dtype=matmul_dtype,
    select=select,
    store_dtype=getattr(store, "dtype", "float32"),
    copy_piece_mib=copy_piece_mib,
  )
  cache = None
  if cache_norms and normalize and topk.select != "reference":
    cache = norms_lib.NormCache.for_source(
      store, inv_sqrt=inv_sqrt, matmul_dtype=matmul_dtype, layout=topk.layout(rows_per_chunk)
    )
  pi, pc = jax.process_index(), jax.process_count()
  n_chunks = 0
  mine = len(range(pi * rows_per_chunk, store.num_rows, pc * rows_per_chunk))
  prog = progress_lib.Progress(total=mine, unit="chunk", item_unit="rows", name="retrieve")
  pool, windows, read_kw = None, None, {}
  if isinstance(store, store_lib.EncodingStore):
    read_kw = dict(prefetch=max(1, reads_in_flight))
    windows = _windows_for(store, list(topk.mesh.devices.flat), mapped_reads) if mine else None
    if windows is not None:
      read_kw.update(windows=windows, defer_checks=True)  # checked beside the copy (device_chunks)
      store.map_ahead(
        windows, rows_per_chunk=rows_per_chunk, process_index=pi, process_count=pc
      )  # as the step compiles
    if pinned_reads and store.direct_reads and mine:
      # Buffers held at once: the reads in flight, the chunk being copied, the copies not yet done.
      pool = host_buffers.shared_pool(
        list(topk.mesh.devices.flat),
        nbytes=store.phi_bytes(rows_per_chunk),
        max_buffers=min(max(1, reads_in_flight) + transfers_ahead + 1, mine),
      )
      read_kw["buffers"] = pool
  chunks = store.iter_chunks(rows_per_chunk=rows_per_chunk, process_index=pi, process_count=pc, **read_kw)
  computed = collections.deque()  # (start, rows, device norms) to copy into the cache, one step behind

  def keep(done_before: int) -> None:
    while len(computed) > done_before:
      start, n, inv = computed.popleft()
      cache.put(start, start + n, np.asarray(inv)[:n])

  feed = device_chunks(
    topk, chunks, pad_to=rows_per_chunk, ahead=transfers_ahead, pinned=pinned, norms=cache, buffers=pool
  )
  try:
    for chunk in feed:
      topk.throttle(STEPS_IN_FLIGHT)
      inv = topk.update_device(chunk)
      if cache is not None and inv is not None:
        inv.copy_to_host_async()
        computed.append((chunk.start, chunk.rows, inv))
        keep(1)
      n_chunks += 1
      prog.update(n_chunks, items=chunk.rows)
      if prog.due(every_s=30) or n_chunks == mine:
        logging.info(prog.line())
  finally:
    if pool is not None:
      pool.drain()  # kept for later scans (host_buffers.clear() frees them)
      logging.info(
        "Read buffers (kept): %d of %d MiB made, %d MiB page-locked; %d waits for a copy, %d unpooled.",
        pool.made, pool.nbytes >> 20, pool.pinned_bytes >> 20, pool.waits, pool.plain,
      )  # fmt: skip
    if windows is not None:
      logging.info(
        "Mapped store windows: %d reads from kept windows, %d mapped, %d declined; %d MiB page-locked in all.",
        windows.hits, windows.mapped, windows.declined, windows.pinned_bytes >> 20,
      )  # fmt: skip
  if cache is not None:
    keep(0)
    if cache.misses:
      cache.save()
    logging.info(
      "Norm cache %s: %d chunks reused, %d computed.", cache.directory or "(memory)", cache.hits, cache.misses
    )
  top_v, top_r, bot_v, bot_r = topk.local_result()
  logging.info(
    "Process %d scored %d chunks of %d rows (%d waits for the devices to catch up).",
    pi, n_chunks, rows_per_chunk, topk.step_waits,
  )  # fmt: skip
  if pc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    g = multihost_utils.process_allgather((top_v, top_r, bot_v, bot_r), tiled=False)
    top = _merge_hosts([(g[0][i], g[1][i]) for i in range(pc)], k)
    bot = _merge_hosts([(g[2][i], g[3][i]) for i in range(pc)], k)
  else:
    top, bot = (top_v, top_r.astype(np.int64)), (bot_v, bot_r.astype(np.int64))

  def finish(v, r, sign):
    missing = ~np.isfinite(v) | (r < 0)
    return np.where(missing, np.nan, sign * v).astype(np.float32), np.where(missing, -1, r)

  (ts_, tr), (bs, br) = finish(*top, 1.0), finish(*bot, -1.0)
  ti, bi = store.read_ids(np.stack([tr, br]))  # one read of the ids: a retrieve call's fixed cost
  return RetrievalResult(ti, ts_, tr, bi, bs, br)
