"""Streaming examples through a `TrackStarEncoder`: into a store, into memory, or batch by batch.

  store = encode_to_store(encoder, corpus, store=open_store(url, ...), batch_size=256)
  phi = encode_to_array(encoder, queries, batch_size=64)        # [N, d] float32 on every process
  for phi, valid in phi_batches(encoder, corpus, batch_size=64): ...   # device arrays, for streamed sums

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


def _dispatch_rows(
  encoder, examples, rows: np.ndarray, *, host_batch: int, num_batches: int, convert=None
) -> list[tuple[int, Any]]:
  """Starts encoding this process's `rows` in exactly `num_batches` encoder calls (lockstep across hosts).

  One process: returns device arrays still being computed (JAX dispatch is
  asynchronous), so the caller can do host work meanwhile; `_collect` waits.
  `convert` (`device_converter` of the store's dtype) runs on the device.
  """
  out = []
  for j in range(num_batches):
    part = rows[j * host_batch : (j + 1) * host_batch]
    batch = batch_lib.pad_rows(examples.batch(part), host_batch)
    if jax.process_count() == 1:
      phi = encoder.encode(batch)
      out.append((len(part), phi if convert is None else convert(phi)))
    else:
      out.append((len(part), encoder.encode_local(batch)))
  return out


def _collect(parts: list[tuple[int, Any]], dim: int) -> Any:
  """[rows, d] numpy of `_dispatch_rows`' output (waits for the device); `Quantized` rows stay `Quantized`."""
  parts = [jax.tree.map(lambda x, n=n: np.asarray(x)[:n], phi) for n, phi in parts if n]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts) if parts else np.zeros((0, dim), np.float32)


def phi_batches(encoder, examples, *, batch_size: int, name: str = "encode", log_every_s: float = 30.0):
  """Yields (phi [B, d] on the device, valid [B]) per batch of `examples` (one process): for streamed sums.

  Logs progress (batches, examples/s, ETA) every `log_every_s` seconds under `name`.
  """
  examples = as_examples(examples)
  n = len(examples)
  prog = progress_lib.Progress(total=-(-n // batch_size), unit="batch", item_unit="examples", name=name)
  for i, a in enumerate(range(0, n, batch_size)):
    batch = batch_lib.pad_rows(examples.batch(np.arange(a, min(a + batch_size, n))), batch_size)
    yield encoder.encode(batch), batch["ids"] >= 0
    prog.update(i + 1, items=min(batch_size, n - a))
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


def encode_to_store(
  encoder, examples, *, store: store_lib.EncodingStore, batch_size: int, log_every_s: float = 30.0
) -> store_lib.EncodingStore:
  """phi of every example into `store` (rows in example order); resumes where a killed run stopped.

  Every process calls it with the same (complete) store; returns it complete.
  Logs progress (chunks, examples/s, ETA) every `log_every_s` seconds.
  """
  examples = as_examples(examples)
  if len(examples) != store.num_rows:
    raise ValueError(f"{len(examples)} examples but the store {store.url} has {store.num_rows} rows.")
  pi, pc = jax.process_index(), jax.process_count()
  ids = np.asarray(examples.ids)
  pending = store.pending_chunks(process_index=pi, process_count=pc)
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
  # Software pipeline: chunk i + 1 is dispatched to the devices before chunk i is copied to the host
  # and handed to the writer, so host work (batching, device-to-host copy, store writes) overlaps
  # device work instead of idling the accelerator between chunks.
  in_flight = None  # (chunk, a, b, dispatched parts)

  def finish(done: int, chunk, a: int, b: int, parts) -> None:
    phi = _collect(parts, encoder.dim)
    if chunk is not None:
      writer.submit(start=a, ids=ids[a:b], phi=phi)  # committed (and marked) asynchronously
    prog.update(done, items=b - a)
    if done == 1:
      prog.mark()  # exclude compilation from the rate
    if prog.due(every_s=log_every_s) or done == n_iter:
      logging.info(prog.line())

  with store_lib.AsyncWriter(store, max_pending=2) as writer:
    for i in range(n_iter):
      chunk = pending[i] if i < len(pending) else None  # None: keep the other processes company
      a, b = store.chunk_range(chunk) if chunk is not None else (0, 0)
      parts = _dispatch_rows(
        encoder, examples, np.arange(a, b), host_batch=host_batch, num_batches=per_chunk, convert=convert
      )
      if in_flight is not None:
        finish(i, *in_flight)
      in_flight = (chunk, a, b, parts)
    if in_flight is not None:
      finish(n_iter, *in_flight)
  mesh_lib.sync("encode:done")
  store.require_complete()
  return store


def open_or_create(url: str, meta: store_lib.StoreMeta) -> store_lib.EncodingStore:
  """The store at `url` for `meta`: created by process 0 if absent; refused if made by something else."""
  if mesh_lib.is_chief():
    store_lib.open_store(url, expected_meta=meta, create=True)
  mesh_lib.sync("encode:store_created")
  return store_lib.open_store(url, expected_meta=meta)
