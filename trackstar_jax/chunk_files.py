"""Direct reads and writes of a local zarr v3 array's chunk files: the encoding store at the disk's rate.

TensorStore's file kvstore reads an encoding store's 32 MiB chunks at a
fraction of what plain reads of the same files reach (issue 14: 0.4-0.7 GB/s
vs ~10 GB/s from the page cache on a 2-core machine; on the 16-core H200
host 3.1 GB/s vs 19.2 for these reads), and writes them at ~0.6-0.8 GB/s. The
store's layout is simple enough to read and write by hand:

  <array>/c/<i>/0    chunk i (rows [i * chunk_rows, (i + 1) * chunk_rows)): the rows' C-order bytes
                     (zarr3 codec `bytes`, little endian), then their crc32c, 4 bytes little endian
                     (codec `crc32c`; stores of format 1 have none). The last chunk is stored full size.

  files = ChunkFiles("/data/store/phi", chunk_rows=4096, num_rows=n, cols=d, dtype=ml_dtypes.bfloat16)
  rows = files.read(0, 32768).result()     # [32768, d], every chunk's crc32c checked

  files.write(0, rows).result()            # whole chunks: data + crc32c to a temporary file, renamed

`read` and `write` return at once; one task per chunk file runs on a process-wide thread
pool (`executor()`: `THREADS` threads, env TRACKSTAR_READ_THREADS, default
min(16, cpus)), so several reads can be in flight. `zarr3_layout` says whether
an array's metadata has this layout (else read it with TensorStore).

Checksums. With the `crc32c` package (`pip install trackstar_jax[fast-io]`;
it takes any buffer and releases the GIL) a chunk wholly wanted is read
straight into the output with one `os.preadv` and checked there: no copy (16
threads on the H200 host: 79 GB/s of checksums, 46 GB/s of page-cache reads).
Otherwise google_crc32c (the C implementation) takes only `bytes` and
releases the GIL only for `bytes` of >= 1 MiB, so a chunk is read in pieces
of `PIECE` bytes with `os.pread` (GIL released), each piece's crc32c is
folded in (GIL released), and the wanted part of the piece is copied into the
output (numpy, GIL released): the threads work in parallel, at the cost of one
memcpy. Without checksums the wanted rows are read straight into the output
with one `os.preadv`.

Errors are `ValueError`s in TensorStore's words, so the store's integrity
machinery handles them as it does TensorStore's: "NOT_FOUND: ..." (no chunk
file), "DATA_LOSS: ..." (checksum mismatch), and a message naming the file,
its size and the size expected (truncated, or another layout). As in
TensorStore 0.1.86, bytes after a chunk's checksum are ignored, while bytes
after a chunk without one (format 1) make it unreadable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import concurrent.futures
import os
import threading
import time
from typing import Any, NamedTuple
import uuid

import numpy as np

try:
  import google_crc32c
except ImportError:  # setup.py installs it; without it, stores are read with TensorStore (`unavailable`)
  google_crc32c = None
try:  # the `crc32c` package (extra `fast-io`): any buffer, GIL released, ~10 GB/s per thread
  import crc32c as crc32c_buffers
except ImportError:
  crc32c_buffers = None

THREADS = int(os.environ.get("TRACKSTAR_READ_THREADS", "0")) or min(16, os.cpu_count() or 1)
# Bytes per pread: >= 1 MiB, where google_crc32c starts releasing the GIL; small enough to stay in cache
# (2 cores here: 1-2 MiB ~7-8 GB/s, 4 MiB ~6, 32 MiB ~1: a fresh mmap per piece); larger = fewer GIL turns.
PIECE = 2 << 20
_CRC_BYTES = 4

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()


def executor() -> concurrent.futures.ThreadPoolExecutor:
  """The process-wide pool that chunk reads run on (`THREADS` threads, made at first use)."""
  global _executor
  with _lock:
    if _executor is None:
      _executor = concurrent.futures.ThreadPoolExecutor(max(1, THREADS), thread_name_prefix="chunk-files")
    return _executor


def _forget_executor() -> None:
  global _executor, _lock
  _executor, _lock = None, threading.Lock()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_executor)


def unavailable(checksum: bool) -> str | None:
  """Why direct reads cannot check this kind of store here (None: they can)."""
  if not checksum or crc32c_buffers is not None:
    return None
  if google_crc32c is None:
    return "google-crc32c is not installed (pip install google-crc32c)"
  if getattr(google_crc32c, "implementation", "c") != "c":
    return "google-crc32c has no C extension here (its pure-Python fallback is far too slow)"
  return None


class Layout(NamedTuple):
  """What `ChunkFiles` needs to know of an array, from its zarr.json metadata."""

  chunk_rows: int
  num_rows: int
  cols: int
  checksum: bool


def zarr3_layout(metadata: Mapping[str, Any]) -> Layout | str:
  """The `Layout` of a 2-D zarr v3 array (its zarr.json), or why it is not one `ChunkFiles` reads.

  Readable: regular chunks of whole rows, default chunk keys with "/", codecs `bytes`
  (little endian or one-byte values) optionally followed by `crc32c`.
  """
  shape = list(metadata.get("shape", ()))
  grid = metadata.get("chunk_grid", {})
  chunk = list(grid.get("configuration", {}).get("chunk_shape", ()))
  keys = metadata.get("chunk_key_encoding", {})
  codecs = [c if isinstance(c, Mapping) else {"name": c} for c in metadata.get("codecs", ())]
  names = [c.get("name") for c in codecs]
  if len(shape) != 2 or grid.get("name") != "regular" or len(chunk) != 2 or chunk[1] != shape[1]:
    return f"not 2-D with chunks of whole rows (shape {shape}, chunk grid {grid})"
  if keys.get("name") != "default" or keys.get("configuration", {}).get("separator", "/") != "/":
    return f"chunk key encoding {keys} (expected default, '/')"
  if names not in (["bytes"], ["bytes", "crc32c"]):
    return f"codecs {names} (expected bytes[, crc32c])"
  if codecs[0].get("configuration", {}).get("endian", "little") != "little":
    return "big-endian values"
  return Layout(int(chunk[0]), int(shape[0]), int(shape[1]), names == ["bytes", "crc32c"])


class Futures:
  """Several chunk tasks as one future: `result()` waits for all of them and raises the first error."""

  def __init__(self, futures: Sequence[concurrent.futures.Future]):
    self._futures = list(futures)

  def result(self, timeout: float | None = None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    for f in self._futures:  # in chunk order: the first damaged chunk's error is raised
      f.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

  def done(self) -> bool:
    return all(f.done() for f in self._futures)

  def cancel(self) -> bool:
    cancelled = [f.cancel() for f in self._futures]  # every one, not up to the first that runs already
    return all(cancelled)


class ReadFuture(Futures):
  """The rows of one `ChunkFiles.read`: `result()` waits for every chunk task, raises the first error, returns them."""

  def __init__(self, out: np.ndarray, futures: Sequence[concurrent.futures.Future]):
    super().__init__(futures)
    self._out = out

  def result(self, timeout: float | None = None) -> np.ndarray:
    super().result(timeout)
    return self._out


def _crc32c(data: np.ndarray, crc: int = 0) -> int:
  """crc32c of a uint8 buffer, continuing `crc` (the `crc32c` package in place, else google_crc32c by pieces)."""
  if crc32c_buffers is not None:
    return crc32c_buffers.crc32c(data, crc)
  for p0 in range(0, data.size, PIECE):
    crc = google_crc32c.extend(crc, data[p0 : p0 + PIECE].tobytes())
  return crc


class ChunkFiles:
  """Reads rows of one local zarr v3 array straight from its chunk files (see the module docstring).

  Args:
    directory: the array's directory (holding zarr.json and c/).
    chunk_rows, num_rows, cols: its chunk rows, rows and columns (chunks hold whole rows).
    dtype: its numpy dtype (bfloat16: ml_dtypes.bfloat16).
    checksum: chunk files end with their crc32c (codec `crc32c`), which every read checks.
    pool: the executor to run chunk tasks on (default: the process-wide `executor()`).
  """

  def __init__(
    self,
    directory: str,
    *,
    chunk_rows: int,
    num_rows: int,
    cols: int,
    dtype: Any,
    checksum: bool = True,
    pool: concurrent.futures.Executor | None = None,
  ):
    why = unavailable(checksum)
    if why:
      raise RuntimeError(f"Cannot check the chunks of {directory} directly: {why}.")
    if chunk_rows <= 0 or num_rows < 0 or cols <= 0:
      raise ValueError(
        f"ChunkFiles needs chunk_rows, cols > 0 and num_rows >= 0, got {chunk_rows}, {num_rows}, {cols}."
      )
    self.directory, self.chunk_rows, self.num_rows, self.cols = os.fspath(directory), chunk_rows, num_rows, cols
    self.dtype, self.checksum, self._pool = np.dtype(dtype), checksum, pool
    self.row_bytes = cols * self.dtype.itemsize
    self.data_bytes = chunk_rows * self.row_bytes  # every chunk file, the last one too, holds chunk_rows rows
    self.file_bytes = self.data_bytes + (_CRC_BYTES if checksum else 0)

  def path(self, chunk: int) -> str:
    """The file of chunk `chunk` (zarr v3 default key `c/<chunk>/0`)."""
    return os.path.join(self.directory, "c", str(chunk), "0")

  def read(self, start: int, stop: int, *, out: np.ndarray | None = None) -> ReadFuture:
    """Starts reading rows [start, stop); returns at once. `.result()`: the rows [stop - start, cols].

    `out`: a C-contiguous [stop - start, cols] array of the store's dtype to read into (e.g. a
    reused page-locked buffer, `host_buffers`); default a new one.
    """
    if not 0 <= start <= stop <= self.num_rows:
      raise IndexError(f"Rows [{start}, {stop}) outside [0, {self.num_rows}) of {self.directory}.")
    if out is None:
      out = np.empty((stop - start, self.cols), self.dtype)
    elif out.shape != (stop - start, self.cols) or out.dtype != self.dtype or not out.flags.c_contiguous:
      raise ValueError(
        f"read(out=) takes a C-contiguous [{stop - start}, {self.cols}] {self.dtype} array, "
        f"got {out.shape} {out.dtype} (C-contiguous: {out.flags.c_contiguous})."
      )
    flat = out.reshape(-1).view(np.uint8)  # C-contiguous: output row r is bytes [r * row_bytes, (r + 1) * ...)
    pool = self._pool or executor()
    c0, c1 = start // self.chunk_rows, -(-stop // self.chunk_rows)
    return ReadFuture(out, [pool.submit(self._read_chunk, c, start, stop, flat) for c in range(c0, c1)])

  def _read_chunk(self, chunk: int, start: int, stop: int, flat: np.ndarray) -> None:
    """Copies the rows of chunk `chunk` that fall in [start, stop) into `flat` (the output's bytes)."""
    base = chunk * self.chunk_rows
    lo, hi = max(start, base) - base, min(stop, base + self.chunk_rows) - base  # rows of the chunk wanted
    b0, b1, at = lo * self.row_bytes, hi * self.row_bytes, (base + lo - start) * self.row_bytes  # file -> out bytes
    path = self.path(chunk)
    rows = f"rows [{base}, {min(base + self.chunk_rows, self.num_rows)})"
    try:
      fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
      raise ValueError(f"NOT_FOUND: chunk file {path} ({rows}) does not exist") from None
    except OSError as e:
      raise ValueError(f"Cannot open chunk file {path} ({rows}): {e}") from e
    try:
      size = os.fstat(fd).st_size
      # As TensorStore 0.1.86: bytes past a checksum are ignored, past bare rows (no checksum) refused.
      if size < self.file_bytes or (size > self.file_bytes and not self.checksum):
        crc = f" + {_CRC_BYTES} B crc32c" if self.checksum else ""
        raise ValueError(
          f"Chunk file {path} ({rows}) has {size} bytes, expected {self.file_bytes} "
          f"({self.chunk_rows} rows x {self.row_bytes} B{crc}): truncated, or not of this store's layout"
        )
      if self.checksum and crc32c_buffers is not None:
        self._read_checked_in_place(fd, path, rows, b0, b1, flat[at : at + b1 - b0])
      elif self.checksum:
        self._read_checked(fd, path, rows, b0, b1, flat[at : at + b1 - b0])
      else:
        got = os.preadv(fd, [flat[at : at + b1 - b0]], b0)
        if got != b1 - b0:
          raise ValueError(f"Chunk file {path} ({rows}) ended after {b0 + got} bytes, expected {self.file_bytes}")
    except OSError as e:
      raise ValueError(f"Reading chunk file {path} ({rows}) failed: {e}") from e
    finally:
      os.close(fd)

  def write(self, start: int, rows: np.ndarray, *, fsync: bool = True) -> Futures:
    """Starts writing rows [start, start + n) as whole chunk files; returns at once (`.result()` waits).

    `start` is a chunk boundary and the rows end at one or at num_rows (the last
    chunk is padded with fill rows, zeros, as zarr stores it). Each chunk file
    is written to a temporary name beside it (data, then its crc32c when the
    array has the codec), flushed to the disk when `fsync`, and renamed into
    place: a reader sees the old file or the new one, never a part.
    """
    n = rows.shape[0]
    stop = start + n
    if start % self.chunk_rows or not (stop % self.chunk_rows == 0 or stop == self.num_rows) or stop > self.num_rows:
      raise ValueError(
        f"Direct writes take whole chunks of {self.chunk_rows} rows (the last may end at {self.num_rows}); "
        f"got rows [{start}, {stop}) for {self.directory}."
      )
    if rows.shape[1:] != (self.cols,):
      raise ValueError(f"Rows of {self.directory} have {self.cols} columns, got shape {rows.shape}.")
    if self.checksum and unavailable(True):
      raise RuntimeError(f"Cannot checksum chunks of {self.directory}: {unavailable(True)}.")
    flat = np.ascontiguousarray(rows, self.dtype).reshape(-1).view(np.uint8)
    pool = self._pool or executor()
    c0, c1 = start // self.chunk_rows, -(-stop // self.chunk_rows)
    return Futures(
      [
        pool.submit(self._write_chunk, c, flat[(c - c0) * self.data_bytes :][: self.data_bytes], fsync)
        for c in range(c0, c1)
      ]
    )

  def _write_chunk(self, chunk: int, data: np.ndarray, fsync: bool) -> None:
    pad = np.zeros(self.data_bytes - data.size, np.uint8)  # fill rows of the last chunk
    parts = [data, pad]
    if self.checksum:
      parts.append(np.frombuffer(_crc32c(pad, _crc32c(data)).to_bytes(_CRC_BYTES, "little"), np.uint8))
    path = self.path(chunk)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      for part in parts:
        view = memoryview(part)
        while view.nbytes:
          view = view[os.write(fd, view) :]
      if fsync:
        os.fsync(fd)
    except BaseException:
      os.close(fd)
      os.unlink(tmp)
      raise
    os.close(fd)
    os.replace(tmp, path)

  def _read_checked_in_place(self, fd: int, path: str, rows: str, b0: int, b1: int, dst: np.ndarray) -> None:
    """One preadv of the data part (into dst when it is all wanted, else a scratch buffer) and its crc32c."""
    whole = b0 == 0 and b1 == self.data_bytes
    data = dst if whole else np.empty(self.data_bytes, np.uint8)
    stored = bytearray(_CRC_BYTES)
    got = os.preadv(fd, [data, stored], 0)
    if got != self.file_bytes:
      raise ValueError(f"Chunk file {path} ({rows}) ended after {got} bytes, expected {self.file_bytes}")
    self._check(path, rows, _crc32c(data), int.from_bytes(stored, "little"))
    if not whole:
      dst[:] = data[b0:b1]

  def _check(self, path: str, rows: str, crc: int, want_crc: int) -> None:
    if crc != want_crc:
      raise ValueError(
        f"DATA_LOSS: chunk file {path} ({rows}) fails its crc32c checksum: "
        f"stored {want_crc:08x}, computed {crc:08x} from its data"
      )

  def _read_checked(self, fd: int, path: str, rows: str, b0: int, b1: int, dst: np.ndarray) -> None:
    """Reads the whole data part in pieces, folding each into its crc32c; copies its bytes [b0, b1) into dst."""
    crc = 0
    for p0 in range(0, self.data_bytes, PIECE):
      piece = os.pread(fd, min(PIECE, self.data_bytes - p0), p0)  # bytes: what google_crc32c takes
      if not piece:
        raise ValueError(f"Chunk file {path} ({rows}) ended after {p0} bytes, expected {self.file_bytes}")
      crc = google_crc32c.extend(crc, piece)
      p1 = p0 + len(piece)
      s0, s1 = max(p0, b0), min(p1, b1)
      if s0 < s1:
        dst[s0 - b0 : s1 - b0] = np.frombuffer(piece, np.uint8, s1 - s0, s0 - p0)
      if p1 - p0 < min(PIECE, self.data_bytes - p0):  # a short read: the file shrank since fstat
        raise ValueError(f"Chunk file {path} ({rows}) ended after {p1} bytes, expected {self.file_bytes}")
    stored = os.pread(fd, _CRC_BYTES, self.data_bytes)
    if len(stored) != _CRC_BYTES:
      raise ValueError(f"Chunk file {path} ({rows}) has no crc32c after its {self.data_bytes} data bytes")
    self._check(path, rows, crc, int.from_bytes(stored, "little"))
