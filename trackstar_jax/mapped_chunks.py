"""Store chunks copied to the GPU straight from the page cache: chunk files mapped read-only, page-locked.

Why. A chunk read into a buffer crosses host memory four times before the
device has it: page cache -> buffer (a read and a write), the checksum pass,
the DMA. On the H200 host that capped the buffered store feed at ~0.4x the
pinned DMA rate (BENCHMARKS.md, Streaming). PJRT's `dma_map` registers memory
writable, which the kernel refuses for a file mapping. The CUDA driver's
`cuMemHostRegister` with CU_MEMHOSTREGISTER_READ_ONLY takes one, so the page
cache itself becomes DMA-able, and a streamed byte crosses host memory twice:
its checksum pass and the DMA. Probe M4 (`benchmarks/probes/probe_mmap_register.py`)
measured one `device_put` of a 256 MiB window of eight mapped chunk files at
54.3 GB/s, vs 48.2 from a `dma_map`-ped buffer.

Registering runs at about the copy's rate (37-57 GB/s), and it stalls the
device's copies and kernel launches while it runs: register + copy +
unregister per scan ran at 19-21 GB/s, the buffered feed's rate (M4), and
matmuls at 0.53x (M7). So windows are kept registered across scans, a pinned
cache of the store of at most `limit_bytes`. The default is a quarter of
physical memory (env TRACKSTAR_MAPPED_BYTES; 0 turns mapped reads off). A
store larger than that keeps its first windows, and the rest of it takes the
buffered path. `warm` registers a scan's windows ahead, on a thread:
`tsj.retrieve` starts it before it encodes the queries, where host work such as
compiling can hide it.

  windows = shared_windows(jax.local_devices())    # None unless every device is a CUDA GPU
  got = windows.read(files, start, stop)           # None: not mappable here (see `read`): read as before
  if got is not None:
    phi = got.result()                             # [stop - start, cols], a view of the mapped files
    x = jax.device_put(phi, sharding)
    got.release(after=x)                           # stays registered; evictable once x is on the device

A window is the chunk files of rows [start, stop), mapped side by side
(MAP_FIXED into one reserved range) so that one copy carries it. It is keyed
by the files' (device, inode, size, mtime). The library's writes replace a
chunk file by rename, so a rewritten chunk is mapped anew. Every read checks
each file's crc32c over the mapped bytes, in parallel on the chunk-file pool
(the `crc32c` package; a checked store without it reads as before), so
integrity is what buffered reads give: a mismatch raises the same DATA_LOSS
error, and the window is dropped. Files must not be truncated in place while
mapped, because the CPU reading a page past the end is SIGBUS. The library
never does that. A window's memory is unmapped when it has been evicted and
its last numpy view is gone.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
import concurrent.futures
import contextlib
import ctypes
import mmap
import os
import tempfile
import threading
from typing import Any

from absl import logging
import numpy as np

from trackstar_jax import chunk_files, host_buffers

_PAGE = mmap.PAGESIZE
_PROT_NONE, _MAP_FIXED = 0x0, 0x10  # <sys/mman.h>, Linux (not in Python's mmap module)
_MAP_FAILED = ctypes.c_void_p(-1).value
_CU_MEMHOSTREGISTER_PORTABLE, _CU_MEMHOSTREGISTER_READ_ONLY = 0x01, 0x08

_lock = threading.Lock()
_shared: dict[str, MappedWindows | str] = {}  # "cuda" -> this process's windows, or why there are none


def default_limit_bytes() -> int:
  """Page-cache bytes kept registered at most: env TRACKSTAR_MAPPED_BYTES, else a quarter of physical memory."""
  env = os.environ.get("TRACKSTAR_MAPPED_BYTES", "")
  return int(env) if env.strip() else host_buffers.default_limit_bytes()


def _libc() -> ctypes.CDLL:
  libc = ctypes.CDLL(None, use_errno=True)
  libc.mmap.restype = ctypes.c_void_p
  libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
  libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
  return libc


class Mapping:
  """Files mapped read-only side by side: bytes [j * nbytes_each, (j + 1) * ...) are file j's first bytes.

  `np.asarray(mapping)` views it (read-only uint8); the range is unmapped when the
  mapping and every view of it are gone. Each mapped length must be a multiple of the page size.
  """

  def __init__(self, fds: Sequence[int], nbytes_each: int):
    if nbytes_each <= 0 or nbytes_each % _PAGE:
      raise ValueError(f"Mapped files side by side need a length that is a multiple of {_PAGE}, got {nbytes_each}.")
    self._libc = _libc()
    total = len(fds) * nbytes_each
    base = self._libc.mmap(None, total, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, _MAP_FAILED):
      raise OSError(ctypes.get_errno(), f"Reserving {total} bytes of address space failed")
    self.base, self.nbytes = base, total
    for j, fd in enumerate(fds):
      at = base + j * nbytes_each
      got = self._libc.mmap(at, nbytes_each, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
      if got != at:
        err = ctypes.get_errno()
        self._libc.munmap(base, total)
        self.base = None
        raise OSError(err, f"Mapping file {j} of a window failed: {os.strerror(err)}")
    self.__array_interface__ = {"shape": (total,), "typestr": "|u1", "data": (base, True), "version": 3}

  def __del__(self):
    if getattr(self, "base", None) is not None:
      self._libc.munmap(self.base, self.nbytes)


class CudaHostRegister:
  """`cuMemHostRegister` of read-only memory with the CUDA driver (libcuda), in the primary context of a GPU.

  Memory registered PORTABLE is page-locked for every context: a copy from it to any GPU of
  the process is a DMA, `jax.device_put` included.
  """

  def __init__(self, ordinal: int = 0):
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
    lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
    self._lib = lib
    self._check(lib.cuInit(0), "cuInit")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    self._check(lib.cuDeviceGet(ctypes.byref(dev), int(ordinal)), "cuDeviceGet")
    self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    self._ctx = ctx

  def _check(self, result: int, what: str) -> None:
    if result:
      name = ctypes.c_char_p()
      self._lib.cuGetErrorName(result, ctypes.byref(name))
      raise RuntimeError(f"{what} failed: CUDA error {result} ({(name.value or b'?').decode()})")

  def register(self, addr: int, nbytes: int) -> None:
    self._check(self._lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")  # per thread; cheap
    flags = _CU_MEMHOSTREGISTER_PORTABLE | _CU_MEMHOSTREGISTER_READ_ONLY
    self._check(self._lib.cuMemHostRegister_v2(addr, nbytes, flags), "cuMemHostRegister(READ_ONLY)")

  def unregister(self, addr: int) -> None:
    self._check(self._lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
    self._check(self._lib.cuMemHostUnregister(addr), "cuMemHostUnregister")


def registers_file_pages(register: Callable[[int, int], None], unregister: Callable[[int], None]) -> str | None:
  """Why `register` cannot page-lock a read-only mapping of a file here (None: it can). Tried on one page."""
  with tempfile.TemporaryFile() as f:
    f.write(b"\0" * _PAGE)
    f.flush()
    m = Mapping([f.fileno()], _PAGE)
    try:
      register(m.base, _PAGE)
    except Exception as e:  # pylint: disable=broad-except  # a driver that refuses file pages
      return str(e).splitlines()[0][:200]
    unregister(m.base)
  return None


class _Window:
  """One mapped, registered window: rows [start, start + rows) of an array, from chunks [c0, c1)."""

  def __init__(self, key, identity, mapping: Mapping, stored_crcs: Sequence[int] | None):
    self.key, self.identity, self.mapping, self.stored_crcs = key, identity, mapping, stored_crcs
    self.bytes = np.asarray(mapping)
    self.leases = 0  # reads handed out and not yet released
    self.after: list[Any] = []  # what must be done before it is unregistered (device copies)
    self.bad = False  # a read found a checksum mismatch: dropped at release


class MappedRead(chunk_files.ReadFuture):
  """A read from a window: `result()` checks the chunks' crc32c and returns the rows; `release(after=)` gives it back."""

  def __init__(self, windows: MappedWindows, window: _Window, out: np.ndarray, futures):
    super().__init__(out, futures)
    self._windows, self._window, self._released = windows, window, False

  def result(self, timeout: float | None = None) -> np.ndarray:
    try:
      return super().result(timeout)
    except ValueError:
      self._windows._release(self._window, None, lease=False)  # pylint: disable=protected-access
      raise

  @property
  def unchecked(self) -> np.ndarray:
    """The rows now, while their crc32c checks may still run: for a copy whose result waits on `result()`."""
    return self._out

  def release(self, after: Any = None) -> None:
    """The rows are no longer read once `after` (a jax array, a future; None: now) is done."""
    if not self._released:
      self._released = True
      self._windows._release(self._window, after)  # pylint: disable=protected-access


