"""Tests for trackstar_jax.retrieval against a NumPy brute force (full score matrix + sort).

Tolerances: matmul_dtype="float32" -> same ids as float64 brute force, scores within 1e-5;
"bfloat16" -> scores within 2e-2 of float64, and every returned row's exact score within
2e-2 of the exact k-th best (near-ties may swap).
"""

import logging as py_logging
import os
import socket
import subprocess
import sys
import textwrap
import uuid

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from trackstar_jax import retrieval
from trackstar_jax import store as store_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_store(phi, ids=None, *, chunk_rows=16, dtype="float32", url=None):
  n, d = phi.shape
  ids = np.arange(n, dtype=np.int64) * 7 + 3 if ids is None else ids
  meta = store_lib.StoreMeta(num_rows=n, dim=d, chunk_rows=chunk_rows, dtype=dtype)
  store = store_lib.open_store(url or f"memory://rt_{uuid.uuid4().hex}", expected_meta=meta, create=True)
  with store_lib.AsyncWriter(store) as w:
    for c in range(store.num_chunks):
      a, b = store.chunk_range(c)
      w.submit(start=a, ids=ids[a:b], phi=phi[a:b])
  return store, ids


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute(store, q, inv, normalize, k):
  """Full [Q, N] float64 scores; order by (score, row), as documented."""
  phi = store.read(0, store.num_rows).phi.astype(np.float64)
  if inv is not None:
    inv = np.asarray(inv, np.float64)
    inv = inv if inv.ndim == 2 else _block_diag(inv)
    phi = phi @ inv
  e = _unit(phi) if normalize else phi
  s = np.asarray(q, np.float64) @ e.T
  rows = np.broadcast_to(np.arange(s.shape[1]), s.shape)
  top = np.lexsort((rows, -s), axis=1)[:, :k]
  bot = np.lexsort((rows, s), axis=1)[:, :k]
  return s, top, bot


def _block_diag(blocks):
  b, m, _ = blocks.shape
  out = np.zeros((b * m, b * m))
  for i in range(b):
    out[i * m : (i + 1) * m, i * m : (i + 1) * m] = blocks[i]
  return out


def _spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _mesh(n):
  return Mesh(np.asarray(jax.local_devices()[:n]), ("data",))


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("rows_per_chunk,transform", [(37, "full"), (100, "block"), (1000, "none"), (64, "dot")])
# rows_per_chunk 1000 on 1 device takes the hierarchical (group) selection; the others the direct one.
def test_matches_brute_force_f32(n_dev, rows_per_chunk, transform):
  rng = np.random.default_rng(n_dev * 100 + rows_per_chunk)
  n, d, q_n, k = 301, 24, 9, 6
  store, ids = _make_store(rng.normal(size=(n, d)).astype(np.float32), chunk_rows=16)
  q = _unit(rng.normal(size=(q_n, d))).astype(np.float32)
  inv = {"full": _spd(rng, d), "block": np.stack([_spd(rng, 8) for _ in range(3)]), "none": None, "dot": None}[
    transform
  ]
  normalize = transform != "dot"
  res = retrieval.retrieve(
    store,
    q,
    k=k,
    rows_per_chunk=rows_per_chunk,
    mesh=_mesh(n_dev),
    inv_sqrt=inv,
    normalize=normalize,
    matmul_dtype="float32",
  )
  s, top, bot = _brute(store, q, inv, normalize, k)
  scale = 1.0 if normalize else np.abs(s).max()
  np.testing.assert_array_equal(res.top_rows, top)
  np.testing.assert_array_equal(res.top_ids, ids[top])
  np.testing.assert_allclose(res.top_scores, np.take_along_axis(s, top, 1), atol=1e-5 * scale)
  np.testing.assert_array_equal(res.bottom_ids, ids[bot])
  np.testing.assert_allclose(res.bottom_scores, np.take_along_axis(s, bot, 1), atol=1e-5 * scale)
  assert np.all(np.diff(res.top_scores, axis=1) <= 0) and np.all(np.diff(res.bottom_scores, axis=1) >= 0)


