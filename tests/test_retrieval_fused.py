"""The fused retrieval step (default) against the reference step, bitwise, on data full of ties.

select="reference" is the previous step, kept for this comparison: both must
return exactly the same values and rows (ties: lower store row first) for any
transform, dtype, chunking, padding and device count. Also: the per-Hessian norm
cache (a second scan reads the norms instead of recomputing them, with the same
result), and the background feed (pinned staging, errors, early exit).
"""

import logging as py_logging
import os
import uuid

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from trackstar_jax import narrow_topk, retrieval
from trackstar_jax import norms as norms_lib
from trackstar_jax import store as store_lib


def _mesh(n):
  return Mesh(np.asarray(jax.local_devices()[:n]), ("data",))


def _scan(select, q, phi, ids, *, k, rows, n_dev=1, pinned=False, **kw):
  """local_result() of a scan; select "reference_shared": the reference step fed the fused step's norms."""
  topk = retrieval.StreamingTopK(q, k=k, mesh=_mesh(n_dev), select=select.removesuffix("_shared"), **kw)
  norms = retrieval.StreamingTopK(q, k=k, mesh=_mesh(n_dev), **kw) if select.endswith("_shared") else None
  for a in range(0, len(phi), rows):
    chunk = topk.put(start=a, ids=ids[a : a + rows], phi=phi[a : a + rows], pad_to=rows, pinned=pinned)
    if norms is not None and kw.get("normalize", True):
      chunk = chunk._replace(inv_norms=norms.update_device(chunk))
    topk.update_device(chunk)
  return topk.local_result()


def _tied(rng, n, d, q_n):
  """Small integers: exact products, many equal scores, zeros of both signs."""
  phi = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
  phi[::17] = phi[3]  # duplicated rows: equal scores under any transform
  q = rng.integers(-1, 2, size=(q_n, d)).astype(np.float32)
  return q, phi


def _spd(rng, d):
  a = rng.normal(size=(d, d))
  return (a @ a.T / d + 0.1 * np.eye(d)).astype(np.float32)


@pytest.mark.parametrize(
  "transform,normalize,dtype,rows,n_dev",
  [
    ("none", False, "float32", 1000, 1),  # groups (8,), a padded last group
    ("none", True, "bfloat16", 1500, 1),  # groups (8, 8)
    ("full", True, "bfloat16", 1024, 1),
    ("full", True, "float32", 61, 1),  # direct top_k, padded chunk
    ("block", True, "bfloat16", 800, 2),
    ("none", True, "float32", 24, 8),
  ],
)
def test_fused_equals_reference_bitwise(transform, normalize, dtype, rows, n_dev):
  rng = np.random.default_rng(rows + n_dev)
  n, d, k = 3000, 8, 5
  q, phi = _tied(rng, n, d, 6)
  ids = np.where(rng.random(n) < 0.1, -1, np.arange(n))  # invalid rows inside chunks
  inv = {"none": None, "full": _spd(rng, d), "block": np.stack([_spd(rng, 4), _spd(rng, 4)])}[transform]
  kw = dict(k=k, rows=rows, n_dev=n_dev, inv_sqrt=inv, normalize=normalize, matmul_dtype=dtype)
  got = _scan("fused", q, phi, ids, pinned=True, **kw)
  want = _scan("reference_shared", q, phi, ids, **kw)  # the same norms: the selections must agree bit for bit
  for name, g, w in zip(("top_v", "top_rows", "bot_v", "bot_rows"), got, want):
    np.testing.assert_array_equal(g, w, err_msg=name)
  assert np.isfinite(got[0]).all()
  # The short-row selections by narrow_topk's Pallas kernel (here in its interpreter): the same result, bit for bit.
  for name, g, w in zip(("top_v", "top_rows", "bot_v", "bot_rows"), _scan("kernel", q, phi, ids, **kw), got):
    np.testing.assert_array_equal(g, w, err_msg=f"kernel {name}")
  # The previous step verbatim (norms inside it): XLA may round a norm differently in another fusion (1 ulp).
  inline = _scan("reference", q, phi, ids, **kw)
  for name, g, w in zip(("top_v", "top_rows", "bot_v", "bot_rows"), got, inline):
    np.testing.assert_allclose(g, w, rtol=2e-7 if normalize else 0, err_msg=name)


