"""Encoding store: raw per-example encodings phi [N, d] on TensorStore zarr v3.

One store holds the corpus encodings written by `launch/encode.py` and read by
`launch/retrieve.py`. Layout under the store URL (a kvstore prefix):

  meta.json          what produced the store (`StoreMeta`), written once
  phi/               zarr v3 array [N, d], bfloat16 (or float32), chunked by rows;
                     int8 / int4 stores: the codes ([N, d] int8, [N, ceil(d/2)] uint8)
  scale/             int8 / int4 stores only: float32 scales [N, 1] / [N, ceil(d/128)]
  ids/               zarr v3 array [N] int64, same row chunking (-1 = padding row)
  done/<c0>-<c1>     one empty marker per committed write of chunks [c0, c1)

URLs: a local path or `file://...` (default), `gs://bucket/path`, and
`memory://name` (tests; shared within one process). All opens share one
TensorStore context, so `memory://` stores persist across opens.

Compact stores (`StoreMeta.dtype` / config.store.dtype "int8" or "int4", see
`quantize`): `write_rows` quantizes float rows (or takes `quantize.Quantized`
codes made on the device), reads yield `Chunk(start, ids, phi=codes,
scale=scales)`, and retrieval dequantizes on the device, so the store, its
reads and the host-to-device copies shrink together (int8 2x, int4 3.8x vs
bfloat16). `decode(chunk)` gives float32 rows on the host.

Integrity. Every zarr chunk carries a crc32c checksum (codecs `bytes` then
`crc32c`), verified by TensorStore on every read, and reads never fill a
missing chunk with the fill value: a deleted, truncated or corrupted chunk
raises `StoreDataError` naming the store, the chunk, its rows and the repair
(`python -m launch.verify_store --store=URL --repair`, which drops the bad
chunks' markers, then the encode command again, which re-encodes exactly
those chunks). A chunk counts as committed when its marker exists *and* its
data objects exist (one listing); `verify()` reads and checks every committed
chunk. Stores of the previous format (1, no checksums) stay readable; their
missing chunks are still detected, bit flips are not.

Remote storage (gs:// and any non-local kvstore): every open, read, write and
listing is bounded in time (`remote.wait`: `remote.TIMEOUT_S`, default 60 s) and
then raises `remote.RemoteTimeoutError` naming the URL and the likely causes,
instead of waiting forever for credentials or a network that never answer.

Durability and resume. Writes are chunk-aligned (a host owns whole chunks, so
hosts never touch the same zarr chunk) and asynchronous: `AsyncWriter.submit`
returns at once and the next batch is computed while TensorStore writes. A
chunk's marker is written only after its `phi` and `ids` writes have committed,
so a marker never names rows that are not on storage. A killed job leaves at
worst some unmarked, possibly half-written chunks; the restart recomputes
exactly those (`pending_chunks`) and, since encoding is deterministic, the
final store equals an uninterrupted run's.

Direct reads and writes. On a local store (a path or file://), phi rows are read
straight from their zarr chunk files by `chunk_files.ChunkFiles` (checking
every chunk's crc32c, on a process-wide thread pool), several times faster
than TensorStore's file kvstore; ids and scales, which are small, and
`verify()` still go through TensorStore. `open_store(url, direct_reads=False)`,
`store.direct_reads = False`, or the environment TRACKSTAR_DIRECT_READS=0 read
phi with TensorStore too. Either way a damaged chunk raises the same
`StoreDataError`: a direct read's error makes the store re-check the chunks
with TensorStore, which names them. Writes of phi go to the chunk files too
(`chunk_files.ChunkFiles.write`: data + crc32c to a temporary file, renamed
into place; TRACKSTAR_DIRECT_WRITES=0 or `direct_writes=False`: TensorStore),
the same bytes TensorStore writes.

TensorStore starts threads: never fork() a process after using this module
(tests use subprocesses / the spawn start method).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import functools
import itertools
import json
import os
import re
from typing import Any, NamedTuple

from absl import logging
import numpy as np
import tensorstore as ts

from trackstar_jax import chunk_files as chunk_files_lib
from trackstar_jax import fileio, host_buffers, mapped_chunks, quantize, remote
from trackstar_jax import progress as progress_lib

FORMAT = "trackstar_jax.encodings/2"  # 2: crc32c per chunk, reads refuse missing chunks
# Readable older formats (no chunk checksums). Their layout is otherwise the same.
_LEGACY_FORMATS = ("trackstar_jax.encodings/1",)
_DTYPES = ("bfloat16", "float32", *quantize.QUANTIZED)
_MARKER = re.compile(r"^(\d+)-(\d+)$")
# One context for every open in this process: `memory://` data lives in it.
CONTEXT = fileio.CONTEXT
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
DIRECT_READS_ENV = "TRACKSTAR_DIRECT_READS"  # "0" reads phi with TensorStore even on local stores
DIRECT_WRITES_ENV = "TRACKSTAR_DIRECT_WRITES"  # "0" writes phi with TensorStore even on local stores


def _env_on(name: str) -> bool:
  return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


_logged_read_paths: set[tuple[str, str]] = set()
_warned_no_crc32c = False


class IncompleteStoreError(RuntimeError):
  """The store has rows whose chunks were never committed."""


class StoreMismatchError(ValueError):
  """An existing store was produced by a different configuration."""


class StoreDataError(RuntimeError):
  """Committed chunks whose data is missing or fails its checksum; `bad` lists them."""

  def __init__(self, message: str, bad: Sequence[BadChunk]):
    super().__init__(message)
    self.bad = list(bad)


class BadChunk(NamedTuple):
  """Store chunk `chunk` = rows [start, stop), damaged: `reason` says how."""

  chunk: int
  start: int
  stop: int
  reason: str


@dataclasses.dataclass(frozen=True)
class StoreMeta:
  """What produced a store. Two stores with equal meta hold the same values.

  `num_rows`, `dim`, `dtype` and `chunk_rows` fix the layout (dtype: bfloat16 |
  float32 | int8 | int4, the last two quantized: `quantize`); the rest names the
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
  def from_json(cls, obj: Mapping[str, Any]) -> StoreMeta:
    obj = dict(obj)
    fmt = obj.pop("format", None)
    if fmt != FORMAT and fmt not in _LEGACY_FORMATS:
      raise ValueError(f"Not a {FORMAT} store meta (format {fmt!r}): {obj}")
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
    return remote.kvstore_spec(url)  # endpoint overrides from the environment (emulators, S3-compatible)
  except ValueError as e:
    raise ValueError(f"Unsupported store URL {url!r}: use a path, file://, gs://, s3:// or memory://.") from e