class MappedWindows:
  """Windows of chunk files mapped and page-locked with `register`, kept (LRU) up to `limit_bytes` in all.

  Args:
    register, unregister: page-lock a read-only range (address, nbytes) and undo it
      (`CudaHostRegister`; tests pass fakes).
    limit_bytes: registered bytes at most (default `default_limit_bytes()`).
  """

  def __init__(
    self,
    *,
    register: Callable[[int, int], None],
    unregister: Callable[[int], None],
    limit_bytes: int | None = None,
  ):
    self._register, self._unregister = register, unregister
    self.limit_bytes = default_limit_bytes() if limit_bytes is None else int(limit_bytes)
    self._windows: collections.OrderedDict[Any, _Window] = collections.OrderedDict()  # LRU first
    self._lock = threading.Lock()
    self.pinned_bytes = 0
    self.hits = self.mapped = self.declined = self.evicted = 0
    self.broken: str | None = None  # why registration stopped working (then every read declines)
    self._warmer: concurrent.futures.ThreadPoolExecutor | None = None

  def read(self, files: chunk_files.ChunkFiles, start: int, stop: int) -> MappedRead | None:
    """Rows [start, stop) of `files` from a window (mapped and registered now, or kept), or None.

    None (read them the buffered way) when: no rows, `start` is not a chunk boundary, a chunk file's data
    is not a whole number of pages, a checked store has no `crc32c` package, a file is missing or
    of another size (the buffered reader then raises its error), the window does not fit the
    limit beside the windows in use, or registration failed (logged once).
    """
    if not 0 <= start <= stop <= files.num_rows:
      raise IndexError(f"Rows [{start}, {stop}) outside [0, {files.num_rows}) of {files.directory}.")
    if (
      start == stop
      or self.broken
      or start % files.chunk_rows
      or files.data_bytes % _PAGE
      or (files.checksum and chunk_files.crc32c_buffers is None)
    ):
      self.declined += 1
      return None
    c0, c1, key = _window_of(files, start, stop)
    nbytes = (c1 - c0) * files.data_bytes
    with self._lock:
      window = self._windows.get(key)
      if window is not None and (window.bad or window.identity != _identity([files.path(c) for c in range(c0, c1)])):
        if window.leases:  # rewritten (or damaged) since mapped, and still being read: read this one buffered
          self.declined += 1
          return None
        self._evict(window)  # map it anew
        window = None
      if window is None:
        window = self._map(files, key, c0, c1, nbytes)
        if window is None:
          self.declined += 1
          return None
      else:
        self.hits += 1
        self._windows.move_to_end(key)
      window.leases += 1
    out = window.bytes[: (stop - start) * files.row_bytes].view(files.dtype).reshape(stop - start, files.cols)
    futures = []
    if window.stored_crcs is not None:
      pool = chunk_files.executor()
      for j, c in enumerate(range(c0, c1)):
        data = window.bytes[j * files.data_bytes : (j + 1) * files.data_bytes]
        futures.append(pool.submit(_check_crc, window, files, c, data, window.stored_crcs[j]))
    return MappedRead(self, window, out, futures)

  def _map(self, files: chunk_files.ChunkFiles, key, c0: int, c1: int, nbytes: int) -> _Window | None:
    """A new window of chunks [c0, c1), registered; None when it does not fit or cannot be made.

    Room is made by evicting idle windows (oldest use first) of other arrays, and of this array where
    they overlap [c0, c1) (another chunking of the same rows), never other windows of this array:
    a scan of a store larger than the limit keeps its first windows registered and reads the rest
    buffered, rather than evicting each window before the next scan reaches it again.
    """
    if nbytes > self.limit_bytes:
      return None
    while self.pinned_bytes + nbytes > self.limit_bytes:
      idle = next((w for w in self._windows.values() if w.leases == 0 and _evictable_for(w.key, key)), None)
      if idle is None:
        return None  # the kept windows are this array's or being read: this one goes the buffered way
      self._evict(idle)
    fds, stats, crcs = [], [], []
    try:
      for c in range(c0, c1):
        try:
          fd = os.open(files.path(c), os.O_RDONLY)
        except OSError:
          return None  # missing or unreadable: the buffered reader raises the store's error for it
        fds.append(fd)
        st = os.fstat(fd)
        if st.st_size < files.file_bytes or (st.st_size > files.file_bytes and not files.checksum):
          return None  # truncated or another layout: the buffered reader says so
        stats.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        if files.checksum:
          crcs.append(int.from_bytes(os.pread(fd, 4, files.data_bytes), "little"))
      mapping = Mapping(fds, files.data_bytes)
    except OSError as e:
      logging.warning("Could not map chunks [%d, %d) of %s (%s); read buffered.", c0, c1, files.directory, e)
      return None
    finally:
      for fd in fds:
        os.close(fd)
    try:
      self._register(mapping.base, mapping.nbytes)
    except Exception as e:  # pylint: disable=broad-except  # e.g. the driver's pinned-memory limit
      self.broken = str(e).splitlines()[0][:200]
      logging.warning("Could not page-lock mapped store chunks (%s); chunks are read into buffers from now on.",
                      self.broken)  # fmt: skip
      return None
    window = _Window(key, tuple(stats), mapping, crcs if files.checksum else None)
    self._windows[key] = window
    self.pinned_bytes += nbytes
    self.mapped += 1
    return window

  def _evict(self, window: _Window) -> None:
    """Unregisters `window` once its copies are done and forgets it (lock held; it has no leases)."""
    for after in window.after:
      with contextlib.suppress(Exception):  # a failed copy's error surfaces where its array is used
        host_buffers.wait(after)
    self._windows.pop(window.key, None)
    self.pinned_bytes -= window.mapping.nbytes
    self.evicted += 1
    try:
      self._unregister(window.mapping.base)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not unregister a mapped store window: %s", e)

  def _release(self, window: _Window, after: Any, *, lease: bool = True) -> None:
    """Gives a lease back (lease=False: none, a failed check's); a bad window is dropped once none is out."""
    with self._lock:
      window.leases -= lease
      if after is not None:
        window.after = [a for a in window.after if not _done(a)] + [after]
      if window.bad and window.leases == 0 and self._windows.get(window.key) is window:
        self._evict(window)

  def warm(self, files: chunk_files.ChunkFiles, starts: Sequence[int], rows: int) -> concurrent.futures.Future:
    """Maps and registers the windows of rows [s, s + rows) for each s in `starts`, in order, on a thread.

    So that a process's first scan finds its windows registered: registering stalls the device
    copies in flight, so it is best done before the scan's copies start (while the queries are
    encoded, the step compiles). Stops at the limit, or where a window cannot be mapped (the scan
    then reads it buffered and reports why). The future's result: windows mapped.
    """
    with self._lock:
      if self._warmer is None:
        self._warmer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mapped-chunks-warm")
    return self._warmer.submit(self._warm, files, list(starts), int(rows))

  def _warm(self, files: chunk_files.ChunkFiles, starts: list[int], rows: int) -> int:
    made = 0
    for start in starts:
      stop = min(start + rows, files.num_rows)
      if self.broken or start % files.chunk_rows or files.data_bytes % _PAGE or start >= stop:
        break
      c0, c1, key = _window_of(files, start, stop)
      with self._lock:
        if key in self._windows:
          continue  # kept (a changed one is replaced when read)
        if self._map(files, key, c0, c1, (c1 - c0) * files.data_bytes) is None:
          break
        made += 1
    return made

  def clear(self) -> None:
    """Unregisters and forgets every window not being read (after its copies)."""
    with self._lock:
      for window in [w for w in self._windows.values() if w.leases == 0]:
        self._evict(window)