def test_fused_matches_numpy_tie_rule():
  """Exact integer scores (dot product): (score desc, row asc) for the top, (score asc, row asc) for the bottom."""
  rng = np.random.default_rng(11)
  n, d, k = 2000, 4, 7
  q, phi = _tied(rng, n, d, 5)
  ids = np.arange(n)
  top_v, top_r, bot_v, bot_r = _scan("fused", q, phi, ids, k=k, rows=700, normalize=False, matmul_dtype="float32")
  s = q.astype(np.float64) @ phi.T.astype(np.float64)
  rows = np.broadcast_to(np.arange(n), s.shape)
  np.testing.assert_array_equal(top_r, np.lexsort((rows, -s), axis=1)[:, :k])
  np.testing.assert_array_equal(bot_r, np.lexsort((rows, s), axis=1)[:, :k])
  np.testing.assert_array_equal(-bot_v, np.sort(s, axis=1)[:, :k])


@pytest.mark.parametrize("groups", [(), (8,), (4, 4), (7, 3)])
@pytest.mark.parametrize("ranked", [False, True])
def test_merge_both_equals_two_reference_merges(groups, ranked, monkeypatch):
  rng = np.random.default_rng(len(groups))
  q_n, c, k, row0 = 5, 1000, 6, 300
  s = rng.integers(-30, 31, size=(q_n, c)).astype(np.float32)
  if ranked:  # a later group ranks first by its maximum, yet ties at the cut must come back lower row first
    s = np.minimum(s, 20)
    s[:, 900] = 50
    s[:, 901:903] = -50
    s[:, 903:908] = rng.choice([20, -30], size=(q_n, 5))  # tied with the best of the lower groups
  scale = rng.uniform(0.5, 2.0, size=c).astype(np.float32) if not ranked else np.ones(c, np.float32)
  scale[500:600] = scale[100:200]
  s[:, 500:600] = s[:, 100:200]  # equal scaled scores in distinct columns
  valid = rng.random(c) > 0.2
  low, high = (-45, -35) if ranked else (20, 40)  # ranked: the new columns decide the whole list
  run_v = np.sort(rng.integers(low, high, size=(2, q_n, k)).astype(np.float32), axis=-1)[..., ::-1].copy()
  run_v[:, 0, 3:] = -np.inf  # a partly empty running list
  run_r = np.where(np.isfinite(run_v), rng.integers(0, row0, size=run_v.shape), -1).astype(np.int32)

  def reference(run_v, run_r, s, scale, valid):
    x = s * scale
    return [
      retrieval._merge_running(run_v[i], run_r[i], jax.numpy.where(valid, key, -np.inf), row0, k, groups)  # pylint: disable=protected-access
      for i, key in enumerate((x, -x))
    ]

  def fused(run_v, run_r, s, scale, valid, kernel):
    v, r = retrieval._merge_both(  # pylint: disable=protected-access
      run_v.reshape(2 * q_n, k), run_r.reshape(2 * q_n, k), s, scale, valid, row0, k, groups, kernel=bool(kernel)
    )
    return v.reshape(2, q_n, k), r.reshape(2, q_n, k)

  want = jax.jit(reference)(run_v, run_r, s, scale, valid)
  for kernel in (False, True, "levels"):  # narrow_topk's kernel (in Pallas' interpreter here) on all maxima at once
    if kernel == "levels":  # maxima rows longer than the kernel takes: it picks each level's k best instead
      monkeypatch.setattr(narrow_topk, "MAX_COLUMNS", 64)
    got_v, got_r = jax.jit(fused, static_argnums=5)(run_v, run_r, s, scale, valid, kernel)
    for side in range(2):
      np.testing.assert_array_equal(got_v[side], want[side][0], err_msg=f"kernel={kernel}")
      np.testing.assert_array_equal(got_r[side], want[side][1], err_msg=f"kernel={kernel}")


