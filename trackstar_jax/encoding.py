"""Streaming examples through a `TrackStarEncoder`: into a store, into memory, or batch by batch.

  store = encode_to_store(encoder, corpus, store=open_store(url, ...), batch_size=256)
  phi = encode_to_array(encoder, queries, batch_size=64)        # [N, d] float32 on every process
  for phi, valid in phi_batches(encoder, corpus, batch_size=64): ...   # device arrays (global), for streamed sums

`examples` is anything with `len()` and `.batch(rows) -> batch dict` (a
`data.batching.Examples`, or `as_examples(...)` of batch dicts).

Multi-host: every process calls the same function with the same examples.
Encoding runs in lockstep on the global mesh (every process makes the same
number of encoder calls, padding with empty batches); into a store, each
process encodes and writes its own chunks, and a restart encodes only the
chunks not yet committed (the store is the same as an uninterrupted run's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import functools
import hashlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax import batch as batch_lib
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import prefetch as prefetch_lib
from trackstar_jax import progress as progress_lib
from trackstar_jax import quantize
from trackstar_jax import store as store_lib

_FIELDS = batch_lib.BATCH_KEYS


class BatchRows:
  """Examples as arrays (batch fields, one row per example) with `len()` and `.batch(rows)`."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    missing = [k for k in _FIELDS if k not in arrays]
    if missing:
      raise ValueError(f"Batches are missing fields {missing}; each batch needs {_FIELDS} (see trackstar_jax.batch).")
    self.arrays = {k: np.asarray(arrays[k]) for k in _FIELDS}
    n = {k: len(v) for k, v in self.arrays.items()}
    if len(set(n.values())) != 1:
      raise ValueError(f"Batch fields have different numbers of rows: {n}.")
    self.ids = self.arrays["ids"]

  def __len__(self) -> int:
    return int(len(self.ids))

  def batch(self, rows) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in self.arrays.items()}


def as_examples(data: Any):
  """`data` as random-access examples: Examples-like objects pass; batch dicts / iterables are concatenated."""
  if hasattr(data, "batch") and hasattr(data, "__len__"):
    return data
  if isinstance(data, Mapping):
    return BatchRows(data)
  if not isinstance(data, Iterable):
    raise TypeError(
      f"Cannot encode a {type(data).__name__}: pass data.batching.Examples, a batch dict or an iterable of batch dicts."
    )
  batches = [dict(b) for b in data]
  if not batches:
    raise ValueError("No batches to encode: the iterable is empty.")
  rows = BatchRows(
    {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in _FIELDS if all(k in b for b in batches)}
  )
  keep = rows.ids >= 0  # padding rows of the user's batches are not examples
  return BatchRows({k: v[keep] for k, v in rows.arrays.items()})


def fingerprint(examples) -> str:
  """sha256 of the examples' ids, tokens and loss masks: what a store's rows were computed from."""
  h = hashlib.sha256()
  n = len(examples)
  for a in range(0, n, 65536):
    b = examples.batch(np.arange(a, min(a + 65536, n)))
    for k in ("ids", "inputs", "loss_mask"):
      h.update(np.ascontiguousarray(b[k]).tobytes())
  return h.hexdigest()


def store_meta(
  encoder,
  *,
  num_rows: int,
  corpus_fingerprint: str,
  dtype: str = store_lib.StoreMeta.dtype,
  chunk_rows: int = store_lib.StoreMeta.chunk_rows,
  checkpoint: str = "",
  step: int = -1,
  extra: Mapping[str, Any] | None = None,
) -> store_lib.StoreMeta:
  """What identifies an encoding: the encoder's options and traced blocks, the corpus, the checkpoint."""
  o = encoder.options
  described = dict(
    param_regex=str(o.param_regex),
    block_regex=str(o.block_regex),
    d_in=int(o.d_in),
    d_out=int(o.d_out),
    layers_per_group=int(o.layers_per_group),
    bias_correction=bool(o.bias_correction),
  )
  return store_lib.StoreMeta(
    num_rows=int(num_rows),
    dim=int(encoder.dim),
    dtype=str(dtype),
    chunk_rows=int(chunk_rows),
    checkpoint=str(checkpoint),
    step=int(step),
    projection_seed=int(o.seed),
    blocks=tuple(encoder.blocks),
    correction=str(encoder.correction.kind),
    corpus_fingerprint=str(corpus_fingerprint),
    extra={**described, **dict(extra or {})},
  )


