"""Reused, page-locked read buffers (host_buffers): reuse only after the copy, reads into them, the feed's hand-back.

The CPU client has no `dma_map`, so these tests page-lock with a recording fake; the H200 figures
(47.5 GB/s from a dma_map-ped buffer vs 8.2 from pageable memory) are in BENCHMARKS.md, Streaming.
"""

import concurrent.futures
import threading
import time

import jax
import numpy as np
import pytest
from test_chunk_files import _assert_same_chunk, _store

from trackstar_jax import host_buffers, retrieval
from trackstar_jax import store as store_lib

NBYTES = 3 * 4096 + 100  # not a whole number of pages


class FakeLock:
  """Records dma_map / dma_unmap; refuses registrations after `fail_after`."""

  def __init__(self, fail_after=None):
    self.mapped, self.unmapped, self.fail_after = [], [], fail_after

  def register(self, addr, nbytes):
    if self.fail_after is not None and len(self.mapped) >= self.fail_after:
      raise RuntimeError("RESOURCE_EXHAUSTED: no more lockable memory")
    self.mapped.append((addr, nbytes))

  def unregister(self, addr):
    self.unmapped.append(addr)


def _pool(max_buffers=2, lock=None, **kw):
  lock = lock or FakeLock()
  return host_buffers.BufferPool(NBYTES, max_buffers, register=lock.register, unregister=lock.unregister, **kw), lock


def test_buffers_are_page_aligned_reused_after_release_and_registered_at_reuse():
  pool, lock = _pool()
  a, b = pool.take(), pool.take()
  assert a.shape == b.shape == (NBYTES,) and a.dtype == np.uint8
  assert a.ctypes.data % host_buffers._PAGE == 0 and b.ctypes.data % host_buffers._PAGE == 0
  assert lock.mapped == [] and pool.made == 2  # new buffers: their first read faults the pages in
  pool.release(a)  # nothing to wait for: free at once
  assert pool.take() is a and lock.mapped == [(a.ctypes.data, NBYTES)] and pool.pinned_bytes == NBYTES
  pool.release(a)
  assert pool.take() is a and len(lock.mapped) == 1  # registered once
  pool.release(a)
  pool.release(b)
  pool.take(), pool.take()
  pool.close()
  assert sorted(lock.unmapped) == sorted(x for x, _ in lock.mapped) and len(lock.unmapped) == 2
  with pytest.raises(RuntimeError, match="after close"):
    pool.take()
  pool.release(b)  # after close: ignored
  pool.close()  # idempotent
  assert len(lock.unmapped) == 2


def test_take_waits_for_the_oldest_released_copy():
  pool, _ = _pool(max_buffers=1)
  buf = pool.take()
  copy = concurrent.futures.Future()  # stands for a device array: done once its transfer is
  pool.release(buf, after=copy)
  threading.Timer(0.2, copy.set_result, (None,)).start()
  t = time.perf_counter()
  again = pool.take()
  assert again is buf and copy.done() and time.perf_counter() - t >= 0.15 and pool.waits == 1
  pool.close()


def test_waits_on_jax_arrays():
  pool, _ = _pool(max_buffers=1)
  buf = pool.take()
  pool.release(buf, after=jax.numpy.ones(3) * 2)
  assert pool.take() is buf and pool.waits == 1


def test_a_full_pool_with_nothing_released_hands_out_a_plain_buffer_instead_of_hanging():
  pool, lock = _pool(max_buffers=1)
  kept = pool.take()
  extra = pool.take()  # nothing to wait for: a plain, unkept buffer
  assert extra is not kept and extra.shape == (NBYTES,) and pool.plain == 1 and pool.made == 1
  pool.release(extra)  # dropped, not pooled
  pool.release(kept)
  assert pool.take() is kept


def _cycle(pool, n):
  """Takes n buffers, gives them back, takes them again (the second take registers them)."""
  bufs = [pool.take() for _ in range(n)]
  for b in bufs:
    pool.release(b)
  return [pool.take() for _ in range(n)]


