"""Chunk files mapped read-only and page-locked (mapped_chunks): the same bytes as buffered reads, kept, safe.

On CPU there is no CUDA driver, so these tests page-lock with a recording fake (`FakeLock`);
the last test runs the real `cuMemHostRegister(READ_ONLY)` on a GPU. The H200 figures (a 256 MiB
window to the device at 54.3 GB/s vs 48.2 from a dma_map-ped buffer) are in BENCHMARKS.md, Streaming.
"""

import gc
import os
import threading

import jax
import numpy as np
import pytest
from test_chunk_files import _assert_same_chunk, _damage
from test_chunk_files import _store as chunk_files_store
from test_host_buffers import FakeLock

from trackstar_jax import chunk_files, mapped_chunks, retrieval
from trackstar_jax import store as store_lib

DIM, CHUNK = 64, 32  # bfloat16: 128 B rows, 4096 B (one page) per chunk file

pytestmark = pytest.mark.skipif(chunk_files.crc32c_buffers is None, reason="mapped reads check with `crc32c`")


def _store(path, dtype="bfloat16", num_rows=200, chunk_rows=CHUNK, seed=0):
  return chunk_files_store(path, dtype, num_rows, dim=DIM, chunk_rows=chunk_rows, seed=seed)


def _windows(limit_bytes=1 << 30, lock=None):
  lock = lock or FakeLock()
  return mapped_chunks.MappedWindows(register=lock.register, unregister=lock.unregister, limit_bytes=limit_bytes), lock


def _scan(store, windows, rows=64):
  """Every chunk through `windows`, released at once; the chunks (phi copied out)."""
  out = []
  for ch in store.iter_chunks(rows_per_chunk=rows, prefetch=2, windows=windows):
    assert ch.lease is not None and ch.buffer is None and not ch.phi.flags.writeable
    out.append(ch._replace(phi=np.array(ch.phi), lease=None))
    ch.lease.release()
  return out


@pytest.mark.parametrize("dtype, chunk_rows", [("bfloat16", 32), ("float32", 32), ("int8", 64), ("int4", 128)])
def test_windows_give_the_buffered_bytes_and_are_kept_across_scans(tmp_path, dtype, chunk_rows):
  url = _store(tmp_path / "s.zarr", dtype, chunk_rows=chunk_rows)  # 200 rows: an edge chunk with fill rows
  store, plain = store_lib.open_store(url), store_lib.open_store(url)
  windows, lock = _windows()
  rows = 2 * chunk_rows
  first = _scan(store, windows, rows)
  for x, y in zip(first, plain.iter_chunks(rows_per_chunk=rows), strict=True):
    _assert_same_chunk(x, y)
  n = len(first)
  assert windows.mapped == n and windows.hits == 0 and len(lock.mapped) == n
  assert windows.pinned_bytes == sum(nb for _, nb in lock.mapped) == store.num_chunks * store._files.data_bytes
  second = _scan(store, windows, rows)  # kept: no registration, no mapping
  assert windows.hits == n and len(lock.mapped) == n and lock.unmapped == []
  for x, y in zip(second, first, strict=True):
    _assert_same_chunk(x, y)
  windows.clear()
  assert sorted(lock.unmapped) == sorted(a for a, _ in lock.mapped) and windows.pinned_bytes == 0


def test_a_rewritten_chunk_is_mapped_anew(tmp_path):
  url = _store(tmp_path / "s.zarr")
  store = store_lib.open_store(url)
  windows, lock = _windows()
  before = _scan(store, windows)
  new = np.full((CHUNK, DIM), 0.5, np.float32)
  store.write_rows(start=CHUNK, ids=np.arange(CHUNK, 2 * CHUNK) * 3 + 1, phi=new).wait()  # file replaced by rename
  after = _scan(store, windows)
  assert windows.evicted == 1 and len(lock.unmapped) == 1 and windows.mapped == len(before) + 1
  np.testing.assert_array_equal(after[0].phi[CHUNK:].astype(np.float32), new)
  np.testing.assert_array_equal(after[0].phi[:CHUNK], before[0].phi[:CHUNK])
  for x, y in zip(after[1:], before[1:], strict=True):
    _assert_same_chunk(x, y)


