"""Direct chunk-file reads (chunk_files) equal TensorStore's bit for bit, and damage is refused exactly as TensorStore's.

Every case reads one store twice, through `chunk_files.ChunkFiles` (direct_reads
on, the default for local stores) and through TensorStore (off), and compares.
"""

import concurrent.futures
import logging
import os
import threading

import numpy as np
import pytest
from test_store_integrity import write_legacy_store  # a format-1 store (no checksums)

from trackstar_jax import chunk_files
from trackstar_jax import store as store_lib

DIM, CHUNK = 6, 8


@pytest.fixture(autouse=True, params=["buffers", "bytes"])
def crc_impl(request, monkeypatch):
  """Every test with both checksum paths: `crc32c` over the output in place, and google_crc32c over pieces."""
  if request.param == "buffers" and chunk_files.crc32c_buffers is None:
    pytest.skip("the crc32c package is not installed")
  if request.param == "bytes":
    monkeypatch.setattr(chunk_files, "crc32c_buffers", None)
  return request.param


RANGES = [(0, 37), (0, 16), (8, 24), (3, 30), (9, 11), (32, 37), (35, 37), (30, 33), (5, 5)]


def _store(path, dtype="float32", num_rows=37, *, dim=DIM, chunk_rows=CHUNK, seed=None):
  """A complete local store of random rows (ids 3 r + 1); its URL."""
  meta = store_lib.StoreMeta(num_rows=num_rows, dim=dim, dtype=dtype, chunk_rows=chunk_rows, checkpoint="/ckpt/wd")
  store = store_lib.open_store(f"file://{path}", expected_meta=meta, create=True)
  rng = np.random.default_rng(num_rows if seed is None else seed)
  with store_lib.AsyncWriter(store) as writer:
    for c in range(store.num_chunks):
      a, b = store.chunk_range(c)
      writer.submit(start=a, ids=np.arange(a, b) * 3 + 1, phi=rng.normal(size=(b - a, dim)).astype(np.float32))
  return f"file://{path}"


def _both(url):
  on, off = store_lib.open_store(url), store_lib.open_store(url, direct_reads=False)
  assert on.direct_reads and not off.direct_reads
  return on, off


def _assert_same_chunk(x, y):
  assert x.start == y.start
  for a, b in ((x.ids, y.ids), (x.phi, y.phi), (x.scale, y.scale)):
    if b is None:
      assert a is None
    else:
      assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("piece", [chunk_files.PIECE, 10])  # 10 B: pieces that split rows (12-48 B)
@pytest.mark.parametrize("num_rows", [37, 32])  # an edge chunk with fill rows, and none
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8", "int4"])
def test_direct_reads_equal_tensorstore_bitwise(tmp_path, monkeypatch, dtype, num_rows, piece):
  monkeypatch.setattr(chunk_files, "PIECE", piece)
  on, off = _both(_store(tmp_path / "s.zarr", dtype, num_rows))
  for a, b in RANGES:
    a, b = min(a, num_rows - 3), min(b, num_rows)  # for 32 rows: (29, 32) and (30, 32) end at the last row
    x, y = on.read(a, b), off.read(a, b)
    _assert_same_chunk(x, y)
    assert x.phi.shape == (b - a, on.layout.codes_cols) and x.phi.flags.writeable
  for x, y in zip(on.iter_chunks(rows_per_chunk=10, prefetch=3), off.iter_chunks(rows_per_chunk=10), strict=True):
    _assert_same_chunk(x, y)