def test_page_locking_stops_at_the_limit_and_survives_a_refusal(caplog):
  pool, lock = _pool(max_buffers=3, limit_bytes=NBYTES + 1)
  bufs = _cycle(pool, 3)
  assert len(lock.mapped) == 1 and pool.pinned_bytes == NBYTES and pool.made == 3
  pool2, lock2 = _pool(max_buffers=2, lock=FakeLock(fail_after=1))
  with caplog.at_level("WARNING"):
    bufs2 = _cycle(pool2, 2)
    for b in bufs2:
      pool2.release(b)
    _cycle(pool2, 2)  # a refused buffer is not tried again
  assert len(lock2.mapped) == 1 and caplog.text.count("Could not page-lock") == 1
  assert all(b.shape == (NBYTES,) for b in bufs + bufs2)
  pool.close()
  pool2.close()
  assert len(lock.unmapped) == 1 and len(lock2.unmapped) == 1


def test_drain_waits_for_copies_and_forgets_buffers_never_given_back():
  pool, lock = _pool(max_buffers=3)
  a, b, c = _cycle(pool, 3)  # all three registered
  copy = concurrent.futures.Future()
  pool.release(a, after=copy)
  pool.release(b)
  threading.Timer(0.1, copy.set_result, (None,)).start()
  pool.drain()  # c was never given back (its reader gave up): it leaves the pool
  assert copy.done() and len(lock.unmapped) == 1 and lock.unmapped[0] == c.ctypes.data
  again = {pool.take().ctypes.data for _ in range(2)}
  assert again == {a.ctypes.data, b.ctypes.data}
  assert pool.take().ctypes.data not in again and pool.made == 4  # a new third buffer


def test_no_pool_for_cpu_devices():
  """device_put on CPU may alias a page-aligned buffer: reusing it would change an array already made."""
  assert host_buffers.shared_pool(jax.devices("cpu"), nbytes=NBYTES, max_buffers=2) is None
  assert host_buffers.dma_unsupported(object()) is not None  # no dma_map at all


class FakeDevice:
  platform = "gpu"

  def __init__(self, client):
    self.client = client


def test_shared_pools_are_kept_per_size_and_bounded(monkeypatch):
  lock = FakeLock()
  client = type("Client", (), {"dma_map": staticmethod(lock.register), "dma_unmap": staticmethod(lock.unregister)})()
  dev = FakeDevice(client)
  monkeypatch.setattr(host_buffers, "default_limit_bytes", lambda: 10 * NBYTES)
  monkeypatch.setattr(host_buffers, "_shared", {})
  pool = host_buffers.shared_pool([dev], nbytes=NBYTES, max_buffers=2)
  assert host_buffers.shared_pool([dev], nbytes=NBYTES, max_buffers=4) is pool and pool.max_buffers == 4
  other = host_buffers.shared_pool([dev], nbytes=2 * NBYTES, max_buffers=9)  # 10 - 4 buffers of room: 3 of these
  assert other is not pool and other.max_buffers == 3
  assert host_buffers.shared_pool([dev], nbytes=7 * NBYTES, max_buffers=1) is None  # no room left
  bufs = {b.ctypes.data for b in _cycle(pool, 2)}
  host_buffers.clear()
  assert bufs <= set(lock.unmapped) and host_buffers._shared == {}  # (and the one-page dma_map probe)
  with pytest.raises(RuntimeError, match="after close"):
    pool.take()


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="nbytes > 0"):
    host_buffers.BufferPool(0, 2)
  with pytest.raises(ValueError, match="max_buffers > 0"):
    host_buffers.BufferPool(10, 0)


def test_chunk_files_read_into_a_given_array(tmp_path):
  store = store_lib.open_store(_store(tmp_path / "s.zarr", "bfloat16"))
  files = store._files
  want = store.read(3, 30).phi
  out = np.full((27, files.cols), 7, files.dtype)
  got = files.read(3, 30, out=out).result()
  assert got is out and out.tobytes() == want.tobytes()
  for bad in (np.empty((26, files.cols), files.dtype), np.empty((27, files.cols), np.float32),
              np.empty((files.cols, 27), files.dtype).T):  # fmt: skip
    with pytest.raises(ValueError, match="C-contiguous"):
      files.read(3, 30, out=bad)