def _store(tmp_path, phi, chunk_rows=64):
  n, d = phi.shape
  meta = store_lib.StoreMeta(num_rows=n, dim=d, chunk_rows=chunk_rows, dtype="float32")
  store = store_lib.open_store(f"file://{tmp_path}/s_{uuid.uuid4().hex[:6]}", expected_meta=meta, create=True)
  with store_lib.AsyncWriter(store) as w:
    for c in range(store.num_chunks):
      a, b = store.chunk_range(c)
      w.submit(start=a, ids=np.arange(a, b), phi=phi[a:b])
  return store


def test_norm_cache_second_scan_reads_norms_and_agrees(tmp_path, caplog):
  rng = np.random.default_rng(3)
  n, d, k, rows = 600, 16, 4, 128
  phi = rng.normal(size=(n, d)).astype(np.float32)
  q = rng.normal(size=(5, d)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  inv = _spd(rng, d)
  store = _store(tmp_path, phi)
  kw = dict(k=k, rows_per_chunk=rows, inv_sqrt=inv, matmul_dtype="bfloat16", mesh=_mesh(1))
  want = retrieval.retrieve(store, q, select="reference", **kw)
  first = retrieval.retrieve(store, q, **kw)
  key = norms_lib.NormCache.for_source(store, inv_sqrt=inv, matmul_dtype="bfloat16", layout=f"{rows}x1")
  files = sorted(os.listdir(key.directory.removeprefix("file://")))
  assert len(files) == -(-n // rows), files  # one file per chunk, beside the store
  # A new process: a freshly opened store object has nothing in memory and reads the files.
  reopened = store_lib.open_store(store.url)
  cache = norms_lib.NormCache.for_source(reopened, inv_sqrt=inv, matmul_dtype="bfloat16", layout=f"{rows}x1")
  assert all(cache.get(a, min(a + rows, n)) is not None for a in range(0, n, rows))
  with caplog.at_level(py_logging.INFO):
    second = retrieval.retrieve(reopened, q, **kw)
  assert f"{-(-n // rows)} chunks reused, 0 computed" in caplog.text
  for name, value in vars(first).items():  # the cached norms are the very norms of the first scan
    np.testing.assert_array_equal(getattr(second, name), value, err_msg=name)
  # The reference step computes its norms inline, where XLA may round them by an ulp (on the H200: 6 of 20).
  for name, value in vars(want).items():
    np.testing.assert_allclose(getattr(first, name), value, rtol=2e-7, err_msg=name)
  # Another Hessian is another key: nothing reused, and the result changes.
  other = norms_lib.NormCache.for_source(reopened, inv_sqrt=inv * 2, matmul_dtype="bfloat16", layout=f"{rows}x1")
  assert other.key != cache.key and other.get(0, rows) is None


def test_norm_cache_damaged_file_is_recomputed(tmp_path, caplog):
  rng = np.random.default_rng(4)
  n, d, rows = 256, 8, 128
  phi = rng.normal(size=(n, d)).astype(np.float32)
  q = rng.normal(size=(3, d)).astype(np.float32)
  store = _store(tmp_path, phi)
  kw = dict(k=3, rows_per_chunk=rows, matmul_dtype="float32", mesh=_mesh(1))
  want = retrieval.retrieve(store, q, **kw)
  cache = norms_lib.NormCache.for_source(store, inv_sqrt=None, matmul_dtype="float32", layout=f"{rows}x1")
  path = cache.directory.removeprefix("file://")
  with open(os.path.join(path, sorted(os.listdir(path))[0]), "wb") as f:
    f.write(b"not a npy file")
  with caplog.at_level(py_logging.WARNING):
    got = retrieval.retrieve(store_lib.open_store(store.url), q, **kw)
  assert "Ignoring unreadable norm cache file" in caplog.text
  np.testing.assert_array_equal(got.top_rows, want.top_rows)
  np.testing.assert_array_equal(got.top_scores, want.top_scores)


def test_in_memory_cache_lives_with_its_source():
  rng = np.random.default_rng(5)
  phi = rng.normal(size=(300, 8)).astype(np.float32)
  enc = retrieval.InMemoryEncodings(phi)
  cache = norms_lib.NormCache.for_source(enc, inv_sqrt=None, matmul_dtype="float32", layout="100x1")
  assert cache.get(0, 100) is None
  retrieval.retrieve(enc, rng.normal(size=(2, 8)), k=2, rows_per_chunk=100, matmul_dtype="float32", mesh=_mesh(1))
  got = cache.get(0, 100)
  norm = 1 / np.linalg.norm(phi[:100], axis=1)
  np.testing.assert_allclose(got, norm, rtol=1e-6)
  assert cache.directory is None and cache.save() == 0  # in memory only


def test_feed_raises_reader_errors_and_stops_early():
  topk = retrieval.StreamingTopK(np.ones((2, 4), np.float32), k=1, mesh=_mesh(1))

  def chunks():
    yield store_lib.Chunk(0, np.arange(4), np.ones((4, 4), np.float32))
    raise store_lib.StoreDataError("chunk 1 is damaged", [])

  feed = retrieval.device_chunks(topk, chunks(), pad_to=4)
  assert next(feed).start == 0
  with pytest.raises(store_lib.StoreDataError, match="chunk 1 is damaged"):
    next(feed)
  endless = (store_lib.Chunk(a, np.arange(4), np.ones((4, 4), np.float32)) for a in range(0, 10**6, 4))
  feed = retrieval.device_chunks(topk, endless, pad_to=4, ahead=2)
  assert [next(feed).start for _ in range(3)] == [0, 4, 8]
  feed.close()  # the feeding thread stops instead of filling the devices


@pytest.mark.parametrize("select", ["fused", "reference"])
def test_throttle_bounds_the_steps_a_slower_device_holds(select):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(512, 256)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  phi = rng.normal(size=(8192, 256)).astype(np.float32)
  topk = retrieval.StreamingTopK(q, k=4, mesh=_mesh(1), select=select)
  chunk = topk.put(start=0, ids=np.arange(8192), phi=phi)  # on the device: only the steps are timed here
  topk.update_device(chunk)
  topk.wait()
  for _ in range(6):
    topk.update_device(chunk)  # unthrottled: dispatched far faster than a step runs (~10 ms on a CPU core)
  assert not topk._state[0].is_ready() and topk.step_waits == 0  # the device is behind the loop
  topk.wait()
  for _ in range(6):
    topk.throttle(2)
    topk.update_device(chunk)
  assert topk.step_waits >= 2  # after 2 and 4 steps, the loop waited for the device
  topk.wait()
  topk.throttle(2)
  assert topk.step_waits >= 2 and topk._unseen == 0  # seen done: no wait


@pytest.mark.parametrize("select, names", [("fused", {"step", "norms"}), ("reference", {"step"})])
def test_programs_compile_the_same_from_an_abstract_copy(select, names):
  q = np.eye(4, 16, dtype=np.float32)
  topk = retrieval.StreamingTopK(q, k=2, mesh=_mesh(1), inv_sqrt=np.eye(16, dtype=np.float32), select=select)
  shapes = topk.abstract()  # what compile_check builds for a topology with no devices
  assert isinstance(shapes._q, jax.ShapeDtypeStruct) and isinstance(topk._q, jax.Array)  # the original is kept
  got, want = shapes.programs(64), topk.programs(64)
  assert set(got) == set(want) == names
  for name in names:
    assert got[name].as_text() == want[name].as_text(), name
    assert got[name].memory_analysis().temp_size_in_bytes == want[name].memory_analysis().temp_size_in_bytes
  assert (
    topk.programs(4096)["step"].memory_analysis().argument_size_in_bytes
    > want["step"].memory_analysis().argument_size_in_bytes
  )
  topk.update(start=0, ids=np.arange(8), phi=np.ones((8, 16), np.float32), pad_to=64)  # the instance still scores
  assert topk.local_result()[1].shape == (4, 2)


def test_inv_norms_need_normalize_and_select_is_checked():
  topk = retrieval.StreamingTopK(np.ones((2, 4), np.float32), k=1, mesh=_mesh(1), normalize=False)
  with pytest.raises(ValueError, match="need normalize=True"):
    topk.put(start=0, ids=np.arange(4), phi=np.ones((4, 4), np.float32), inv_norms=np.ones(4, np.float32))
  with pytest.raises(ValueError, match="select .* must be 'auto', 'fused', 'kernel' or 'reference'"):
    retrieval.StreamingTopK(np.ones((2, 4), np.float32), k=1, select="fast")