def _damage(path, how, chunk):
  f = os.path.join(path, "phi", "c", str(chunk), "0")
  size = os.path.getsize(f)
  if how == "delete":
    os.remove(f)
  elif how == "truncate":
    with open(f, "r+b") as fh:
      fh.truncate(size // 2)
  elif how == "extend":
    with open(f, "ab") as fh:
      fh.write(b"\0\0")
  else:  # flip one bit: of the first data bytes, the last data byte, or the stored checksum
    at = {"flip_first": 5, "flip_last": size - 5, "flip_crc": size - 2}[how]
    with open(f, "r+b") as fh:
      fh.seek(at)
      byte = fh.read(1)
      fh.seek(at)
      fh.write(bytes([byte[0] ^ 0x40]))


_FIRST_WORDS = {"delete": "NOT_FOUND", "flip_first": "DATA_LOSS", "flip_last": "DATA_LOSS", "flip_crc": "DATA_LOSS"}


@pytest.mark.parametrize("chunk", [2, 4])  # a middle chunk, and the edge chunk (rows [32, 37) of 40 stored)
@pytest.mark.parametrize("how", ["delete", "truncate", "flip_first", "flip_last", "flip_crc"])
def test_damaged_chunk_gives_the_same_store_data_error(tmp_path, how, chunk):
  url = _store(tmp_path / "s.zarr")
  _damage(tmp_path / "s.zarr", how, chunk)
  on, off = _both(url)
  a = chunk * CHUNK
  for read in (
    lambda s: s.read(0, 37),
    lambda s: s.read(a + 1, a + 3),  # a range inside the chunk
    lambda s: list(s.iter_chunks(rows_per_chunk=10, prefetch=3)),
  ):
    errors = []
    for s in (on, off):
      with pytest.raises(store_lib.StoreDataError) as e:
        read(s)
      errors.append(e.value)
    assert str(errors[0]) == str(errors[1])
    assert errors[0].bad == errors[1].bad and [b.chunk for b in errors[0].bad] == [chunk], errors[0].bad
    cause = str(errors[0].__context__)  # the direct read's error, which made the store re-check with TensorStore
    assert f"c/{chunk}/0" in cause and cause.startswith(_FIRST_WORDS.get(how, "Chunk file")), cause
  _assert_same_chunk(on.read(0, 16), off.read(0, 16))  # undamaged chunks still read


@pytest.mark.parametrize("checksum", [True, False])
def test_bytes_after_the_chunk_as_tensorstore(tmp_path, checksum):
  """TensorStore 0.1.86 ignores bytes after a chunk's checksum, but refuses them after bare rows: direct reads too."""
  url = _store(tmp_path / "s.zarr") if checksum else _legacy_store(tmp_path / "s.zarr")[0]
  _damage(tmp_path / "s.zarr", "extend", 2)
  on, off = _both(url)
  if checksum:
    _assert_same_chunk(on.read(0, 37), off.read(0, 37))
    return
  errors = []
  for s in (on, off):
    with pytest.raises(store_lib.StoreDataError) as e:
      s.read(0, 37)
    errors.append(e.value)
  assert str(errors[0]) == str(errors[1]) and [b.chunk for b in errors[0].bad] == [2]


def _legacy_store(path):
  """A format-1 store: no crc32c codec, so chunk files are the bare rows."""
  rng = np.random.default_rng(3)
  ids, phi = np.arange(37, dtype=np.int64), rng.normal(size=(37, DIM)).astype(np.float32)
  write_legacy_store(path, ids, phi, store_lib.StoreMeta(num_rows=37, dim=DIM, dtype="float32", chunk_rows=CHUNK))
  (path / "done" / "0000000000-0000000005").write_bytes(b"")
  return f"file://{path}", phi


@pytest.mark.parametrize("how", [None, "delete", "truncate"])
def test_legacy_store_reads_directly_without_checksums(tmp_path, how):
  url, phi = _legacy_store(tmp_path / "old.zarr")
  on, off = _both(url)
  assert on._files.checksum is False and os.path.getsize(tmp_path / "old.zarr" / "phi" / "c" / "0" / "0") == 192
  if how is None:
    for a, b in RANGES:
      _assert_same_chunk(on.read(a, b), off.read(a, b))
    np.testing.assert_array_equal(on.read(0, 37).phi, phi)
    return
  _damage(tmp_path / "old.zarr", how, 1)
  errors = []
  for s in (on, off):
    with pytest.raises(store_lib.StoreDataError) as e:
      s.read(0, 37)
    errors.append(e.value)
  assert str(errors[0]) == str(errors[1]) and [b.chunk for b in errors[0].bad] == [1]


def test_switch_env_memory_and_log(tmp_path, monkeypatch, caplog):
  url = _store(tmp_path / "s.zarr")
  monkeypatch.setattr(store_lib, "_logged_read_paths", set())
  with caplog.at_level(logging.INFO):
    assert store_lib.open_store(url).direct_reads and store_lib.open_store(url).direct_reads
  lines = [r.getMessage() for r in caplog.records if "phi is read" in r.getMessage()]
  assert lines == [f"Encoding store {url}: phi is read directly from its chunk files."], lines  # once per store
  monkeypatch.setenv(store_lib.DIRECT_READS_ENV, "0")
  with caplog.at_level(logging.INFO):
    off = store_lib.open_store(url)
  assert not off.direct_reads
  assert any("through TensorStore (TRACKSTAR_DIRECT_READS=0)" in r.getMessage() for r in caplog.records)
  off.direct_reads = True  # the environment wins
  assert not off.direct_reads
  monkeypatch.delenv(store_lib.DIRECT_READS_ENV)
  off.direct_reads = True
  assert off.direct_reads
  off.direct_reads = False
  assert not off.direct_reads
  meta = store_lib.StoreMeta(num_rows=8, dim=DIM, dtype="float32", chunk_rows=CHUNK)
  assert not store_lib.open_store("memory://direct_reads", expected_meta=meta, create=True).direct_reads


def test_without_google_crc32c_reads_with_tensorstore_and_warns_once(tmp_path, monkeypatch, caplog):
  url = _store(tmp_path / "s.zarr")
  legacy, _ = _legacy_store(tmp_path / "old.zarr")
  monkeypatch.setattr(chunk_files, "google_crc32c", None)
  monkeypatch.setattr(chunk_files, "crc32c_buffers", None)
  monkeypatch.setattr(store_lib, "_warned_no_crc32c", False)
  with caplog.at_level(logging.WARNING):
    stores = [store_lib.open_store(url), store_lib.open_store(url)]
  assert not any(s.direct_reads for s in stores)
  warnings = [r.getMessage() for r in caplog.records if "google-crc32c is not installed" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert store_lib.open_store(legacy).direct_reads  # no checksums to check: still direct
  with pytest.raises(RuntimeError, match="google-crc32c"):
    chunk_files.ChunkFiles(tmp_path, chunk_rows=8, num_rows=8, cols=2, dtype=np.float32)


def test_many_reads_in_flight_from_several_threads(tmp_path):
  meta = store_lib.StoreMeta(num_rows=1000, dim=64, dtype="bfloat16", chunk_rows=16)
  store = store_lib.open_store(f"file://{tmp_path}/s.zarr", expected_meta=meta, create=True)
  phi = np.random.default_rng(0).normal(size=(1000, 64)).astype(np.float32)
  store.write_rows(start=0, ids=np.arange(1000), phi=phi).wait()
  expected = store.phi.read().result()
  pool = concurrent.futures.ThreadPoolExecutor(4)
  files = chunk_files.ChunkFiles(
    f"{tmp_path}/s.zarr/phi", chunk_rows=16, num_rows=1000, cols=64, dtype=expected.dtype, pool=pool
  )
  rng = np.random.default_rng(1)
  ranges = [tuple(sorted(rng.integers(0, 1001, 2))) for _ in range(40)]
  futures = [files.read(a, b) for a, b in ranges]  # all in flight at once, overlapping
  for (a, b), f in zip(ranges, futures, strict=True):
    assert f.result().tobytes() == expected[a:b].tobytes()
  errors = []

  def reader(seed):  # several threads reading through the store (the shared pool) at once
    r = np.random.default_rng(seed)
    try:
      for _ in range(10):
        a, b = sorted(r.integers(0, 1001, 2))
        assert store.read(a, b).phi.tobytes() == expected[a:b].tobytes()
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  pool.shutdown()


def test_bounds_and_timeout(tmp_path):
  _store(tmp_path / "s.zarr")
  gate = threading.Event()
  pool = concurrent.futures.ThreadPoolExecutor(1)
  pool.submit(gate.wait)  # the pool's one thread is busy
  files = chunk_files.ChunkFiles(
    tmp_path / "s.zarr" / "phi", chunk_rows=CHUNK, num_rows=37, cols=DIM, dtype=np.float32, pool=pool
  )
  for a, b in ((-1, 3), (0, 38), (5, 4)):
    with pytest.raises(IndexError, match="outside"):
      files.read(a, b)
  f = files.read(0, 37)
  with pytest.raises(TimeoutError):
    f.result(timeout=0.05)
  assert not f.done()
  gate.set()
  assert f.result(timeout=30).shape == (37, DIM) and f.done()
  pool.shutdown()


def test_zarr3_layout_refuses_what_it_cannot_read():
  base = {
    "shape": [37, 6],
    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 6]}},
    "chunk_key_encoding": {"name": "default"},
    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
  }
  assert chunk_files.zarr3_layout(base) == chunk_files.Layout(8, 37, 6, True)
  assert chunk_files.zarr3_layout(dict(base, codecs=[{"name": "bytes"}])) == chunk_files.Layout(8, 37, 6, False)
  for change, words in (
    ({"codecs": [{"name": "bytes"}, {"name": "gzip"}]}, "codecs"),
    ({"codecs": [{"name": "bytes", "configuration": {"endian": "big"}}]}, "big-endian"),
    ({"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 3]}}}, "whole rows"),
    ({"chunk_key_encoding": {"name": "v2"}}, "chunk key"),
    ({"chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}}}, "chunk key"),
    ({"shape": [37]}, "2-D"),
  ):
    assert words in chunk_files.zarr3_layout(dict(base, **change))


@pytest.mark.parametrize("num_rows", [37, 32])  # an edge chunk padded with fill rows, and none
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8", "int4"])
def test_direct_writes_make_tensorstores_files(tmp_path, dtype, num_rows):
  """Chunk files written directly are TensorStore's, byte for byte (data, fill rows, crc32c), and read back."""
  meta = store_lib.StoreMeta(num_rows=num_rows, dim=DIM, dtype=dtype, chunk_rows=CHUNK)
  phi = np.random.default_rng(num_rows).normal(size=(num_rows, DIM)).astype(np.float32)
  files = {}
  for direct in (True, False):
    root = tmp_path / f"{direct}.zarr"
    store = store_lib.open_store(f"file://{root}", expected_meta=meta, create=True, direct_writes=direct, fsync=direct)
    assert store.direct_writes == direct
    with store_lib.AsyncWriter(store) as writer:
      for c in range(store.num_chunks):
        a, b = store.chunk_range(c)
        writer.submit(start=a, ids=np.arange(a, b), phi=phi[a:b])
    names = sorted(p.relative_to(root / "phi") for p in (root / "phi" / "c").rglob("*") if p.is_file())
    files[direct] = {str(n): (root / "phi" / n).read_bytes() for n in names}
    assert store.is_complete()
  assert files[True] == files[False] and len(files[True]) == -(-num_rows // CHUNK)
  on, off = _both(f"file://{tmp_path}/True.zarr")
  _assert_same_chunk(on.read(0, num_rows), off.read(0, num_rows))  # TensorStore checks every crc32c


def test_direct_write_leftovers_and_bad_writes(tmp_path, monkeypatch):
  """A killed write's temporary file is no chunk; misaligned writes are refused; the env var turns writes off."""
  url = _store(tmp_path / "s.zarr")
  store = store_lib.open_store(url)
  (tmp_path / "s.zarr" / "phi" / "c" / "2" / "0.dead.tmp").write_bytes(b"partial")
  (tmp_path / "s.zarr" / "phi" / "c" / "2" / "0").unlink()
  assert 2 not in store.stored_chunks() and 2 not in store.completed_chunks() and {0, 1, 3, 4} <= store.stored_chunks()
  with pytest.raises(ValueError, match="whole chunks"):
    store._files.write(3, np.zeros((8, DIM), np.float32))  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="columns"):
    store._files.write(0, np.zeros((8, DIM + 1), np.float32))  # pylint: disable=protected-access
  monkeypatch.setenv(store_lib.DIRECT_WRITES_ENV, "0")
  assert not store_lib.open_store(url).direct_writes and store_lib.open_store(url).direct_reads