@pytest.mark.parametrize("transform", ["full", "block"])
def test_bf16_store_and_matmul_within_tolerance(transform):
  # "block": the LAMA config's block-diagonal R^{-1/2} with bf16 operands (on CPU via float32, see _apply_inv).
  rng = np.random.default_rng(5)
  n, d, k = 500, 64, 10
  store, ids = _make_store(rng.normal(size=(n, d)).astype(np.float32), chunk_rows=32, dtype="bfloat16")
  q = _unit(rng.normal(size=(7, d))).astype(np.float32)
  inv = _spd(rng, d) if transform == "full" else np.stack([_spd(rng, 16) for _ in range(4)])
  res = retrieval.retrieve(store, q, k=k, rows_per_chunk=77, inv_sqrt=inv, matmul_dtype="bfloat16")
  s, top, bot = _brute(store, q, inv, True, k)
  exact_of_returned = np.take_along_axis(s, res.top_rows, 1)
  np.testing.assert_allclose(res.top_scores, exact_of_returned, atol=2e-2)
  assert np.all(exact_of_returned >= np.take_along_axis(s, top, 1)[:, -1:] - 2e-2)
  exact_of_returned = np.take_along_axis(s, res.bottom_rows, 1)
  np.testing.assert_allclose(res.bottom_scores, exact_of_returned, atol=2e-2)
  assert np.all(exact_of_returned <= np.take_along_axis(s, bot, 1)[:, -1:] + 2e-2)
  assert len(set(res.top_ids[0])) == k


def test_ties_broken_by_lower_row_for_any_layout():
  # Integer-valued, unnormalized: scores are exact, with many ties.
  rng = np.random.default_rng(0)
  n, d, k = 1500, 4, 5
  phi = rng.integers(-1, 2, size=(n, d)).astype(np.float32)
  store, ids = _make_store(phi, chunk_rows=8)
  q = rng.integers(-1, 2, size=(5, d)).astype(np.float32)
  _, top, bot = _brute(store, q, None, False, k)
  # Hierarchical selection with two levels, one level, and none (direct top_k) all run.
  assert [len(retrieval.group_sizes(c, k)) for c in (1500, 400, 61)] == [2, 1, 0]
  for n_dev, rows in [(1, 1500), (2, 800), (8, 24), (8, 61), (3, 10)]:
    res = retrieval.retrieve(
      store, q, k=k, rows_per_chunk=rows, mesh=_mesh(n_dev), normalize=False, matmul_dtype="float32"
    )
    np.testing.assert_array_equal(res.top_rows, top, err_msg=f"{n_dev} devices, chunk {rows}")
    np.testing.assert_array_equal(res.bottom_rows, bot, err_msg=f"{n_dev} devices, chunk {rows}")


def _running(rng, k, n_set, n_rows):
  """A valid running state [2, 1, k] per side: n_set entries in (value desc, row asc) order, then (-inf, -1)."""
  vals, rows = np.full((2, 1, k), -np.inf, np.float32), np.full((2, 1, k), -1, np.int32)
  for side in range(2):
    r = rng.choice(n_rows, n_set, replace=False)
    v = rng.integers(20, 45, size=n_set).astype(np.float32) * (1 if side == 0 else -0.25)
    order = np.lexsort((r, -v))
    vals[side, 0, :n_set], rows[side, 0, :n_set] = v[order], r[order]
  return vals, rows


def _merge_both(run_v, run_r, s, row0, k, groups, *, scale=None, valid=None):
  """`_merge_running` for both sides as the step calls it: keys s * scale and -(s * scale), -inf where invalid."""
  x = s if scale is None else s * scale
  out = []
  for side, key in enumerate((x, -x)):
    key = key if valid is None else jnp.where(valid, key, -jnp.inf)
    out.append(retrieval._merge_running(run_v[side], run_r[side], key, row0, k, groups))  # pylint: disable=protected-access
  return jnp.stack([o[0] for o in out]), jnp.stack([o[1] for o in out])