@pytest.mark.parametrize("when", ["mapped before", "first read"])
@pytest.mark.parametrize("how", ["flip_first", "flip_last", "flip_crc", "delete", "truncate"])
def test_damage_raises_the_buffered_error_and_drops_the_window(tmp_path, how, when):
  url = _store(tmp_path / "s.zarr")
  path = url.removeprefix("file://")
  windows, lock = _windows()
  if when == "mapped before":
    _scan(store_lib.open_store(url), windows)
  _damage(path, how, 3)  # chunk 3: rows [96, 128), window [64, 128)
  errors = []
  for reader in (windows, None):
    with pytest.raises(store_lib.StoreDataError) as e:
      for ch in store_lib.open_store(url).iter_chunks(rows_per_chunk=64, windows=reader):
        if ch.lease is not None:
          ch.lease.release()
    errors.append(str(e.value))
  assert errors[0] == errors[1]  # mapped or buffered: the store's integrity report, the same words
  key = (os.path.abspath(os.path.join(path, "phi")), 2, 4, store_lib.open_store(url)._files.data_bytes)
  assert key not in windows._windows  # dropped (or never kept): not read from again
  assert all(w.leases == 0 for w in windows._windows.values())  # the queued reads gave theirs back


@pytest.mark.parametrize("how", ["flip_first", "flip_crc"])
def test_deferred_checks_copy_first_and_no_damaged_rows_reach_the_step(tmp_path, monkeypatch, how):
  url = _store(tmp_path / "s.zarr")
  path = url.removeprefix("file://")
  store, plain = store_lib.open_store(url), store_lib.open_store(url)
  windows, _ = _windows()
  got = list(store.iter_chunks(rows_per_chunk=64, windows=windows, defer_checks=True))
  assert all(ch.check is not None and ch.lease is not None for ch in got)  # phi before its checks: for the copy
  for ch, want in zip(got, plain.iter_chunks(rows_per_chunk=64), strict=True):
    ch.check()
    _assert_same_chunk(ch._replace(lease=None, check=None), want)
    ch.lease.release()
  _damage(path, how, 3)  # chunk 3: rows [96, 128), in the second chunk of 64 rows
  errors, fed = [], []
  topk = retrieval.StreamingTopK(
    np.ones((2, DIM), np.float32), k=2, mesh=retrieval.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  )
  for reader, defer in ((windows, True), (None, False)):
    chunks = store_lib.open_store(url).iter_chunks(rows_per_chunk=64, windows=reader, defer_checks=defer)
    with pytest.raises(store_lib.StoreDataError) as e:
      for dev in retrieval.device_chunks(topk, chunks, pad_to=64):
        fed.append((reader is not None, dev.start))
    errors.append(str(e.value))
  assert errors[0] == errors[1]  # the store's integrity report, as a buffered read gives it
  assert fed == [(True, 0), (False, 0)]  # the damaged chunk's copy was made, but never yielded to a step
  assert all(w.leases == 0 for w in windows._windows.values())
  key = (os.path.abspath(os.path.join(path, "phi")), 2, 4, store._files.data_bytes)
  assert key not in windows._windows  # dropped once its check failed (its lease was given back at the copy)
  if jax.default_backend() == "cpu":  # and retrieve reports it the same way (the fake windows stand in for CUDA)
    monkeypatch.setattr(mapped_chunks, "shared_windows", lambda devices: windows)
  with pytest.raises(store_lib.StoreDataError) as e:
    retrieval.retrieve(store_lib.open_store(url), np.ones((1, DIM), np.float32) / 8, k=2, rows_per_chunk=64)
  assert str(e.value) == errors[1]