def _sub(spec: Mapping[str, Any], name: str) -> dict[str, Any]:
  out = dict(spec)
  out["path"] = out.get("path", "") + name
  return out


class Chunk(NamedTuple):
  """Rows [start, start + len(ids)) of a store, as stored (`EncodingStore.decode` gives float32 phi)."""

  start: int
  ids: np.ndarray  # [n] int64
  phi: np.ndarray  # [n, d] store dtype (bfloat16 as ml_dtypes.bfloat16); int8 / int4 stores: the codes
  scale: np.ndarray | None = None  # int8 / int4 stores: float32 scales [n, groups]; else None
  buffer: np.ndarray | None = None  # the `host_buffers.BufferPool` buffer phi lies in (give it back), or None
  lease: Any = None  # the `mapped_chunks.MappedRead` phi is a view of (`lease.release(after=)`), or None
  # iter_chunks(defer_checks=True), a mapped chunk: waits for phi's crc32c checks (raises StoreDataError as the
  # read would). phi may be copied before; nothing may use its values until this returned. Else None.
  check: Callable[[], Any] | None = None


def repair_command(url: str, workdir: str = "") -> str:
  """The commands that repair damaged chunks of the store at `url` (written from training workdir `workdir`)."""
  encode = "python -m launch.encode --config=<the config that wrote it>"
  encode += f" --workdir={workdir}" if workdir else " --workdir=<its training workdir>"
  return (
    f"Repair: `python -m launch.verify_store --store={url} --repair` (unmarks every damaged chunk), "
    f"then re-run `{encode}`: it re-encodes exactly those chunks."
  )


def _reason(error: Exception) -> str:
  msg = str(error).splitlines()[0] if str(error) else type(error).__name__
  if msg.startswith("NOT_FOUND"):
    return f"data missing ({msg})"
  if msg.startswith("DATA_LOSS"):
    return f"checksum mismatch ({msg})"
  return f"unreadable, truncated? ({msg})"