@pytest.mark.parametrize("groups", [(), (8,), (16,), (64,), (4, 4), (8, 2), (7, 3)])
@pytest.mark.parametrize("case", ["ties", "scaled", "all_invalid", "few_valid", "narrow"])
def test_merge_equals_sort(groups, case):
  """_merge_running == sort by (key desc, row asc) over running + valid new columns, both sides.

  c = 1000 is no multiple of most group spans (a padded last group); "narrow" has
  fewer columns than k groups (direct top_k only); "few_valid" fewer valid columns than k.
  """
  if case == "narrow" and groups:
    pytest.skip("group_sizes never picks fewer groups than k")
  rng = np.random.default_rng(sum(groups) + len(case))
  q_n, c, k, row0 = 6, 40 if case == "narrow" else 1000, 7, 500
  s = rng.integers(-40, 41, size=(q_n, c)).astype(np.float32)  # many ties
  valid = rng.random(c) > 0.1
  scale = None
  if case == "scaled":  # distinct columns with equal scaled scores: ties after the scaling
    scale = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    s[:, 600:700], scale[600:700] = s[:, 100:200], scale[100:200]
  elif case == "all_invalid":
    valid[:] = False
  elif case == "few_valid":
    valid[:] = False
    valid[rng.choice(c, 3, replace=False)] = True
  run_v = [np.zeros((2, q_n, k), np.float32), np.zeros((2, q_n, k), np.int32)]
  for i in range(q_n):  # some queries start with a partly empty running list
    v, r = _running(rng, k, k - i % 3 * 2, row0)
    run_v[0][:, i], run_v[1][:, i] = v[:, 0], r[:, 0]
  merge = jax.jit(_merge_both, static_argnums=(4, 5))
  got = merge(run_v[0], run_v[1], s, row0, k, groups, scale=scale, valid=valid)
  x = s if scale is None else s * scale  # float32, as on device
  for side, key in enumerate((x, -x)):
    new_v = np.where(valid, key, -np.inf)[:, valid]
    new_r = np.broadcast_to(row0 + np.arange(c)[valid], new_v.shape)
    all_v = np.concatenate([run_v[0][side], new_v, np.full((q_n, k), -np.inf, np.float32)], 1)
    all_r = np.concatenate([run_v[1][side], new_r, np.full((q_n, k), -1)], 1)
    order = np.lexsort((all_r, -all_v), axis=1)[:, :k]
    want_v, want_r = np.take_along_axis(all_v, order, 1), np.take_along_axis(all_r, order, 1)
    want_r = np.where(np.isfinite(want_v), want_r, -1)  # empty slots keep row -1 (sort puts -1 first anyway)
    np.testing.assert_array_equal(got[0][side], want_v, err_msg=f"side {side}")
    np.testing.assert_array_equal(got[1][side], want_r, err_msg=f"side {side}")


@pytest.mark.parametrize("groups", [(8,), (4, 2), (2, 2)])
def test_hierarchical_ties_follow_rows_not_group_rank(groups):
  # Group of row 24 ranks first (max 50) but the tied 30s must come back lower row first.
  s = np.zeros((1, 64), np.float32)
  s[0, [24, 25, 8, 9]] = [50, 30, 40, 30]
  valid = np.isin(np.arange(64), [24, 25, 8, 9])
  empty_v, empty_r = np.full((2, 1, 3), -np.inf, np.float32), np.full((2, 1, 3), -1, np.int32)
  merge = jax.jit(_merge_both, static_argnums=(4, 5))
  v, r = merge(empty_v, empty_r, s, 0, 3, groups, valid=valid)
  np.testing.assert_array_equal(r, [[[24, 8, 9]], [[9, 25, 8]]])
  np.testing.assert_array_equal(v, [[[50, 40, 30]], [[-30, -30, -40]]])


def test_all_invalid_chunk_and_partial_group_end_to_end():
  """Hierarchical steps (one device) over a chunk with no valid row and one with fewer than k."""
  rng = np.random.default_rng(6)
  n, d, k, rows = 1400, 8, 5, 700  # 700 rows: groups (8,), 700 % 8 = 4 columns in a last partial group
  assert retrieval.group_sizes(rows, k) == (8,)
  phi = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.full(n, -1, np.int64)
  ids[[3, 250, 699]] = [30, 2500, 6990]  # chunk 0: 3 valid rows (< k), the last in the partial group
  store, _ = _make_store(phi, ids, chunk_rows=100)
  q = _unit(rng.normal(size=(4, d))).astype(np.float32)
  res = retrieval.retrieve(store, q, k=k, rows_per_chunk=rows, mesh=_mesh(1), matmul_dtype="float32")
  s, _, _ = _brute(store, q, None, True, k)
  for rows_got, scores, sign in ((res.top_rows, res.top_scores, 1), (res.bottom_rows, res.bottom_scores, -1)):
    order = np.argsort(-sign * s[:, [3, 250, 699]], axis=1, kind="stable")
    np.testing.assert_array_equal(rows_got[:, :3], np.array([3, 250, 699])[order])
    assert (rows_got[:, 3:] == -1).all() and np.isnan(scores[:, 3:]).all()
  assert sorted(res.top_ids[0, :3]) == [30, 2500, 6990]