def test_a_window_whose_check_fails_after_its_lease_came_back_is_dropped(tmp_path, monkeypatch):
  url = _store(tmp_path / "s.zarr")
  _damage(url.removeprefix("file://"), "flip_first", 3)
  store = store_lib.open_store(url)
  windows, lock = _windows()
  gate, check = threading.Event(), mapped_chunks._check_crc
  monkeypatch.setattr(mapped_chunks, "_check_crc", lambda *a: gate.wait(10) and check(*a))
  got = windows.read(store._files, 64, 128)
  got.release(after=None)  # as device_chunks does once the copy is done, before the checks report
  assert len(windows._windows) == 1 and lock.unmapped == []
  gate.set()
  with pytest.raises(ValueError, match="fails its crc32c"):
    got.result()
  assert windows._windows == {} and len(lock.unmapped) == 1  # not read from again


def test_the_limit_keeps_a_stores_first_windows_and_evicts_other_arrays_oldest_first(tmp_path):
  store = store_lib.open_store(_store(tmp_path / "s.zarr"))
  other = store_lib.open_store(_store(tmp_path / "o.zarr", seed=1))
  files, window = store._files, 2 * store._files.data_bytes
  windows, lock = _windows(limit_bytes=2 * window)
  for _ in range(2):  # a store larger than the limit: its first two windows stay, the rest reads buffered
    got = [windows.read(files, lo, lo + 64) for lo in (0, 64, 128)]
    assert got[2] is None
    for lo, g in zip((0, 64), got[:2], strict=True):
      assert g.result().tobytes() == store.read(lo, lo + 64).phi.tobytes()
      g.release()
  assert windows.mapped == 2 and windows.hits == 2 and windows.declined == 2 and lock.unmapped == []
  a = windows.read(files, 0, 64)  # held
  b = windows.read(other._files, 0, 64)  # another array: evicts the idle window [64, 128), not the held one
  assert b is not None and lock.unmapped == [lock.mapped[1][0]]
  assert b.result().tobytes() == other.read(0, 64).phi.tobytes()
  assert windows.read(other._files, 64, 128) is None  # the rest is held (a) or this array's (b): no room
  a.release()
  b.release()
  c = windows.read(files, 0, 128)  # another chunking of the same rows: evicts what it overlaps, and the other array's
  assert c is not None and lock.unmapped == [lock.mapped[1][0], lock.mapped[0][0], lock.mapped[2][0]]
  assert c.result().tobytes() == store.read(0, 128).phi.tobytes()
  c.release()
  assert windows.read(files, 0, 200) is None  # larger than the limit: never mapped


def test_warm_maps_a_scans_windows_ahead_up_to_the_limit(tmp_path):
  store = store_lib.open_store(_store(tmp_path / "s.zarr"))
  windows, lock = _windows(limit_bytes=3 * 2 * store._files.data_bytes)
  assert store.map_ahead(windows, rows_per_chunk=64).result() == 3  # of 4 windows: the limit
  assert windows.hits == 0 and len(lock.mapped) == 3
  got = list(store.iter_chunks(rows_per_chunk=64, windows=windows))
  assert [ch.lease is not None for ch in got] == [True, True, True, False]  # the last, beyond the limit: buffered
  for ch in got[:3]:
    ch.lease.release()
  assert windows.hits == 3 and windows.mapped == 3
  assert store.map_ahead(windows, rows_per_chunk=64, process_index=1, process_count=2).result() == 0  # all kept


