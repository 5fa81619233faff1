"""Tests for trackstar_jax.store: round trips, meta checks, progress, resume after SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

from trackstar_jax import store as store_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meta(**kw):
  base = dict(
    num_rows=37,
    dim=6,
    chunk_rows=8,
    checkpoint="/ckpt",
    step=10,
    projection_seed=1,
    blocks=("attn_0", "mlp_0"),
    correction="adam",
    corpus_fingerprint="abc",
  )
  base.update(kw)
  return store_lib.StoreMeta(**base)


def _data(meta, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.permutation(10 * meta.num_rows)[: meta.num_rows].astype(np.int64)
  return ids, rng.normal(size=(meta.num_rows, meta.dim)).astype(np.float32)


def _write_all(store, ids, phi, chunks=None):
  with store_lib.AsyncWriter(store, max_pending=3) as writer:
    for c in range(store.num_chunks) if chunks is None else chunks:
      a, b = store.chunk_range(c)
      writer.submit(start=a, ids=ids[a:b], phi=phi[a:b])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scheme", ["memory", "file", "path"])
def test_round_trip(tmp_path, scheme, dtype):
  url = {"memory": f"memory://rt_{uuid.uuid4().hex}", "file": f"file://{tmp_path}/s.zarr", "path": str(tmp_path / "p")}
  meta = _meta(dtype=dtype)
  ids, phi = _data(meta)
  store = store_lib.open_store(url[scheme], expected_meta=meta, create=True)
  assert store.missing_ranges() == [(0, 37)] and not store.is_complete()
  _write_all(store, ids, phi)
  assert store.is_complete() and store.missing_ranges() == []
  reopened = store_lib.open_store(url[scheme], expected_meta=meta)  # a fresh open sees the data
  assert reopened.meta == meta
  expect = phi.astype(store.phi.dtype.numpy_dtype).astype(np.float32)
  chunk = reopened.read(0, 37)
  np.testing.assert_array_equal(chunk.ids, ids)
  np.testing.assert_array_equal(chunk.phi.astype(np.float32), expect)
  if dtype == "float32":
    np.testing.assert_array_equal(chunk.phi, phi)
  # iter_chunks: sizes that do not divide N, split over 3 hosts, cover every row once.
  seen = []
  for p in range(3):
    for c in reopened.iter_chunks(rows_per_chunk=5, process_index=p, process_count=3):
      assert c.start // 5 % 3 == p
      np.testing.assert_array_equal(c.ids, ids[c.start : c.start + len(c.ids)])
      np.testing.assert_array_equal(c.phi.astype(np.float32), expect[c.start : c.start + len(c.ids)])
      seen += range(c.start, c.start + len(c.ids))
  assert sorted(seen) == list(range(37))
  rows = np.array([[3, -1], [36, 3]])
  np.testing.assert_array_equal(reopened.read_ids(rows), [[ids[3], -1], [ids[36], ids[3]]])


def test_meta_mismatch_lists_fields():
  url = f"memory://mm_{uuid.uuid4().hex}"
  store_lib.open_store(url, expected_meta=_meta(), create=True)
  with pytest.raises(store_lib.StoreMismatchError) as e:
    store_lib.open_store(url, expected_meta=_meta(step=11, corpus_fingerprint="xyz"), create=True)
  msg = str(e.value)
  assert "step: stored=10 expected=11" in msg and "corpus_fingerprint" in msg and "dim" not in msg
  store_lib.open_store(url, expected_meta=_meta())  # same meta: fine
  with pytest.raises(FileNotFoundError, match="launch/encode.py"):
    store_lib.open_store(f"memory://none_{uuid.uuid4().hex}")
  with pytest.raises(ValueError, match="dtype"):
    _meta(dtype="float16")


def test_missing_ranges_and_alignment():
  meta = _meta()  # 37 rows, chunks of 8 -> 5 chunks, last has 5 rows
  ids, phi = _data(meta)
  store = store_lib.open_store(f"memory://mr_{uuid.uuid4().hex}", expected_meta=meta, create=True)
  _write_all(store, ids, phi, chunks=[1, 4])
  assert store.missing_ranges() == [(0, 8), (16, 32)]
  assert store.pending_chunks(process_index=0, process_count=2) == [0, 2]
  assert store.pending_chunks(process_index=1, process_count=2) == [3]
  with pytest.raises(store_lib.IncompleteStoreError, match=r"\[0, 8\), \[16, 32\)"):
    store.require_complete()
  with pytest.raises(ValueError, match="chunk-aligned"):
    store.write_rows(start=4, ids=ids[4:12], phi=phi[4:12])
  with pytest.raises(ValueError, match="chunk-aligned"):
    store.write_rows(start=0, ids=ids[:5], phi=phi[:5])
  # Multi-chunk write: one marker for chunks [2, 4).
  store.write_rows(start=16, ids=ids[16:32], phi=phi[16:32]).wait()
  assert store.missing_ranges() == [(0, 8)]
  # A write that never committed leaves no marker.
  pending = store.write_rows(start=0, ids=ids[:8], phi=phi[:8])
  assert store.missing_ranges() == [(0, 8)]
  pending.wait()
  assert store.is_complete()


_WORKER = textwrap.dedent(
  """
    import sys, time
    import numpy as np
    from trackstar_jax import store as store_lib
    url, n, d, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    meta = store_lib.StoreMeta(num_rows=n, dim=d, chunk_rows=chunk, step=7)
    store = store_lib.open_store(url, expected_meta=meta, create=True)
    with store_lib.AsyncWriter(store, max_pending=2) as writer:
      for c in store.pending_chunks():
        a, b = store.chunk_range(c)
        rng = np.random.default_rng(c)  # deterministic "encoding" of chunk c
        phi = rng.normal(size=(b - a, d)).astype(np.float32)
        time.sleep(0.01)
        writer.submit(start=a, ids=np.arange(a, b) * 3 + 1, phi=phi)
        print("submitted", c, flush=True)
    print("finished", flush=True)
    """
)


def _run_worker(script, url, *, kill_after_lines=None, rng=None):
  args = [sys.executable, script, url, "203", "16", "4"]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    if kill_after_lines is None:
      out, err = proc.communicate(timeout=60)
      assert proc.returncode == 0, err
      return out
    for _ in range(kill_after_lines):
      if not proc.stdout.readline():
        break
    time.sleep(rng.uniform(0, 0.015))  # somewhere inside the next write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return None
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_resume_after_sigkill_gives_identical_store(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  ref_url, url = f"file://{tmp_path}/ref.zarr", f"file://{tmp_path}/killed.zarr"
  _run_worker(str(script), ref_url)
  rng = random.Random(1234)
  kills, done_before = 0, 0
  for _ in range(4):  # 51 chunks; each run is killed after 3-10 more submissions
    _run_worker(str(script), url, kill_after_lines=rng.randint(3, 10), rng=rng)
    kills += 1
    partial = store_lib.open_store(url)
    assert not partial.is_complete() and partial.missing_ranges()
    done = len(partial.completed_chunks())
    assert done > done_before  # every run made progress and kept the earlier runs'
    done_before = done
  assert kills >= 3
  out = _run_worker(str(script), url)
  assert "finished" in out
  n_resumed = out.count("submitted")
  assert n_resumed < 51  # the restart skipped committed chunks
  ref, got = store_lib.open_store(ref_url), store_lib.open_store(url)
  assert got.is_complete() and ref.meta == got.meta
  a, b = ref.read(0, ref.num_rows), got.read(0, got.num_rows)
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(a.phi.view(np.uint16), b.phi.view(np.uint16))  # bitwise
  assert json.loads((tmp_path / "ref.zarr" / "meta.json").read_text()) == json.loads(
    (tmp_path / "killed.zarr" / "meta.json").read_text()
  )
