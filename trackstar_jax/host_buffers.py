"""Reused, page-locked host buffers for the store feed: chunk reads land where the device copy reads.

PJRT copies a numpy array to a GPU through a staging buffer of its own (a
memcpy into pinned memory, then the DMA) unless the array lies in memory
registered with the client's `dma_map`. On the H200 host one 256 MiB
`device_put` ran at 7.8 GB/s from reused pageable memory, 2.4 from fresh
memory and 49.0 from a `dma_map`-ped buffer: the pinned DMA rate
(`benchmarks/probes/probe_dma.py`, BENCHMARKS.md Streaming).

  pool = shared_pool(jax.local_devices(), nbytes=chunk_bytes, max_buffers=6)
  buf = pool.take()                              # uint8 [nbytes]: read a chunk into it
  x = jax.device_put(buf.view(dtype).reshape(rows, d), sharding)
  pool.release(buf, after=x)                     # reused once x is on the device
  pool.drain()                                   # end of a scan: wait for the copies; buffers kept

Why buffers are kept (per process, per client and size, until `clear()`): on
that host the first touch of fresh memory runs at ~2.3 GB/s per thread (page
faults), so making and registering a 256 MiB buffer costs ~90-115 ms, while
registering memory already touched runs at ~35 GB/s. A buffer is therefore
registered when it is first reused (its first read faulted its pages in, on
the reader threads, in parallel) and kept for later scans. At most
`default_limit_bytes()` (a quarter of physical memory) is kept in all pools.

A buffer is reused only after what it was released with is done (a jax array
ready, a future's result). `shared_pool` returns None for CPU devices (there
`device_put` may alias a page-aligned numpy buffer instead of copying it, so
reusing one would change an array already made) and where the client has no
`dma_map`. A buffer whose registration fails, or beyond the limit, is still
reused and copied through PJRT's staging.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
import contextlib
import mmap
import os
import threading
from typing import Any

from absl import logging
import numpy as np

_PAGE = mmap.PAGESIZE
_lock = threading.Lock()
_dma_support: dict[int, str | None] = {}  # id(client) -> None (dma_map works) or why not
_shared: dict[tuple[int, int], BufferPool] = {}  # (id(client), nbytes) -> its pool


def _anonymous(nbytes: int) -> mmap.mmap:
  """Private anonymous memory, as malloc gives (Python's default for mmap(-1) is shared: shmem pages)."""
  return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)


def default_limit_bytes() -> int:
  """Host memory the kept read buffers may hold in all: a quarter of the host's physical memory."""
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
  except (ValueError, OSError):
    return 8 << 30


def dma_unsupported(client: Any) -> str | None:
  """Why `client` cannot `dma_map` host memory (None: it can). Tried once per client on one page."""
  with _lock:
    key = id(client)
    if key not in _dma_support:
      why = None
      if not hasattr(client, "dma_map"):
        why = f"this jax ({type(client).__name__}) has no client.dma_map"
      else:
        page = np.frombuffer(_anonymous(_PAGE), np.uint8)
        try:
          client.dma_map(page.ctypes.data, _PAGE)
          client.dma_unmap(page.ctypes.data)
        except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError: UNIMPLEMENTED on CPU
          why = str(e).splitlines()[0][:200]
      _dma_support[key] = why
    return _dma_support[key]