def test_reads_that_cannot_be_mapped_are_declined(tmp_path):
  store = store_lib.open_store(_store(tmp_path / "s.zarr"))
  windows, lock = _windows()
  assert windows.read(store._files, 16, 64) is None  # not a chunk boundary
  odd = store_lib.open_store(_store(tmp_path / "odd.zarr", chunk_rows=24))  # 3072 B per chunk file
  assert windows.read(odd._files, 0, 48) is None
  os.remove(store._files.path(1))
  assert windows.read(store._files, 0, 64) is None  # the buffered reader raises NOT_FOUND for it
  assert windows.read(store._files, 64, 64) is None  # no rows
  with pytest.raises(IndexError):
    windows.read(store._files, 0, 201)
  assert windows.declined == 4 and lock.mapped == []


def test_a_refused_registration_turns_mapped_reads_off(tmp_path, caplog):
  store = store_lib.open_store(_store(tmp_path / "s.zarr"))
  windows, lock = _windows(lock=FakeLock(fail_after=1))
  windows.read(store._files, 0, 64).release()
  with caplog.at_level("WARNING"):
    assert windows.read(store._files, 64, 128) is None
  assert "no more lockable memory" in caplog.text and windows.broken
  assert windows.read(store._files, 0, 64) is None  # off from now on, kept windows too


def _mapped(base):
  with open("/proc/self/maps") as f:
    return any(int(line.split("-")[0], 16) == base for line in f)


def test_a_mapping_lives_while_a_view_does(tmp_path):
  p = tmp_path / "f"
  p.write_bytes(bytes(range(256)) * 32)  # two pages
  fds = [os.open(p, os.O_RDONLY), os.open(p, os.O_RDONLY)]
  m = mapped_chunks.Mapping(fds, 4096)
  for fd in fds:
    os.close(fd)
  view = np.asarray(m)[4096:4100]
  base = m.base
  assert not view.flags.writeable and list(view) == [0, 1, 2, 3] and _mapped(base)
  del m
  gc.collect()
  assert _mapped(base) and list(view) == [0, 1, 2, 3]
  del view
  gc.collect()
  assert not _mapped(base)
  with pytest.raises(ValueError, match="multiple of"):
    mapped_chunks.Mapping([0], 100)


@pytest.mark.parametrize("dtype, chunk_rows", [("bfloat16", 32), ("int8", 64)])
def test_retrieve_with_mapped_windows_agrees_with_buffered_reads(tmp_path, monkeypatch, caplog, dtype, chunk_rows):
  store = store_lib.open_store(_store(tmp_path / "s.zarr", dtype, chunk_rows=chunk_rows))
  windows, _ = _windows()
  if jax.default_backend() == "cpu":  # no CUDA driver: the fake stands in (the GPU run uses the real one)
    monkeypatch.setattr(mapped_chunks, "shared_windows", lambda devices: windows)
  q = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  with caplog.at_level("INFO"):
    runs = [
      retrieval.retrieve(store, q, k=4, rows_per_chunk=2 * chunk_rows, mapped_reads=on, cache_norms=False)
      for on in (True, True, False)
    ]
  assert "Mapped store windows" in caplog.text
  if jax.default_backend() == "cpu":
    n = -(-store.num_rows // (2 * chunk_rows))
    assert windows.mapped == n and windows.hits >= n  # mapped once (ahead of the first scan's reads), then kept
  for run in runs[:2]:
    for name, a in run.to_arrays().items():
      np.testing.assert_array_equal(a, runs[2].to_arrays()[name], err_msg=name)


def test_no_windows_off_cuda():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU host: see the next test")
  assert mapped_chunks.shared_windows(jax.devices("cpu")) is None


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (the driver's cuMemHostRegister)")
def test_cuda_page_locks_a_read_only_mapping_and_device_put_copies_it(tmp_path):
  windows = mapped_chunks.shared_windows(jax.local_devices())
  assert windows is not None
  store = store_lib.open_store(_store(tmp_path / "s.zarr", num_rows=256))
  got = windows.read(store._files, 0, 256)
  x = jax.device_put(got.result(), jax.local_devices()[0])
  got.release(after=x)
  assert np.asarray(x).tobytes() == store.read(0, 256).phi.tobytes()
  windows.clear()