@functools.cache  # one compiled quantizer per dtype (later encode calls reuse it)
def device_converter(dtype: str) -> Callable[[jax.Array], Any] | None:
  """phi [B, d] on the device -> what a store of `dtype` holds, before the copy to the host (None: as is).

  bfloat16: half the bytes to copy and no host-side conversion (the same
  round-to-nearest-even); int8 / int4: `quantize.Quantized` codes and scales
  (a quarter / an eighth of the float32 bytes, and no host-side quantization).
  """
  if dtype == "bfloat16":
    return lambda phi: phi.astype(jnp.bfloat16)
  if quantize.is_quantized(dtype):
    return jax.jit(functools.partial(quantize.quantize, dtype=dtype, xp=jnp))
  return None


def _host_batches(examples, rows: np.ndarray, *, host_batch: int, num_batches: int):
  """(valid rows, padded batch) of this process's `rows` in exactly `num_batches` batches (lockstep across hosts)."""
  for j in range(num_batches):
    part = rows[j * host_batch : (j + 1) * host_batch]
    yield len(part), batch_lib.pad_rows(examples.batch(part), host_batch)


def _dispatch(encoder, batches, *, convert=None, copy_early: bool = False) -> list[tuple[int, Any]]:
  """Starts encoding (valid rows, padded batch) pairs; returns [(valid rows, phi)] still being computed.

  One process: device arrays (JAX dispatch is asynchronous), so the caller can
  do host work meanwhile; `_collect` waits. `convert` (`device_converter` of
  the store's dtype) runs on the device, before the copy to the host.
  `copy_early` starts each device-to-host copy as soon as its batch is
  computed, instead of when `_collect` asks for it.
  """
  out = []
  for n, batch in batches:
    if jax.process_count() == 1:
      phi = encoder.encode(batch)
      phi = phi if convert is None else convert(phi)
      if copy_early:
        for x in jax.tree.leaves(phi):  # codes and scales of a quantized store
          x.copy_to_host_async()
      out.append((n, phi))
    else:
      out.append((n, encoder.encode_local(batch)))
  return out


def _dispatch_rows(
  encoder, examples, rows: np.ndarray, *, host_batch: int, num_batches: int, convert=None
) -> list[tuple[int, Any]]:
  """`_dispatch` of `rows` in exactly `num_batches` encoder calls (lockstep across hosts)."""
  batches = _host_batches(examples, rows, host_batch=host_batch, num_batches=num_batches)
  return _dispatch(encoder, batches, convert=convert)


def _collect(parts: list[tuple[int, Any]], dim: int) -> Any:
  """[rows, d] numpy of `_dispatch_rows`' output (waits for the device); `Quantized` rows stay `Quantized`."""
  parts = [jax.tree.map(lambda x, n=n: np.asarray(x)[:n], phi) for n, phi in parts if n]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts) if parts else np.zeros((0, dim), np.float32)