@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
def test_iter_chunks_reads_phi_into_pool_buffers(tmp_path, dtype):
  url = _store(tmp_path / "s.zarr", dtype)
  store, plain = store_lib.open_store(url), store_lib.open_store(url)
  pool, _ = _pool(max_buffers=3)
  assert pool.nbytes >= store.phi_bytes(10)
  for x, y in zip(
    store.iter_chunks(rows_per_chunk=10, prefetch=2, buffers=pool), plain.iter_chunks(rows_per_chunk=10), strict=True
  ):
    assert x.buffer is not None and np.shares_memory(x.phi, x.buffer)
    _assert_same_chunk(x._replace(buffer=None), y)
    pool.release(x.buffer)  # done with phi: the next reads may reuse it
  assert pool.made == 3 and pool.plain == 0  # 2 reads ahead + the chunk yielded; the 4th read reuses the first
  pool.close()
  tight, _ = _pool(max_buffers=2)  # fewer than the reads in flight: plain buffers rather than a hang
  for x, y in zip(
    store.iter_chunks(rows_per_chunk=10, prefetch=2, buffers=tight), plain.iter_chunks(rows_per_chunk=10), strict=True
  ):
    _assert_same_chunk(x._replace(buffer=None), y)
    tight.release(x.buffer)
  assert tight.made == 2 and tight.plain >= 1


def test_iter_chunks_skips_buffers_too_small_and_tensorstore_reads(tmp_path):
  url = _store(tmp_path / "s.zarr", "float32")
  pool, _ = _pool()
  small = host_buffers.BufferPool(8, 2)
  for s, p in ((store_lib.open_store(url, direct_reads=False), pool), (store_lib.open_store(url), small)):
    chunks = list(s.iter_chunks(rows_per_chunk=10, buffers=p))
    assert all(ch.buffer is None for ch in chunks) and p.made == 0


def test_device_chunks_give_each_buffer_back_after_its_copy(tmp_path):
  url = _store(tmp_path / "s.zarr", "bfloat16")
  store = store_lib.open_store(url)

  class Recording(host_buffers.BufferPool):
    def __init__(self):
      super().__init__(store.phi_bytes(16), 8)
      self.given = []

    def release(self, buf, after=None):
      self.given.append((buf, after))

  pool = Recording()
  q = np.eye(1, store.dim, dtype=np.float32)
  topk = retrieval.StreamingTopK(q, k=2, store_dtype="bfloat16")
  chunks = store.iter_chunks(rows_per_chunk=16, buffers=pool)
  dev = list(retrieval.device_chunks(topk, chunks, pad_to=16, buffers=pool))
  assert len(pool.given) == len(dev) == 3
  for (buf, after), ch in zip(pool.given, dev, strict=True):
    assert after is ch.phi and buf.shape == (pool.nbytes,)


@pytest.mark.parametrize("reads, ahead", [(1, 0), (4, 2)])  # (1, 0): 2 buffers for 13 chunks, reused
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_retrieve_with_and_without_pinned_reads_agree(tmp_path, caplog, dtype, reads, ahead):
  """Bitwise the same results. On CPU there is no pool (the reference behaviour); on a GPU this runs the real path."""
  store = store_lib.open_store(_store(tmp_path / "s.zarr", dtype, num_rows=200))
  q = np.random.default_rng(0).normal(size=(3, store.dim)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  with caplog.at_level("INFO"):
    runs = [
      retrieval.retrieve(
        store, q, k=4, rows_per_chunk=16, pinned_reads=on, cache_norms=False, reads_in_flight=reads,
        transfers_ahead=ahead,
      )
      for on in (True, False)
    ]  # fmt: skip
  pooled = "Read buffers (kept):" in caplog.text
  assert pooled == (jax.default_backend() != "cpu"), caplog.text[-2000:]
  for name, a in runs[0].to_arrays().items():
    np.testing.assert_array_equal(a, runs[1].to_arrays()[name], err_msg=name)
