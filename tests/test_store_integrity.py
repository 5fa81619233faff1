"""Store integrity: deleted, truncated or corrupted chunks are refused by name, found by verify, and repaired."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from trackstar_jax import retrieval
from trackstar_jax import store as store_lib
from trackstar_jax.jobs import verify_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = store_lib.StoreMeta(num_rows=37, dim=6, dtype="float32", chunk_rows=8, checkpoint="/ckpt/wd", step=3)


def _data():
  rng = np.random.default_rng(0)
  return np.arange(37, dtype=np.int64) * 5 + 2, rng.normal(size=(37, 6)).astype(np.float32)


def _write(store, chunks=None):
  ids, phi = _data()
  with store_lib.AsyncWriter(store) as writer:
    for c in range(store.num_chunks) if chunks is None else chunks:
      a, b = store.chunk_range(c)
      writer.submit(start=a, ids=ids[a:b], phi=phi[a:b])


def _complete_store(path):
  store = store_lib.open_store(f"file://{path}", expected_meta=META, create=True)
  _write(store)
  assert store.is_complete()
  return f"file://{path}"


def _files(path):
  """{relative path: bytes} of the store's data and metadata (markers excluded: their split may differ)."""
  out = {}
  for root, _, names in os.walk(path):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), path)
      if not rel.startswith("done"):
        with open(os.path.join(root, n), "rb") as f:
          out[rel] = f.read()
  return out


def _damage(path, how, chunk=2):
  f = os.path.join(path, "phi", "c", str(chunk), "0")
  assert os.path.exists(f)
  if how == "delete":
    os.remove(f)
  elif how == "truncate":
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  else:  # flip one byte of the data (not the checksum)
    with open(f, "r+b") as fh:
      fh.seek(5)
      byte = fh.read(1)
      fh.seek(5)
      fh.write(bytes([byte[0] ^ 0x40]))


def _assert_names_chunk_and_repair(msg, url):
  assert url in msg and "chunk 2 " in msg and "rows [16, 24)" in msg, msg
  assert f"python -m launch.verify_store --store={url} --repair" in msg and "python -m launch.encode" in msg, msg
  assert "--workdir=/ckpt/wd" in msg, msg


@pytest.mark.parametrize("how", ["delete", "truncate", "corrupt"])
def test_damaged_chunk_is_refused_found_and_repaired(tmp_path, how):
  clean = _complete_store(tmp_path / "clean.zarr")
  url = _complete_store(tmp_path / "s.zarr")
  _damage(tmp_path / "s.zarr", how)
  store = store_lib.open_store(url, expected_meta=META)
  # Reading refuses, naming the store, the chunk, its rows and the repair.
  for read in (
    lambda: store.read(0, 37),
    lambda: list(store.iter_chunks(rows_per_chunk=10)),
    lambda: retrieval.retrieve(store, np.ones((2, 6), np.float32), k=3, rows_per_chunk=16),
  ):
    with pytest.raises(store_lib.StoreDataError) as e:
      read()
    _assert_names_chunk_and_repair(str(e.value), url)
    assert [b.chunk for b in e.value.bad] == [2]
  np.testing.assert_array_equal(store.read(0, 16).phi, _data()[1][:16])  # undamaged rows still read
  if how == "delete":  # a lost chunk is not complete, and encode's resume redoes it even without repair
    assert not store.is_complete() and store.pending_chunks() == [2]
  # verify finds exactly that chunk; repair unmarks it; re-writing it (encode's resume) restores the store.
  bad = store.verify()
  assert [(b.chunk, b.start, b.stop) for b in bad] == [(2, 16, 24)], bad
  assert verify_store.run(url=url, repair=True) == bad
  assert store.pending_chunks() == [2] and not store.is_complete()
  assert store.marked_chunks() == {0, 1, 3, 4}
  _write(store, store.pending_chunks())
  assert store.is_complete() and store.verify() == []
  assert _files(tmp_path / "s.zarr") == _files(tmp_path / "clean.zarr")
  assert store_lib.open_store(clean).read(0, 37).phi.tobytes() == store.read(0, 37).phi.tobytes()


def test_unmark_splits_multi_chunk_markers():
  store = store_lib.open_store("memory://unmark", expected_meta=META, create=True)
  ids, phi = _data()
  store.write_rows(start=0, ids=ids[:32], phi=phi[:32]).wait()  # one marker for chunks [0, 4)
  store.write_rows(start=32, ids=ids[32:], phi=phi[32:]).wait()
  assert store.unmark([1, 2]) == 2
  assert store.marked_chunks() == {0, 3, 4} and store.pending_chunks() == [1, 2]
  assert store.unmark([1]) == 0  # already unmarked


def test_all_zero_chunk_is_stored():
  """A chunk equal to the fill value still gets a data object, so that it is not taken for a lost one."""
  store = store_lib.open_store("memory://zeros", expected_meta=META, create=True)
  store.write_rows(start=0, ids=np.full(8, -1), phi=np.zeros((8, 6), np.float32)).wait()
  assert store.completed_chunks() == {0}
  np.testing.assert_array_equal(store.read(0, 8).phi, 0)


def test_verify_logs_progress_with_rate_and_eta(tmp_path, caplog):
  url = _complete_store(tmp_path / "s.zarr")
  with caplog.at_level(logging.INFO):
    assert store_lib.open_store(url).verify(log_every_s=0) == []
  lines = [r.getMessage() for r in caplog.records if "verify" in r.getMessage()]
  assert any("chunk 5/5" in m and "chunk/s" in m and "ETA" in m for m in lines), lines


def write_legacy_store(path, ids, phi, meta):
  """A format-1 store of these rows (no crc32c codec: chunk files are the bare rows), no chunk marked yet."""
  for name, arr, chunk, dtype, fill in (
    ("phi", phi, [meta.chunk_rows, meta.dim], "float32", 0),
    ("ids", ids, [meta.chunk_rows], "int64", -1),
  ):
    t = ts.open(
      {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": f"{path}/{name}/"},
        "metadata": {
          "shape": list(arr.shape),
          "data_type": dtype,
          "fill_value": fill,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        },
      },
      create=True,
    ).result()
    t.write(arr).result()
  (path / "meta.json").write_text(json.dumps(dict(meta.to_json(), format="trackstar_jax.encodings/1")))
  os.makedirs(path / "done")


def test_legacy_store_stays_readable(tmp_path):
  """A format-1 store (no checksums) opens and reads; a lost chunk is still refused."""
  path = tmp_path / "old.zarr"
  ids, phi = _data()
  write_legacy_store(path, ids, phi, META)
  (path / "done" / "0000000000-0000000005").write_bytes(b"")
  store = store_lib.open_store(f"file://{path}", expected_meta=META)
  assert not store.checksummed and store.is_complete()
  np.testing.assert_array_equal(store.read(0, 37).phi, phi)
  os.remove(path / "phi" / "c" / "1" / "0")
  with pytest.raises(store_lib.StoreDataError, match=r"chunk 1 \(rows \[8, 16\)\)"):
    store.read(0, 37)


def test_launcher_exit_codes(tmp_path):
  url = _complete_store(tmp_path / "s.zarr")
  _damage(tmp_path / "s.zarr", "corrupt")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "launch.verify_store", f"--store={url}"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "chunk 2" in r.stderr and "--repair" in r.stderr, r.stderr[-3000:]
  r = subprocess.run(cmd + ["--repair"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "Unmarked 1 damaged chunks" in r.stderr, r.stderr[-3000:]
  assert store_lib.open_store(url).pending_chunks() == [2]