def phi_batches(
  encoder, examples, *, batch_size: int, name: str = "encode", log_every_s: float = 30.0, prefetch: int = 2
):
  """Yields (phi [B, d] on the devices, valid [B]) per batch of `examples`: for streamed sums.

  Several processes: every process calls it with the same examples and encodes
  its own share of the rows (as `encode_to_array`), in the same number of
  batches; phi and valid are then global arrays over the encoder's mesh, never
  gathered on a host. A `data.corpus.HostView` (each host read only its slice)
  is encoded host by host instead: each process its own `local_rows`, in as
  many batches as the largest share needs. Padded batches are built on a
  background thread `prefetch` batches ahead (0: inline). Logs progress (batches, examples/s,
  ETA) every `log_every_s` seconds under `name`.
  """
  examples = as_examples(examples)
  n, pi, pc = len(examples), jax.process_index(), jax.process_count()
  if getattr(examples, "local_rows", None) is not None:  # a host slice: this process's own rows
    rows = np.arange(*examples.local_rows)
    per_host = len(rows) if pc == 1 else int(mesh_lib.allgather(np.asarray([len(rows)], np.int64)).max())
  else:
    per_host = -(-n // pc)
    rows = np.arange(pi * per_host, min((pi + 1) * per_host, n))
  host_batch = max(1, batch_size // pc)
  prog = progress_lib.Progress(total=-(-per_host // host_batch), unit="batch", item_unit="examples", name=name)
  batches = _host_batches(examples, rows, host_batch=host_batch, num_batches=prog.total)
  if prefetch:
    batches = prefetch_lib.ahead(batches, depth=prefetch, name=f"{name}-batches")
  for i, (m, batch) in enumerate(batches):
    phi, valid = encoder.encode(batch), batch["ids"] >= 0
    if pc > 1:  # this process's rows of the global phi: the encoder pads them to a multiple of its local devices
      local = np.zeros(phi.shape[0] // pc, bool)
      local[: len(valid)] = valid
      valid = mesh_lib.shard_batch({"valid": local}, encoder.mesh)["valid"]
    yield phi, valid
    prog.update(i + 1, items=m * pc)
    if i == 0:
      prog.mark()  # exclude compilation from the rate
    if prog.due(every_s=log_every_s) or i + 1 == prog.total:
      logging.info(prog.line())


def encode_to_array(encoder, examples, *, batch_size: int) -> np.ndarray:
  """phi [N, d] float32 of all `examples`, on every process (each encodes a share)."""
  examples = as_examples(examples)
  pi, pc = jax.process_index(), jax.process_count()
  n = len(examples)
  per_host = -(-n // pc)
  rows = np.arange(pi * per_host, min((pi + 1) * per_host, n))
  host_batch = max(1, batch_size // pc)
  phi = _collect(
    _dispatch_rows(encoder, examples, rows, host_batch=host_batch, num_batches=-(-per_host // host_batch)), encoder.dim
  )
  if pc == 1:
    return phi
  padded = np.zeros((per_host, encoder.dim), np.float32)
  padded[: len(rows)] = phi
  return mesh_lib.allgather(padded)[:n]


def _pending_chunks(store, examples, *, process_index: int, process_count: int) -> list[int]:
  """This process's uncommitted chunks: c % process_count == process_index, or, when the examples are one host's
  slice (`local_rows` = [lo, hi): `data.corpus.HostView`), the chunks that start in [lo, hi)."""
  if getattr(examples, "local_rows", None) is None:
    return store.pending_chunks(process_index=process_index, process_count=process_count)
  lo, hi = examples.local_rows
  done = store.completed_chunks()
  first = -(-lo // store.chunk_rows)
  return [c for c in range(first, -(-hi // store.chunk_rows)) if c not in done]


# Host memory that outstanding store writes may hold. With the encoder ahead of the disk, more writes in
# flight kept the job up with it: 8 chunks of 512 MiB (d = 65536, bf16) ran the LAMA-shaped job at 0.988x
# the training step where 2 ran it at 0.816x (BENCHMARKS.md "Encode job", run E2, Adam rank-1); on a
# faster disk (E3) 2, 4 and 8 ran alike.
WRITE_BUFFER_BYTES = 4 << 30
MAX_WRITES_IN_FLIGHT = 8


def writes_in_flight_for(store: store_lib.EncodingStore) -> int:
  """`encode_to_store`'s default: as many chunk writes as WRITE_BUFFER_BYTES holds, 2 to MAX_WRITES_IN_FLIGHT."""
  return int(np.clip(WRITE_BUFFER_BYTES // max(1, store.chunk_bytes), 2, MAX_WRITES_IN_FLIGHT))


def encode_to_store(
  encoder,
  examples,
  *,
  store: store_lib.EncodingStore,
  batch_size: int,
  log_every_s: float = 30.0,
  pipeline: bool = True,
  writes_in_flight: int | None = None,
) -> store_lib.EncodingStore:
  """phi of every example into `store` (rows in example order); resumes where a killed run stopped.

  Every process calls it with the same (complete) store; returns it complete.
  `examples` are all of them on every process, or each process's slice as a
  `data.corpus.HostView` (it encodes the chunks that start in its rows).
  Logs progress (chunks, examples/s, ETA) every `log_every_s` seconds.

  `pipeline` (default) keeps the accelerator busy: the next chunks' padded
  batches are built on a background thread, each batch's device-to-host copy
  starts as soon as it is computed, chunks are collected on a second thread
  while the next is dispatched, and store writes go to a writer thread (only
  full queues, i.e. storage slower than the encoder, ever stop the loop).
  False: the same computation one chunk at a time, every write waited for (a
  reference: both give bitwise the same store). `writes_in_flight`: store
  chunk writes outstanding at once (each holds a chunk's rows in host memory;
  default `writes_in_flight_for(store)`).
  """
  examples = as_examples(examples)
  if len(examples) != store.num_rows:
    raise ValueError(f"{len(examples)} examples but the store {store.url} has {store.num_rows} rows.")
  pi, pc = jax.process_index(), jax.process_count()
  ids = np.asarray(examples.ids)
  pending = _pending_chunks(store, examples, process_index=pi, process_count=pc)
  n_iter = int(mesh_lib.allgather(np.asarray([len(pending)])).max())
  host_batch = max(1, int(batch_size) // pc)
  per_chunk = -(-store.chunk_rows // host_batch)
  convert = device_converter(store.meta.dtype)
  logging.info(
    "encode: %d rows in %d chunks; this process: %d pending of %d; store %s",
    store.num_rows,
    store.num_chunks,
    len(pending),
    len(range(pi, store.num_chunks, pc)),
    store.url,
  )
  prog = progress_lib.Progress(total=n_iter, unit="chunk", item_unit="examples", name="encode")

  def chunk_batches():  # (chunk or None, a, b, its padded batches), in loop order
    for i in range(n_iter):
      chunk = pending[i] if i < len(pending) else None  # None: keep the other processes company
      a, b = store.chunk_range(chunk) if chunk is not None else (0, 0)
      yield chunk, a, b, list(_host_batches(examples, np.arange(a, b), host_batch=host_batch, num_batches=per_chunk))

  def finish(done: int, chunk, a: int, b: int, parts) -> None:
    phi = _collect(parts, encoder.dim)
    if chunk is not None:
      writer.submit(start=a, ids=ids[a:b], phi=phi)  # committed (and marked) asynchronously
    prog.update(done, items=b - a)
    if done == 1:
      prog.mark()  # exclude compilation from the rate
    if prog.due(every_s=log_every_s) or done == n_iter:
      logging.info(prog.line())

  if writes_in_flight is None:
    writes_in_flight = writes_in_flight_for(store)
  with store_lib.AsyncWriter(store, max_pending=writes_in_flight) as writer:
    if not pipeline:
      for i, (chunk, a, b, batches) in enumerate(chunk_batches()):
        finish(i + 1, chunk, a, b, _dispatch(encoder, batches, convert=convert))
        writer.flush()
    else:
      # Software pipeline: the main thread only dispatches. A collector thread waits for each chunk's
      # device-to-host copies, assembles its rows and hands them to the writer, so the host work of chunk i
      # (~0.1 s for a 4096-row chunk at d = 65536, run D4's gaps) overlaps chunk i + 1 on the devices.
      # depth=1: one chunk queued for the collector, one being collected, one being dispatched.
      with prefetch_lib.BackgroundCalls(finish, depth=1, name="encode-collect") as calls:
        for i, (chunk, a, b, batches) in enumerate(prefetch_lib.ahead(chunk_batches(), depth=2, name="encode-batches")):
          calls.put(
            done=i + 1, chunk=chunk, a=a, b=b, parts=_dispatch(encoder, batches, convert=convert, copy_early=True)
          )
  mesh_lib.sync("encode:done")
  store.require_complete()
  return store


def open_or_create(url: str, meta: store_lib.StoreMeta) -> store_lib.EncodingStore:
  """The store at `url` for `meta`: created by process 0 if absent; refused if made by something else."""
  if mesh_lib.is_chief():
    store_lib.open_store(url, expected_meta=meta, create=True)
  mesh_lib.sync("encode:store_created")
  return store_lib.open_store(url, expected_meta=meta)