def test_hierarchical_flag_same_result():
  """The reference path (hierarchical=False: top_k over whole blocks) and the grouped one agree exactly."""
  rng = np.random.default_rng(7)
  q_n, d, k, rows = 5, 8, 4, 1000  # 1000 rows on one device: groups (8,), partial last group
  q = _unit(rng.normal(size=(q_n, d))).astype(np.float32)
  phi = rng.integers(-2, 3, size=(3 * rows, d)).astype(np.float32)  # ties
  out = []
  for hierarchical in (False, True):
    topk = retrieval.StreamingTopK(q, k=k, mesh=_mesh(1), hierarchical=hierarchical, matmul_dtype="float32")
    for a in range(0, 3 * rows, rows):
      topk.update(start=a, ids=np.where(np.arange(rows) % 7 == 0, -1, a + np.arange(rows)), phi=phi[a : a + rows])
    out.append(topk.local_result())
  assert retrieval.group_sizes(rows, k) == (8,)
  for got, want in zip(out[1], out[0]):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n_dev,pinned", [(1, False), (1, True), (4, False), (4, True)])
def test_put_in_pieces_equals_one_copy(n_dev, pinned):
  """A chunk copied in pieces (uneven last piece, several per device) is the same array, sharded the same way."""
  mesh = _mesh(n_dev)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names), None))
  x = np.random.default_rng(3).normal(size=(4 * 37, 5)).astype(np.float32)
  row = x[:1].nbytes
  for piece_bytes in (0, row, 7 * row, 10**9):
    got = retrieval.put_in_pieces(x, sharding, piece_bytes=piece_bytes, pinned=pinned)
    assert got.sharding.is_equivalent_to(sharding, x.ndim) and got.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(got), x)
  # The scan with pieces gives the very result of the scan with one copy per chunk.
  q = _unit(np.random.default_rng(4).normal(size=(3, 5))).astype(np.float32)
  out = []
  for piece_bytes in (0, 3 * row):
    topk = retrieval.StreamingTopK(q, k=4, mesh=mesh, matmul_dtype="float32")
    topk.piece_bytes = piece_bytes
    for a in range(0, x.shape[0], 40):
      topk.update_device(topk.put(start=a, ids=np.arange(a, min(a + 40, len(x))), phi=x[a : a + 40], pad_to=40))
    out.append(topk.local_result())
  for got, want in zip(*out):
    np.testing.assert_array_equal(got, want)


def test_padding_rows_never_returned():
  rng = np.random.default_rng(1)
  n, d = 40, 8
  q = _unit(rng.normal(size=(2, d))).astype(np.float32)
  phi = rng.normal(size=(n, d)).astype(np.float32)
  ids = np.arange(n, dtype=np.int64)
  pad = np.arange(0, n, 3)
  ids[pad] = -1
  phi[pad] = q[0]  # padding rows would be the best match for query 0 ...
  phi[pad[::2]] = -q[0]  # ... or the worst
  store, _ = _make_store(phi, ids, chunk_rows=8)
  res = retrieval.retrieve(store, q, k=5, rows_per_chunk=16, matmul_dtype="float32")
  assert not np.isin(res.top_rows, pad).any() and not np.isin(res.bottom_rows, pad).any()
  assert (res.top_ids >= 0).all() and (res.bottom_ids >= 0).all()
  # k = N: only the valid rows come back, the rest is marked missing.
  res = retrieval.retrieve(store, q, k=n, rows_per_chunk=16, matmul_dtype="float32")
  n_valid = n - len(pad)
  assert (res.top_ids[:, :n_valid] >= 0).all() and (res.top_ids[:, n_valid:] == -1).all()
  assert np.isnan(res.top_scores[:, n_valid:]).all()
  assert sorted(res.top_ids[0, :n_valid]) == sorted(set(ids) - {-1})