def _window_of(files: chunk_files.ChunkFiles, start: int, stop: int) -> tuple[int, int, tuple]:
  """The chunks [c0, c1) that rows [start, stop) lie in, and their window's key (directory, c0, c1, bytes per chunk)."""
  c0, c1 = start // files.chunk_rows, -(-stop // files.chunk_rows)
  return c0, c1, (os.path.abspath(files.directory), c0, c1, files.data_bytes)


def _evictable_for(kept, new) -> bool:
  """Whether window `kept` may make room for window `new` (keys: directory, c0, c1, bytes per chunk)."""
  return kept[0] != new[0] or (kept[1] < new[2] and new[1] < kept[2])


def _identity(paths: Sequence[str]) -> tuple | None:
  try:
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, paths))
  except OSError:
    return None


def _check_crc(window: _Window, files: chunk_files.ChunkFiles, chunk: int, data: np.ndarray, stored: int) -> None:
  crc = chunk_files.crc32c_buffers.crc32c(data)
  if crc != stored:
    window.bad = True
    base = chunk * files.chunk_rows
    raise ValueError(
      f"DATA_LOSS: chunk file {files.path(chunk)} (rows [{base}, {min(base + files.chunk_rows, files.num_rows)})) "
      f"fails its crc32c checksum: stored {stored:08x}, computed {crc:08x} from its data"
    )