class EncodingStore:
  """An open encoding store. Create or open with `open_store`."""

  def __init__(
    self,
    url: str,
    kv: ts.KvStore,
    meta: StoreMeta,
    phi: ts.TensorStore,
    ids: ts.TensorStore,
    *,
    format: str = FORMAT,  # pylint: disable=redefined-builtin
    scale: ts.TensorStore | None = None,
    direct_reads: bool = True,
    direct_writes: bool = True,
    fsync: bool = True,
  ):
    self.url, self.meta, self._kv, self.phi, self.ids, self.format = url, meta, kv, phi, ids, format
    self.scale = scale  # int8 / int4 stores: the scales array
    self.layout = quantize.layout(meta.dtype, meta.dim)
    if quantize.is_quantized(meta.dtype) and scale is None:
      raise ValueError(f"Encoding store {url} of dtype {meta.dtype} needs its scale/ array.")
    self._files: chunk_files_lib.ChunkFiles | None = None
    self.direct_reads = direct_reads
    # Direct writes need the same layout checks: they go with a direct reader of the same files.
    self._direct_writes = direct_writes and _env_on(DIRECT_WRITES_ENV)
    self._fsync = fsync

  @property
  def direct_writes(self) -> bool:
    """True when phi chunks are written straight to their files (`chunk_files.ChunkFiles.write`).

    Local stores only, with direct reads on (the same layout checks) and TRACKSTAR_DIRECT_WRITES not "0".
    """
    return self._direct_writes and self._files is not None

  @property
  def direct_reads(self) -> bool:
    """True when phi is read straight from the chunk files (`chunk_files`), False: through TensorStore.

    Setting True asks for direct reads; they happen only for a local store whose
    layout `chunk_files` reads, with TRACKSTAR_DIRECT_READS not "0" (and, for
    checksummed stores, google-crc32c installed).
    """
    return self._files is not None

  @direct_reads.setter
  def direct_reads(self, on: bool) -> None:
    self._files, why = _direct_reader(self.phi, self.num_rows) if on else (None, "direct_reads=False")
    path = "directly from its chunk files" if self._files else f"through TensorStore ({why})"
    if (self.url, path) not in _logged_read_paths:
      _logged_read_paths.add((self.url, path))
      logging.info("Encoding store %s: phi is read %s.", self.url, path)

  @property
  def dtype(self) -> str:
    """bfloat16 | float32 | int8 | int4 (`StoreMeta.dtype`)."""
    return self.meta.dtype

  @property
  def quantized(self) -> bool:
    return self.scale is not None

  def _arrays(self) -> list[tuple[str, ts.TensorStore]]:
    """(name, array) of every array a chunk has data in."""
    out = [("phi", self.phi), ("ids", self.ids)]
    return out + [("scale", self.scale)] if self.quantized else out

  @property
  def chunk_bytes(self) -> int:
    """Bytes a full chunk's rows hold in host memory (phi, its scales, ids)."""
    return self._nbytes(self.chunk_rows)

  def _nbytes(self, rows: int) -> int:
    return rows * (self.layout.row_bytes + 8)

  def decode(self, chunk: Chunk) -> np.ndarray:
    """float32 phi [n, d] of a chunk of this store (dequantized for int8 / int4)."""
    if self.quantized:
      return quantize.dequantize(chunk.phi, chunk.scale, self.dtype, dim=self.dim)
    return np.asarray(chunk.phi, np.float32)

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

  @property
  def checksummed(self) -> bool:
    """False for stores of a legacy format, whose chunks carry no checksum."""
    return self.format == FORMAT

  def chunk_range(self, chunk: int) -> tuple[int, int]:
    """Row range [start, stop) of store chunk `chunk`."""
    if not 0 <= chunk < self.num_chunks:
      raise IndexError(f"Chunk {chunk} out of range [0, {self.num_chunks}) for {self.url}.")
    return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_rows)

  def _wait(self, future: Any, what: str, nbytes: int = 0) -> Any:
    return remote.wait(future, url=self.url, what=f"{what} of encoding store", nbytes=nbytes)

  # --- progress -------------------------------------------------------------

  def _list(self, prefix: str) -> list[str]:
    keys = self._kv.list(
      ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)), strip_prefix_length=len(prefix)
    )
    return [k.decode() for k in self._wait(keys, f"Listing {prefix}")]

  def marked_chunks(self) -> set[int]:
    """Chunks that a commit marker names (their data may since have been lost: see `completed_chunks`)."""
    done = set()
    for key in self._list("done/"):
      m = _MARKER.match(key)
      if m:
        done.update(range(int(m.group(1)), min(int(m.group(2)), self.num_chunks)))
    return done

  def stored_chunks(self) -> set[int]:
    """Chunks whose phi, ids (and scale) data objects exist (zarr v3 default keys `c/<i>/0` and `c/<i>`)."""

    def rows_chunks(prefix):  # keys "<i>/0"; not a direct write's temporary "<i>/0.<hex>.tmp"
      return {int(k[:-2]) for k in self._list(prefix) if k.endswith("/0") and k[:-2].isdigit()}

    phi = rows_chunks("phi/c/")
    ids = {int(k) for k in self._list("ids/c/") if k.isdigit()}
    if self.quantized:
      phi &= rows_chunks("scale/c/")
    return phi & ids

  def completed_chunks(self) -> set[int]:
    """Chunks that are committed: marked, and their data exists (checksums are checked on read / `verify`)."""
    return self.marked_chunks() & self.stored_chunks()

  def pending_chunks(self, *, process_index: int = 0, process_count: int = 1) -> list[int]:
    """This host's chunks (chunk c belongs to host c % process_count) not yet committed (or whose data is lost)."""
    done = self.completed_chunks()
    return [c for c in range(process_index, self.num_chunks, process_count) if c not in done]

  def missing_ranges(self) -> list[tuple[int, int]]:
    """Merged row ranges [start, stop) that are not committed, in order."""
    return self._ranges_outside(self.completed_chunks())

  def _ranges_outside(self, done: set[int]) -> list[tuple[int, int]]:
    out = []
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
    """Every chunk is marked and its data exists."""
    return len(self.completed_chunks()) == self.num_chunks

  def require_complete(self) -> None:
    """Raises `StoreDataError` for marked chunks whose data is gone, else `IncompleteStoreError` for missing rows."""
    marked, stored = self.marked_chunks(), self.stored_chunks()
    lost = sorted(marked - stored)
    if lost:
      self._raise([BadChunk(c, *self.chunk_range(c), "data missing") for c in lost])
    missing = self._ranges_outside(marked & stored)  # listed once: a retrieve call's fixed cost
    if missing:
      n = sum(b - a for a, b in missing)
      shown = ", ".join(f"[{a}, {b})" for a, b in missing[:10]) + (" ..." if len(missing) > 10 else "")
      raise IncompleteStoreError(
        f"Encoding store {self.url} is incomplete: {n} of {self.num_rows} rows missing, rows {shown}. "
        "Re-run launch/encode.py with the same config and --workdir to finish it."
      )

  # --- integrity ------------------------------------------------------------

  def _raise(self, bad: Sequence[BadChunk]) -> None:
    shown = "; ".join(f"chunk {b.chunk} (rows [{b.start}, {b.stop})): {b.reason}" for b in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise StoreDataError(
      f"Encoding store {self.url} is damaged: {len(bad)} committed chunk(s) cannot be read: {shown}{more}. "
      + repair_command(self.url, self.meta.checkpoint),
      bad,
    )

  def _check_chunk(self, chunk: int) -> BadChunk | None:
    """Reads chunk `chunk` (phi, ids, scale); a `BadChunk` if one is missing, truncated or fails its checksum."""
    a, b = self.chunk_range(chunk)
    for name, arr in self._arrays():
      try:
        self._wait(arr[a:b].read(), f"Reading {name} rows [{a}, {b})", nbytes=self._nbytes(b - a))
      except ValueError as e:  # TensorStore's errors (NOT_FOUND, DATA_LOSS, ...) are ValueErrors
        return BadChunk(chunk, a, b, f"{name} {_reason(e)}")
    return None

  def _result(self, future: Any, start: int, stop: int, what: str) -> np.ndarray:
    """A read's result; on a storage error, finds the damaged chunks of rows [start, stop) and raises."""
    try:
      return self._wait(future, what, nbytes=self._nbytes(stop - start))
    except ValueError as e:
      c0, c1 = start // self.chunk_rows, -(-stop // self.chunk_rows)
      bad = [b for b in map(self._check_chunk, range(c0, min(c1, self.num_chunks))) if b is not None]
      if not bad:
        raise
      self._raise(bad)
      raise AssertionError("unreachable") from e

  def verify(
    self, *, chunks: Sequence[int] | None = None, in_flight: int = 2, log_every_s: float = 30.0
  ) -> list[BadChunk]:
    """Reads every committed chunk and checks it; returns the damaged ones (missing, truncated, corrupt).

    Args:
      chunks: the chunks to check; default every marked chunk (unmarked ones are
        pending anyway: encode writes them).
      in_flight: chunks read concurrently (each costs chunk_rows x its stored row bytes of host memory).
      log_every_s: seconds between progress lines (done/total, rate, ETA).
    """
    todo = sorted(self.marked_chunks()) if chunks is None else sorted(set(chunks))
    prog = progress_lib.Progress(total=len(todo), unit="chunk", item_unit="rows", name=f"verify {self.url}")
    bad, queue, upcoming = [], collections.deque(), iter(todo)

    def start(c):
      a, b = self.chunk_range(c)
      queue.append((c, a, b, [(name, arr[a:b].read()) for name, arr in self._arrays()]))

    for c in itertools.islice(upcoming, max(1, in_flight)):
      start(c)
    while queue:
      c, a, b, futures = queue.popleft()
      nxt = next(upcoming, None)
      if nxt is not None:
        start(nxt)
      for name, f in futures:
        try:
          self._wait(f, f"Reading {name} rows [{a}, {b})", nbytes=self._nbytes(b - a))
        except ValueError as e:
          bad.append(BadChunk(c, a, b, f"{name} {_reason(e)}"))
          break
      prog.update(prog.done + 1, items=b - a)
      if prog.due(every_s=log_every_s) or prog.done == len(todo):
        logging.info("%s; %d damaged so far", prog.line(), len(bad))
    if not self.checksummed:
      logging.warning(
        "Encoding store %s is of format %s: its chunks have no checksums, so only missing or "
        "truncated chunks are found, not corrupted bytes. Re-encode into a new URL to add them.",
        self.url,
        self.format,
      )
    return bad

  def unmark(self, chunks: Sequence[int]) -> int:
    """Drops the commit markers of `chunks` (keeping the others'), so that encode's resume redoes exactly them.

    A marker names a range of chunks; one that covers a dropped chunk is
    replaced by markers of its remaining sub-ranges (written before the old
    marker is deleted, so a crash never unmarks a good chunk). Returns the
    number of chunks that were marked and no longer are.
    """
    drop = set(chunks)
    before = self.marked_chunks()
    for key in self._list("done/"):
      m = _MARKER.match(key)
      if not m:
        continue
      c0, c1 = int(m.group(1)), int(m.group(2))
      if not drop & set(range(c0, c1)):
        continue
      run = None
      for c in range(c0, c1 + 1):
        keep = c < c1 and c not in drop
        if keep and run is None:
          run = c
        elif not keep and run is not None:
          self._mark_done(run, c)
          run = None
      self._wait(self._kv.delete_range(ts.KvStore.KeyRange("done/" + key, "done/" + key + "\0")), "Unmarking")
    return len(before - self.marked_chunks())

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

  def write_rows(self, *, start: int, ids: np.ndarray, phi: np.ndarray | quantize.Quantized) -> PendingWrite:
    """Starts writing rows [start, start + len(ids)); returns before they commit.

    `phi`: float rows [n, d] (converted to the store's dtype; int8 / int4 stores
    quantize them with `quantize.quantize`), or for an int8 / int4 store its
    `quantize.Quantized` codes and scales (e.g. quantized on the device).
    `PendingWrite.wait()` blocks until the data is committed and then writes the
    chunk marker; until then the rows count as missing.
    """
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1:
      raise ValueError(f"Expected ids [n], got shape {ids.shape}.")
    n = ids.shape[0]
    if isinstance(phi, quantize.Quantized):
      if not self.quantized:
        raise ValueError(f"Quantized rows given to store {self.url} of dtype {self.dtype}: pass float phi.")
      codes, scale = np.asarray(phi.codes), np.asarray(phi.scale)
    else:
      phi = np.asarray(phi)
      if phi.shape != (n, self.dim):
        raise ValueError(f"Expected ids [n] and phi [n, {self.dim}], got {ids.shape} and {phi.shape}.")
      codes, scale = quantize.quantize(phi, self.dtype) if self.quantized else (phi, None)
    lay = self.layout
    if codes.shape != (n, lay.codes_cols) or (scale is not None and scale.shape != (n, lay.scale_cols)):
      raise ValueError(
        f"Store {self.url} ({self.dtype}, d={self.dim}) takes codes [{n}, {lay.codes_cols}] {lay.codes_dtype} "
        f"and scales [{n}, {lay.scale_cols}] float32, got {codes.shape} {codes.dtype} and "
        f"{None if scale is None else scale.shape}."
      )
    if self.quantized and codes.dtype != np.dtype(lay.codes_dtype):
      raise ValueError(f"Store {self.url} ({self.dtype}) takes {lay.codes_dtype} codes, got {codes.dtype}.")
    stop = self._check_write(start, n)
    codes = np.asarray(codes, self.phi.dtype.numpy_dtype)  # no copy when already the store's dtype
    if self.direct_writes:  # TensorStore's file writes ran at ~0.6-0.8 GB/s on the H200 host (BENCHMARKS.md)
      phi_write = self._files.write(start, codes, fsync=self._fsync)
    else:
      phi_write = self.phi[start:stop].write(codes)
    futures = [phi_write, self.ids[start:stop].write(ids)]
    if scale is not None:
      futures.append(self.scale[start:stop].write(np.asarray(scale, np.float32)))
    return PendingWrite(self, start // self.chunk_rows, -(-stop // self.chunk_rows), futures, nbytes=self._nbytes(n))

  def _mark_done(self, c0: int, c1: int) -> None:
    self._wait(self._kv.write(f"done/{c0:010d}-{c1:010d}", b""), "Writing a commit marker")

  # --- reading --------------------------------------------------------------

  def _start_read(
    self,
    start: int,
    stop: int,
    buffers: host_buffers.BufferPool | None = None,
    windows: mapped_chunks.MappedWindows | None = None,
  ) -> tuple[list[Any], np.ndarray | None, mapped_chunks.MappedRead | None]:
    """Futures of rows [start, stop) of phi, ids[, scale], the buffer phi is read into, and its mapped read.

    With `direct_reads`, phi comes from the chunk files: from a window of `windows` (mapped, page-locked
    chunk files) where it takes them, else into a buffer of `buffers` when given and large enough.
    """
    buf = lease = None
    if self._files is None:
      phi = self.phi[start:stop].read()
    else:
      phi = lease = None if windows is None else windows.read(self._files, start, stop)
      if lease is None:
        out = None
        if buffers is not None and buffers.nbytes >= self.phi_bytes(stop - start):
          buf = buffers.take()
          out = buf[: self.phi_bytes(stop - start)].view(self._files.dtype).reshape(stop - start, self._files.cols)
        phi = self._files.read(start, stop, out=out)
    return [phi] + [arr[start:stop].read() for _, arr in self._arrays()[1:]], buf, lease

  def _chunk(self, start: int, stop: int, futures: Sequence[Any]) -> Chunk:
    what = f"Reading rows [{start}, {stop})"
    phi, ids, *scale = (self._result(f, start, stop, what) for f in futures)
    return Chunk(start, ids, phi, *scale)

  def read(self, start: int, stop: int) -> Chunk:
    """Rows [start, stop) as stored, numpy arrays (blocking). Raises `StoreDataError` for damaged chunks."""
    return self._chunk(start, stop, self._start_read(start, stop)[0])

  def read_ids(self, rows: np.ndarray) -> np.ndarray:
    """ids at arbitrary rows (any shape); -1 where rows < 0."""
    rows = np.asarray(rows, np.int64)
    flat = rows.reshape(-1)
    out = np.full(flat.shape, -1, np.int64)
    ok = flat >= 0
    if ok.any():
      uniq, inv = np.unique(flat[ok], return_inverse=True)
      try:
        got = self._wait(self.ids[uniq].read(), "Reading ids")
      except ValueError:
        bad = [b for b in map(self._check_chunk, sorted(set(uniq // self.chunk_rows))) if b is not None]
        if not bad:
          raise
        self._raise(bad)
      out[ok] = got[inv]
    return out.reshape(rows.shape)

  def phi_bytes(self, rows: int) -> int:
    """Bytes of `rows` rows of phi as stored (codes only for int8 / int4): a read buffer's size."""
    lay = self.layout
    return rows * lay.codes_cols * np.dtype(self.phi.dtype.numpy_dtype).itemsize

  def _starts(self, rows_per_chunk: int, process_index: int, process_count: int) -> list[int]:
    if rows_per_chunk <= 0:
      raise ValueError(f"rows_per_chunk must be > 0, got {rows_per_chunk}.")
    return list(range(process_index * rows_per_chunk, self.num_rows, process_count * rows_per_chunk))

  def map_ahead(
    self,
    windows: mapped_chunks.MappedWindows,
    *,
    rows_per_chunk: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Any:
    """Starts mapping phi's windows for this host's `iter_chunks(rows_per_chunk=...)` (`MappedWindows.warm`).

    Returns its future, or None when phi is read with TensorStore (no chunk files to map).
    """
    if self._files is None:
      return None
    return windows.warm(self._files, self._starts(rows_per_chunk, process_index, process_count), rows_per_chunk)

  def iter_chunks(
    self,
    *,
    rows_per_chunk: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    buffers: host_buffers.BufferPool | None = None,
    windows: mapped_chunks.MappedWindows | None = None,
    defer_checks: bool = False,
  ) -> Iterator[Chunk]:
    """Yields this host's read chunks: chunk j of [0, N) in steps of `rows_per_chunk` goes to host j % process_count.

    Reads of the next `prefetch` chunks are in flight while the caller works on
    the current one. Does not check completeness: call `require_complete()`.
    Raises `StoreDataError` when a chunk's data is missing or fails its checksum.

    `buffers`: with direct reads, phi is read into buffers of this pool
    (`phi_bytes(rows_per_chunk)` bytes or more each). A chunk's `buffer` is then
    the one its phi lies in: the caller gives it back (`buffers.release(chunk.buffer,
    after=...)`) once done with phi, which is overwritten after that. `windows`: phi is a view of
    mapped chunk files where `windows` takes them (`mapped_chunks`); the chunk's `lease` is then
    given back by the caller (`chunk.lease.release(after=...)`) once done with phi. `defer_checks`: a
    mapped chunk comes before its crc32c checks are done, so that a copy of phi to the devices (a DMA
    from the mapping, which the checks do not slow) runs beside them; the caller calls `chunk.check()`
    before any use of phi's values (`retrieval.device_chunks` does). Other chunks come checked.
    """
    starts = self._starts(rows_per_chunk, process_index, process_count)
    queue = collections.deque()
    try:
      for i in range(len(starts) + prefetch):
        if i < len(starts):
          a = starts[i]
          b = min(a + rows_per_chunk, self.num_rows)
          queue.append((a, b, *self._start_read(a, b, buffers, windows)))
        if i >= prefetch:
          a, b, futures, buf, lease = queue[0]
          if defer_checks and lease is not None:
            check = functools.partial(self._result, lease, a, b, f"Reading rows [{a}, {b})")
            chunk = self._chunk(a, b, [chunk_files_lib.ReadFuture(lease.unchecked, []), *futures[1:]])._replace(
              lease=lease, check=check
            )
          else:
            chunk = self._chunk(a, b, futures)._replace(buffer=buf, lease=lease)
          queue.popleft()
          yield chunk
    finally:  # an error, or the caller stopped early: the reads still queued (and a failed one) give windows back
      for *_, lease in queue:
        if lease is not None:
          lease.release()


class PendingWrite:
  """An in-flight write of chunks [c0, c1); `wait()` commits and marks them."""

  def __init__(self, store: EncodingStore, c0: int, c1: int, futures: Sequence[Any], *, nbytes: int = 0):
    self._store, self.chunks, self._futures, self._done = store, (c0, c1), futures, False
    self._nbytes = nbytes

  def wait(self) -> None:
    if self._done:
      return
    for f in self._futures:  # WriteFutures.result() waits for the commit.
      remote.wait(
        f,
        url=self._store.url,
        what=f"Writing chunks [{self.chunks[0]}, {self.chunks[1]}) of encoding store",
        nbytes=self._nbytes,
      )
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

  def __enter__(self) -> AsyncWriter:
    return self

  def __exit__(self, exc_type, *unused) -> None:
    if exc_type is None:
      self.flush()
    # On error, unfinished writes stay unmarked and are redone on resume.


# Reads of a chunk that does not exist fail (NOT_FOUND) instead of returning the fill value; chunks equal
# to the fill value are still written, so that every committed chunk has a data object.
_OPEN_OPTIONS = {"fill_missing_data_reads": False, "store_data_equal_to_fill_value": True}


def _array_spec(kv: Mapping[str, Any], shape: Sequence[int], chunk: Sequence[int], dtype: str) -> dict[str, Any]:
  return {
    "driver": "zarr3",
    "kvstore": dict(kv),
    "metadata": {
      "shape": list(shape),
      "data_type": dtype,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
      "chunk_key_encoding": {"name": "default"},
      "fill_value": -1 if dtype == "int64" else 0,
      "codecs": _CODECS,
    },
    **_OPEN_OPTIONS,
  }


def _direct_reader(phi: ts.TensorStore, num_rows: int) -> tuple[chunk_files_lib.ChunkFiles | None, str]:
  """A `ChunkFiles` reader of the phi array, or None and why phi is read with TensorStore."""
  global _warned_no_crc32c
  if not _env_on(DIRECT_READS_ENV):
    return None, f"{DIRECT_READS_ENV}={os.environ[DIRECT_READS_ENV]}"
  spec = phi.spec().to_json()
  kv = spec.get("kvstore", {})
  if kv.get("driver") != "file":
    return None, f"not a local store: kvstore {kv.get('driver')!r}"
  lay = chunk_files_lib.zarr3_layout(spec.get("metadata", {}))
  if isinstance(lay, str) or lay.num_rows != num_rows:
    return None, f"phi/ layout not read directly: {lay}"
  why = chunk_files_lib.unavailable(lay.checksum)
  if why:
    if not _warned_no_crc32c:
      _warned_no_crc32c = True
      logging.warning("Encoding stores are read with TensorStore, several times slower than directly: %s.", why)
    return None, why
  reader = chunk_files_lib.ChunkFiles(
    kv["path"], chunk_rows=lay.chunk_rows, num_rows=lay.num_rows, cols=lay.cols,
    dtype=phi.dtype.numpy_dtype, checksum=lay.checksum,
  )  # fmt: skip
  return reader, ""


def open_store(
  url: str,
  *,
  expected_meta: StoreMeta | None = None,
  create: bool = False,
  fsync: bool = True,
  direct_reads: bool = True,
  direct_writes: bool = True,
) -> EncodingStore:
  """Opens (or, with `create=True`, creates) the encoding store at `url`.

  Args:
    url: path, file://, gs:// or memory:// prefix.
    expected_meta: if given, an existing store must have equal meta, else
      `StoreMismatchError` lists the differing fields. Required with create.
    create: create the store when none exists at `url`. In multi-host jobs only
      process 0 creates; the others open after a barrier.
    fsync: local stores: flush every written file to the disk before it counts as
      written (TensorStore's `file_io_sync`). False leaves that to the OS: a chunk
      lost in a crash is then found by the checksums and presence checks of every
      read (`StoreDataError`, repaired by `verify_store --repair` and a re-encode).
    direct_reads: read phi of a local store straight from its chunk files
      (`EncodingStore.direct_reads`; TRACKSTAR_DIRECT_READS=0 turns it off).
    direct_writes: likewise write them (`EncodingStore.direct_writes`; needs direct
      reads; TRACKSTAR_DIRECT_WRITES=0 turns it off). `fsync` applies to both paths.

  Raises:
    remote.RemoteTimeoutError: a remote URL (gs://) did not answer in time.
  """
  kv_spec = kvstore_spec(url)
  if kv_spec.get("driver") == "file" and not fsync:
    kv_spec["file_io_sync"] = False

  def wait(future, what):
    return remote.wait(future, url=url, what=what)

  kv = wait(ts.KvStore.open(kv_spec, context=CONTEXT), "Opening the encoding store")
  raw = wait(kv.read("meta.json"), "Reading meta.json of the encoding store")
  if raw.state == "value":
    obj = json.loads(raw.value)
    meta = StoreMeta.from_json(obj)
    if expected_meta is not None:
      diff = meta_differences(meta, expected_meta)
      if diff:
        hint = ""
        if meta.dtype != expected_meta.dtype:
          hint = (
            f"\nIt holds {meta.dtype} encodings and {expected_meta.dtype} ones were asked for "
            "(config.store.dtype): a store keeps the dtype it was created with."
          )
        raise StoreMismatchError(
          f"Encoding store {url} was written with a different configuration; differing fields:\n  "
          + "\n  ".join(diff)
          + hint
          + "\nUse another store URL (config.store.url) or delete the old store."
        )
    names = ("phi", "ids", "scale") if quantize.is_quantized(meta.dtype) else ("phi", "ids")
    arrays = [
      wait(
        ts.open({"driver": "zarr3", "kvstore": _sub(kv_spec, f"{name}/"), **_OPEN_OPTIONS}, context=CONTEXT, open=True),
        f"Opening {name}/ of the encoding store",
      )
      for name in names
    ]
    return EncodingStore(
      url,
      kv,
      meta,
      *arrays[:2],
      format=obj.get("format", FORMAT),
      scale=(arrays[2:] or [None])[0],
      direct_reads=direct_reads,
      direct_writes=direct_writes,
      fsync=fsync,
    )
  if not create:
    raise FileNotFoundError(f"No encoding store at {url} (no meta.json). Run launch/encode.py first.")
  if expected_meta is None:
    raise ValueError("open_store(create=True) needs expected_meta.")
  m = expected_meta
  lay = quantize.layout(m.dtype, m.dim)
  wait(kv.delete_range(ts.KvStore.KeyRange("done/", "done0")), "Clearing markers")  # a deleted store's
  shapes = {"phi": ((m.num_rows, lay.codes_cols), lay.codes_dtype), "ids": ((m.num_rows,), "int64")}
  if lay.scale_cols:
    shapes["scale"] = ((m.num_rows, lay.scale_cols), "float32")
  # A deleted store of another dtype may have left a scale/ array: remove it with the rest.
  wait(kv.delete_range(ts.KvStore.KeyRange("scale/", "scale0")), "Clearing scale/")
  arrays = {
    name: wait(
      ts.open(
        _array_spec(_sub(kv_spec, f"{name}/"), shape, (m.chunk_rows, *shape[1:]), dtype),
        context=CONTEXT,
        create=True,
        delete_existing=True,
      ),
      f"Creating {name}/ of the encoding store",
    )
    for name, (shape, dtype) in shapes.items()
  }
  # meta.json last: its presence means the arrays exist.
  wait(kv.write("meta.json", json.dumps(m.to_json(), indent=1, sort_keys=True).encode()), "Writing meta.json")
  logging.info(
    "Created encoding store %s: %d rows x %d (%s), chunks of %d", url, m.num_rows, m.dim, m.dtype, m.chunk_rows
  )
  return EncodingStore(
    url, kv, m, arrays["phi"], arrays["ids"], scale=arrays.get("scale"), direct_reads=direct_reads,
    direct_writes=direct_writes, fsync=fsync,
  )  # fmt: skip