def test_k_clamped_empty_queries_incomplete_store(caplog):
  rng = np.random.default_rng(2)
  store, ids = _make_store(rng.normal(size=(10, 4)).astype(np.float32), chunk_rows=4)
  q = _unit(rng.normal(size=(3, 4))).astype(np.float32)
  with caplog.at_level(py_logging.WARNING):
    res = retrieval.retrieve(store, q, k=25, matmul_dtype="float32")
  assert "clamping k to 10" in caplog.text
  assert res.top_ids.shape == (3, 10) and sorted(res.top_ids[0]) == sorted(ids)
  with pytest.raises(ValueError, match="no queries"):
    retrieval.retrieve(store, np.zeros((0, 4), np.float32), k=2)
  with pytest.raises(ValueError, match="Query dim 5 != store dim 4"):
    retrieval.retrieve(store, np.zeros((2, 5), np.float32), k=2)
  meta = store_lib.StoreMeta(num_rows=20, dim=4, chunk_rows=4)
  partial = store_lib.open_store(f"memory://inc_{uuid.uuid4().hex}", expected_meta=meta, create=True)
  partial.write_rows(start=4, ids=np.arange(4), phi=np.ones((4, 4))).wait()
  with pytest.raises(store_lib.IncompleteStoreError, match=r"rows \[0, 4\), \[8, 20\)"):
    retrieval.retrieve(partial, q, k=2)


class _WatchedEncodings(retrieval.InMemoryEncodings):
  """In-memory encodings that record the bytes of every live jax array whenever retrieve asks for a chunk."""

  def iter_chunks(self, **kw):
    self.live = []
    for chunk in super().iter_chunks(**kw):
      self.live.append(sum(a.nbytes for a in jax.live_arrays()))
      yield chunk


def test_memory_does_not_grow_with_n():
  """`retrieve` holds no [Q, N] buffer and nothing that grows with N: the device memory it holds while
  streaming is the same for a 10x larger corpus, far below one device's share of the score matrix, and one
  compiled step serves every chunk."""
  rng = np.random.default_rng(3)
  q_n, d, k, rows = 32, 16, 4, 128
  q = _unit(rng.normal(size=(q_n, d))).astype(np.float32)
  held = {}
  for n in (1024, 10240):
    phi = rng.normal(size=(n, d)).astype(np.float32)
    watched = _WatchedEncodings(phi)
    result = retrieval.retrieve(watched, q, k=k, rows_per_chunk=rows, matmul_dtype="float32")
    assert result.top_ids.shape == (q_n, k)
    want = np.argsort(-(q @ _unit(phi).T), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(result.top_rows, want)
    assert len(watched.live) == n // rows
    held[n] = max(watched.live) - min(watched.live[:2])  # what streaming adds on top of its start
  assert held[10240] <= held[1024] + 64 * 1024, held  # constant in N (a little slack for allocator churn)
  assert max(held.values()) < q_n * 10240 * 4 / 8, held  # far below one device's share of [Q, N] scores


_WORKER = textwrap.dedent(
  """
    import sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, url, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from trackstar_jax import retrieval, store as store_lib
    assert jax.process_count() == 2 and jax.local_device_count() == 2
    d = np.load(out + "/inputs.npz")
    store = store_lib.open_store(url)
    res = retrieval.retrieve(store, d["q"], k=int(d["k"]), rows_per_chunk=23, inv_sqrt=d["inv"],
                             matmul_dtype="float32")
    np.savez(f"{out}/result_{pid}.npz", **vars(res))
    """
)


def test_two_processes_equal_one_process(tmp_path):
  rng = np.random.default_rng(4)
  n, d, k = 211, 16, 7
  store, _ = _make_store(rng.normal(size=(n, d)).astype(np.float32), chunk_rows=16, url=f"file://{tmp_path}/s")
  q = _unit(rng.normal(size=(6, d))).astype(np.float32)
  inv = _spd(rng, d)
  np.savez(tmp_path / "inputs.npz", q=q, inv=inv, k=k)
  (tmp_path / "worker.py").write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [
    subprocess.Popen(
      [
        "timeout",
        "120",
        sys.executable,
        str(tmp_path / "worker.py"),
        str(port),
        str(i),
        f"file://{tmp_path}/s",
        str(tmp_path),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=150)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  one = retrieval.retrieve(store, q, k=k, rows_per_chunk=23, inv_sqrt=inv, matmul_dtype="float32")
  _, top, bot = _brute(store, q, inv, True, k)
  np.testing.assert_array_equal(one.top_rows, top)
  for i in range(2):
    got = np.load(tmp_path / f"result_{i}.npz")
    for name, value in vars(one).items():
      np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=f"process {i}: {name}")
    np.testing.assert_array_equal(got["top_ids"], one.top_ids)
    np.testing.assert_array_equal(got["bottom_ids"], one.bottom_ids)
