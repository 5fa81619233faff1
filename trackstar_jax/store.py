"""Encoding store: raw per-example encodings phi [N, d] on TensorStore zarr v3.

One store holds the corpus encodings written by `launch/encode.py` and read by
`launch/retrieve.py`. Layout under the store URL (a kvstore prefix):

  meta.json          what produced the store (`StoreMeta`), written once
  phi/               zarr v3 array [N, d], bfloat16 (or float32), chunked by rows
  ids/               zarr v3 array [N] int64, same row chunking (-1 = padding row)
  done/<c0>-<c1>     one empty marker per committed write of chunks [c0, c1)

URLs: a local path or `file://...` (default), `gs://bucket/path`, and
`memory://name` (tests; shared within one process). All opens share one
TensorStore context, so `memory://` stores persist across opens.

Durability and resume. Writes are chunk-aligned (a host owns whole chunks, so
hosts never touch the same zarr chunk) and asynchronous: `AsyncWriter.submit`
returns at once and the next batch is computed while TensorStore writes. A
chunk's marker is written only after its `phi` and `ids` writes have committed,
so a marker never names rows that are not on storage. A killed job leaves at
worst some unmarked, possibly half-written chunks; the restart recomputes
exactly those (`pending_chunks`) and, since encoding is deterministic, the
final store equals an uninterrupted run's.

TensorStore starts threads: never fork() a process after using this module
(tests use subprocesses / the spawn start method).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from absl import logging
import numpy as np
import tensorstore as ts

from trackstar_jax import fileio

FORMAT = "trackstar_jax.encodings/1"
_DTYPES = ("bfloat16", "float32")
_MARKER = re.compile(r"^(\d+)-(\d+)$")
# One context for every open in this process: `memory://` data lives in it.
CONTEXT = fileio.CONTEXT


class IncompleteStoreError(RuntimeError):
  """The store has rows whose chunks were never committed."""


class StoreMismatchError(ValueError):
  """An existing store was produced by a different configuration."""


@dataclasses.dataclass(frozen=True)
class StoreMeta:
  """What produced a store. Two stores with equal meta hold the same values.

  `num_rows`, `dim`, `dtype` and `chunk_rows` fix the layout; the rest names the
  producer: checkpoint path and step, projection seed, the traced blocks,
  the optimizer correction and the corpus fingerprint. `extra` takes anything
  else that must match on resume (JSON-serializable).
  """

  num_rows: int
  dim: int
  dtype: str = "bfloat16"
  chunk_rows: int = 4096
  checkpoint: str = ""
  step: int = -1
  projection_seed: int = 0
  blocks: tuple[str, ...] = ()
  correction: str = ""
  corpus_fingerprint: str = ""
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"StoreMeta.dtype must be one of {_DTYPES} (config.store.dtype), got {self.dtype!r}.")
    if self.num_rows <= 0 or self.dim <= 0 or self.chunk_rows <= 0:
      raise ValueError(
          f"StoreMeta needs num_rows, dim, chunk_rows > 0, got {self.num_rows}, {self.dim}, {self.chunk_rows}."
      )

  def to_json(self) -> dict[str, Any]:
    # A JSON round trip makes tuples lists, so stored and expected compare equal.
    return json.loads(json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True))

  @classmethod
  def from_json(cls, obj: Mapping[str, Any]) -> "StoreMeta":
    obj = dict(obj)
    if obj.pop("format", None) != FORMAT:
      raise ValueError(f"Not a {FORMAT} store meta: {obj}")
    obj["blocks"] = tuple(obj.get("blocks", ()))
    return cls(**obj)


def meta_differences(stored: StoreMeta, expected: StoreMeta) -> list[str]:
  """`field: stored=... expected=...` for every differing field."""
  a, b = stored.to_json(), expected.to_json()
  return [f"{k}: stored={a.get(k)!r} expected={b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def kvstore_spec(url: str) -> dict[str, Any]:
  """A TensorStore kvstore spec (a directory prefix ending in '/') for a URL."""
  if not url:
    raise ValueError("Empty store URL (config.store.url / --store).")
  if "://" not in url:
    url = "file://" + os.path.abspath(url)
  if not url.endswith("/"):
    url += "/"
  try:
    return ts.KvStore.Spec(url).to_json()
  except ValueError as e:
    raise ValueError(f"Unsupported store URL {url!r}: use a path, file://, gs:// or memory://.") from e


def _sub(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
  out = dict(spec)
  out["path"] = out.get("path", "") + name
  return out


class Chunk(NamedTuple):
  """Rows [start, start + len(ids)) of a store."""

  start: int
  ids: np.ndarray  # [n] int64
  phi: np.ndarray  # [n, d] store dtype (bfloat16 as ml_dtypes.bfloat16)


class EncodingStore:
  """An open encoding store. Create or open with `open_store`."""

  def __init__(self, url: str, kv: ts.KvStore, meta: StoreMeta, phi: ts.TensorStore, ids: ts.TensorStore):
    self.url, self.meta, self._kv, self.phi, self.ids = url, meta, kv, phi, ids

  @property
  def num_rows(self) -> int:
    return self.meta.num_rows

  @property
  def dim(self) -> int:
    return self.meta.dim

  @property
  def chunk_rows(self) -> int:
    return self.meta.chunk_rows

  @property
  def num_chunks(self) -> int:
    return -(-self.num_rows // self.chunk_rows)

  def chunk_range(self, chunk: int) -> tuple[int, int]:
    """Row range [start, stop) of store chunk `chunk`."""
    if not 0 <= chunk < self.num_chunks:
      raise IndexError(f"Chunk {chunk} out of range [0, {self.num_chunks}) for {self.url}.")
    return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_rows)

  # --- progress -------------------------------------------------------------

  def completed_chunks(self) -> set[int]:
    """Chunks whose data is committed (a marker names them)."""
    keys = self._kv.list(ts.KvStore.KeyRange("done/", "done0"), strip_prefix_length=5).result()
    done = set()
    for key in keys:
      m = _MARKER.match(key.decode())
      if m:
        done.update(range(int(m.group(1)), min(int(m.group(2)), self.num_chunks)))
    return done

  def pending_chunks(self, *, process_index: int = 0, process_count: int = 1) -> list[int]:
    """This host's chunks (chunk c belongs to host c % process_count) not yet committed."""
    done = self.completed_chunks()
    return [c for c in range(process_index, self.num_chunks, process_count) if c not in done]

  def missing_ranges(self) -> list[tuple[int, int]]:
    """Merged row ranges [start, stop) that are not committed, in order."""
    done, out = self.completed_chunks(), []
    for c in range(self.num_chunks):
      if c in done:
        continue
      start, stop = self.chunk_range(c)
      if out and out[-1][1] == start:
        out[-1] = (out[-1][0], stop)
      else:
        out.append((start, stop))
    return out

  def is_complete(self) -> bool:
    return len(self.completed_chunks()) == self.num_chunks

  def require_complete(self) -> None:
    """Raises `IncompleteStoreError` naming the missing row ranges."""
    missing = self.missing_ranges()
    if missing:
      n = sum(b - a for a, b in missing)
      shown = ", ".join(f"[{a}, {b})" for a, b in missing[:10]) + (" ..." if len(missing) > 10 else "")
      raise IncompleteStoreError(
          f"Encoding store {self.url} is incomplete: {n} of {self.num_rows} rows missing, rows {shown}. "
          "Re-run launch/encode.py with the same config and --workdir to finish it."
      )

  # --- writing --------------------------------------------------------------

  def _check_write(self, start: int, n: int) -> int:
    stop = start + n
    if start % self.chunk_rows or not (stop % self.chunk_rows == 0 or stop == self.num_rows):
      raise ValueError(
          f"Writes must be chunk-aligned (chunk_rows={self.chunk_rows}, num_rows={self.num_rows}); "
          f"got rows [{start}, {stop})."
      )
    if stop > self.num_rows or n <= 0:
      raise ValueError(f"Rows [{start}, {stop}) outside store of {self.num_rows} rows.")
    return stop

  def write_rows(self, *, start: int, ids: np.ndarray, phi: np.ndarray) -> "PendingWrite":
    """Starts writing rows [start, start + len(ids)); returns before they commit.

    `PendingWrite.wait()` blocks until the data is committed and then writes the
    chunk marker; until then the rows count as missing.
    """
    ids = np.asarray(ids, np.int64)
    phi = np.asarray(phi)
    if ids.ndim != 1 or phi.shape != (ids.shape[0], self.dim):
      raise ValueError(f"Expected ids [n] and phi [n, {self.dim}], got {ids.shape} and {phi.shape}.")
    stop = self._check_write(start, ids.shape[0])
    phi = np.asarray(phi, self.phi.dtype.numpy_dtype)  # no copy when already the store's dtype
    futures = [self.phi[start:stop].write(phi), self.ids[start:stop].write(ids)]
    return PendingWrite(self, start // self.chunk_rows, -(-stop // self.chunk_rows), futures)

  def _mark_done(self, c0: int, c1: int) -> None:
    self._kv.write(f"done/{c0:010d}-{c1:010d}", b"").result()

  # --- reading --------------------------------------------------------------

  def read(self, start: int, stop: int) -> Chunk:
    """Rows [start, stop) as numpy arrays (blocking)."""
    phi_f, ids_f = self.phi[start:stop].read(), self.ids[start:stop].read()
    return Chunk(start, ids_f.result(), phi_f.result())

  def read_ids(self, rows: np.ndarray) -> np.ndarray:
    """ids at arbitrary rows (any shape); -1 where rows < 0."""
    rows = np.asarray(rows, np.int64)
    flat = rows.reshape(-1)
    out = np.full(flat.shape, -1, np.int64)
    ok = flat >= 0
    if ok.any():
      uniq, inv = np.unique(flat[ok], return_inverse=True)
      out[ok] = self.ids[uniq].read().result()[inv]
    return out.reshape(rows.shape)

  def iter_chunks(
      self, *, rows_per_chunk: int, process_index: int = 0, process_count: int = 1, prefetch: int = 2
  ) -> Iterator[Chunk]:
    """Yields this host's read chunks: chunk j of [0, N) in steps of `rows_per_chunk` goes to host j % process_count.

    Reads of the next `prefetch` chunks are in flight while the caller works on
    the current one. Does not check completeness: call `require_complete()`.
    """
    if rows_per_chunk <= 0:
      raise ValueError(f"rows_per_chunk must be > 0, got {rows_per_chunk}.")
    starts = list(range(process_index * rows_per_chunk, self.num_rows, process_count * rows_per_chunk))
    queue = collections.deque()
    for i in range(len(starts) + prefetch):
      if i < len(starts):
        a = starts[i]
        b = min(a + rows_per_chunk, self.num_rows)
        queue.append((a, self.ids[a:b].read(), self.phi[a:b].read()))
      if i >= prefetch:
        a, ids_f, phi_f = queue.popleft()
        yield Chunk(a, ids_f.result(), phi_f.result())


class PendingWrite:
  """An in-flight write of chunks [c0, c1); `wait()` commits and marks them."""

  def __init__(self, store: EncodingStore, c0: int, c1: int, futures: Sequence[Any]):
    self._store, self.chunks, self._futures, self._done = store, (c0, c1), futures, False

  def wait(self) -> None:
    if self._done:
      return
    for f in self._futures:
      f.result()  # WriteFutures.result() waits for the commit.
    self._store._mark_done(*self.chunks)  # pylint: disable=protected-access
    self._done = True


class AsyncWriter:
  """Keeps up to `max_pending` writes in flight; use as a context manager.

    with AsyncWriter(store) as writer:
      for c in store.pending_chunks(...):
        writer.submit(start=..., ids=..., phi=...)   # returns while writing
  """

  def __init__(self, store: EncodingStore, *, max_pending: int = 2):
    self.store, self.max_pending = store, max(1, max_pending)
    self._pending: collections.deque[PendingWrite] = collections.deque()

  def submit(self, *, start: int, ids: np.ndarray, phi: np.ndarray) -> None:
    while len(self._pending) >= self.max_pending:
      self._pending.popleft().wait()
    self._pending.append(self.store.write_rows(start=start, ids=ids, phi=phi))

  def flush(self) -> None:
    while self._pending:
      self._pending.popleft().wait()

  def __enter__(self) -> "AsyncWriter":
    return self

  def __exit__(self, exc_type, *unused) -> None:
    if exc_type is None:
      self.flush()
    # On error, unfinished writes stay unmarked and are redone on resume.


def _array_spec(kv: Mapping[str, Any], shape: Sequence[int], chunk: Sequence[int], dtype: str) -> dict[str, Any]:
  return {
      "driver": "zarr3",
      "kvstore": dict(kv),
      "metadata": {
          "shape": list(shape),
          "data_type": dtype,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
          "fill_value": -1 if dtype == "int64" else 0,
      },
  }


def open_store(url: str, *, expected_meta: StoreMeta | None = None, create: bool = False) -> EncodingStore:
  """Opens (or, with `create=True`, creates) the encoding store at `url`.

  Args:
    url: path, file://, gs:// or memory:// prefix.
    expected_meta: if given, an existing store must have equal meta, else
      `StoreMismatchError` lists the differing fields. Required with create.
    create: create the store when none exists at `url`. In multi-host jobs only
      process 0 creates; the others open after a barrier.
  """
  kv_spec = kvstore_spec(url)
  kv = ts.KvStore.open(kv_spec, context=CONTEXT).result()
  raw = kv.read("meta.json").result()
  if raw.state == "value":
    meta = StoreMeta.from_json(json.loads(raw.value))
    if expected_meta is not None:
      diff = meta_differences(meta, expected_meta)
      if diff:
        raise StoreMismatchError(
            f"Encoding store {url} was written with a different configuration; differing fields:\n  "
            + "\n  ".join(diff)
            + "\nUse another store URL (config.store.url) or delete the old store."
        )
    phi = ts.open({"driver": "zarr3", "kvstore": _sub(kv_spec, "phi/")}, context=CONTEXT, open=True).result()
    ids = ts.open({"driver": "zarr3", "kvstore": _sub(kv_spec, "ids/")}, context=CONTEXT, open=True).result()
    return EncodingStore(url, kv, meta, phi, ids)
  if not create:
    raise FileNotFoundError(f"No encoding store at {url} (no meta.json). Run launch/encode.py first.")
  if expected_meta is None:
    raise ValueError("open_store(create=True) needs expected_meta.")
  m = expected_meta
  kv.delete_range(ts.KvStore.KeyRange("done/", "done0")).result()  # stale markers of a deleted store
  phi = ts.open(
      _array_spec(_sub(kv_spec, "phi/"), (m.num_rows, m.dim), (m.chunk_rows, m.dim), m.dtype),
      context=CONTEXT, create=True, delete_existing=True,
  ).result()
  ids = ts.open(
      _array_spec(_sub(kv_spec, "ids/"), (m.num_rows,), (m.chunk_rows,), "int64"),
      context=CONTEXT, create=True, delete_existing=True,
  ).result()
  # meta.json last: its presence means the arrays exist.
  kv.write("meta.json", json.dumps(m.to_json(), indent=1, sort_keys=True).encode()).result()
  logging.info("Created encoding store %s: %d rows x %d (%s), chunks of %d", url, m.num_rows, m.dim, m.dtype,
               m.chunk_rows)
  return EncodingStore(url, kv, m, phi, ids)