def _done(after: Any) -> bool:
  is_ready = getattr(after, "is_ready", None) or getattr(after, "done", None)
  return bool(is_ready()) if is_ready is not None else False


def shared_windows(devices: Sequence[Any]) -> MappedWindows | None:
  """This process's windows, registered with the CUDA driver, or None (logged once: why not).

  None unless every device is a CUDA GPU, libcuda loads, the driver page-locks a read-only
  file mapping, and the limit (`default_limit_bytes()`) is above 0.
  """
  with _lock:
    if "cuda" not in _shared:
      why = None
      if not devices or any(d.platform != "gpu" or "cuda" not in str(d.client.platform_version).lower()
                            for d in devices):  # fmt: skip
        why = "the devices are not CUDA GPUs"
      elif default_limit_bytes() <= 0:
        why = "TRACKSTAR_MAPPED_BYTES is 0"
      else:
        try:
          driver = CudaHostRegister(getattr(devices[0], "local_hardware_id", 0) or 0)
          why = registers_file_pages(driver.register, driver.unregister)
        except (OSError, RuntimeError, AttributeError) as e:
          why = f"the CUDA driver is not usable from here ({e})"
      _shared["cuda"] = why or MappedWindows(register=driver.register, unregister=driver.unregister)
      if why:
        logging.info("Store chunks are not read from mapped files: %s.", why)
    got = _shared["cuda"]
    return None if isinstance(got, str) else got


def clear() -> None:
  """Unregisters this process's idle windows (the page cache keeps the files; they are mapped again when read)."""
  with _lock:
    got = _shared.get("cuda")
  if isinstance(got, MappedWindows):
    got.clear()