class BufferPool:
  """Up to `max_buffers` host buffers of `nbytes` bytes, handed out by `take` and reused after `release`.

  Args:
    nbytes: bytes per buffer (page-aligned anonymous memory, made at first need).
    max_buffers: buffers made at most; `take` then waits for the oldest released one. When none was
      released (all taken), `take` hands out a plain buffer that is not kept, rather than wait forever.
    register, unregister: page-lock a buffer (address, nbytes) and undo it, e.g. a jax client's
      `dma_map` / `dma_unmap`; None: plain buffers. A buffer is registered when first reused.
    limit_bytes: page-locked bytes at most; further buffers stay plain.
  """

  def __init__(
    self,
    nbytes: int,
    max_buffers: int,
    *,
    register: Callable[[int, int], None] | None = None,
    unregister: Callable[[int], None] | None = None,
    limit_bytes: int | None = None,
  ):
    if nbytes <= 0 or max_buffers <= 0:
      raise ValueError(f"BufferPool needs nbytes > 0 and max_buffers > 0, got {nbytes} and {max_buffers}.")
    self.nbytes, self.max_buffers = int(nbytes), int(max_buffers)
    self._register, self._unregister = register, unregister
    self._limit = default_limit_bytes() if limit_bytes is None else int(limit_bytes)
    self._free: collections.deque[np.ndarray] = collections.deque()
    self._released: collections.deque[tuple[np.ndarray, Any]] = collections.deque()  # (buffer, after)
    self._mine: dict[int, np.ndarray] = {}  # address -> buffer, every buffer made
    self._pinned: set[int] = set()  # addresses registered
    self._refused: set[int] = set()  # addresses whose registration failed (not tried again)
    self._lock = threading.Lock()
    self.made = 0  # buffers made
    self.waits = 0  # times `take` waited for a released buffer's copy
    self.plain = 0  # buffers handed out beyond the pool (not kept)
    self._closed = False

  @property
  def pinned_bytes(self) -> int:
    return len(self._pinned) * self.nbytes

  def take(self) -> np.ndarray:
    """A buffer to fill: a free one, a new one (below max_buffers), else the oldest released once done."""
    after = None
    with self._lock:
      if self._closed:
        raise RuntimeError("BufferPool.take() after close().")
      if self._free:
        buf = self._free.popleft()
      elif len(self._mine) < self.max_buffers:
        buf = np.frombuffer(_anonymous(self.nbytes), np.uint8)  # page-aligned; lives while a view does
        self._mine[buf.ctypes.data] = buf
        self.made += 1
        return buf  # untouched: its first read faults the pages in (in parallel); registered at reuse
      elif not self._released:  # every buffer is taken and none given back: do not wait forever
        self.plain += 1
        return np.empty(self.nbytes, np.uint8)
      else:
        buf, after = self._released.popleft()
        self.waits += 1
    if after is not None:
      wait(after)  # outside the lock: releases may go on meanwhile
    self._lock_pages(buf)
    return buf

  def _lock_pages(self, buf: np.ndarray) -> None:
    addr = buf.ctypes.data
    if self._register is None or addr in self._pinned or addr in self._refused:
      return
    if self.pinned_bytes + self.nbytes > self._limit:
      return
    try:
      self._register(addr, self.nbytes)
      self._pinned.add(addr)
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of lockable memory: copy via staging
      self._refused.add(addr)
      logging.warning("Could not page-lock a %d MiB read buffer (%s); it is copied via staging.", self.nbytes >> 20, e)

  def release(self, buf: np.ndarray, after: Any = None) -> None:
    """Gives `buf` (from `take`) back, to be reused once `after` is done (a jax array, a future; None: now)."""
    with self._lock:
      if self._closed or buf.ctypes.data not in self._mine:
        return  # a plain buffer from a full pool, or a closed pool: dropped
      if after is None:
        self._free.append(buf)
      else:
        self._released.append((buf, after))

  def drain(self) -> None:
    """Waits for every released buffer's copy; they are free again. Buffers still taken are forgotten.

    A buffer still taken (never released: its reader or consumer gave up) may still be written by a
    read; it leaves the pool (its memory goes with its last view) and is unregistered.
    """
    with self._lock:
      released, self._released = list(self._released), collections.deque()
    for buf, after in released:
      with contextlib.suppress(Exception):  # a failed copy's error surfaces where its array is used
        wait(after)
      self.release(buf)
    with self._lock:
      free = {b.ctypes.data for b in self._free}
      lost = [addr for addr in self._mine if addr not in free]
      for addr in lost:
        del self._mine[addr]
        self._unlock(addr)

  def _unlock(self, addr: int) -> None:
    if addr in self._pinned:
      self._pinned.discard(addr)
      try:
        self._unregister(addr)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not unregister a read buffer: %s", e)

  def close(self) -> None:
    """`drain`, then unregisters and drops every buffer. Idempotent; `take` afterwards raises."""
    if self._closed:
      return
    self.drain()
    with self._lock:
      self._closed = True
      for addr in list(self._pinned):
        self._unlock(addr)
      self._free, self._mine = collections.deque(), {}

  def __enter__(self) -> BufferPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def shared_pool(devices: Sequence[Any], *, nbytes: int, max_buffers: int) -> BufferPool | None:
  """This process's pool of `nbytes` buffers page-locked with the devices' client, or None (see module doc).

  One pool per (client, nbytes), kept across calls (`clear()` frees them); its max_buffers grows to the
  largest asked for, within `default_limit_bytes()` over all pools.
  """
  clients = {id(d.client): d.client for d in devices}
  if len(clients) != 1:
    return None
  (client,) = clients.values()
  if any(d.platform == "cpu" for d in devices):  # device_put may alias the buffer: never reuse one there
    why = "CPU devices may share a page-aligned host buffer rather than copy it"
  else:
    why = dma_unsupported(client)
  if why:
    logging.info("Store chunks are read into fresh host buffers: %s.", why)
    return None
  with _lock:
    limit = default_limit_bytes()
    held = sum(p.max_buffers * p.nbytes for k, p in _shared.items() if k != (id(client), nbytes))
    room = (limit - held) // nbytes
    if room < 1:
      logging.info("Store chunks are read into fresh host buffers: the kept read buffers hold their limit.")
      return None
    pool = _shared.get((id(client), nbytes))
    if pool is None:
      pool = _shared[(id(client), nbytes)] = BufferPool(
        nbytes, 1, register=client.dma_map, unregister=client.dma_unmap, limit_bytes=limit
      )
    pool.max_buffers = max(pool.max_buffers, min(max_buffers, room))
    return pool


def clear() -> None:
  """Unregisters and frees every kept read buffer of this process (after their copies are done).

  Nothing needs it at exit (the process's memory goes with it); call it to give the memory back sooner.
  """
  with _lock:
    pools = list(_shared.values())
    _shared.clear()
  for pool in pools:
    pool.close()


def wait(after: Any) -> None:
  """Blocks until `after` (a jax array or pytree of them, or a future) is done."""
  if hasattr(after, "result"):
    after.result()
  else:
    import jax  # pylint: disable=g-import-not-at-top

    jax.block_until_ready(after)
