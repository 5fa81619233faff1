"""Compact stores (int8, int4): the codec against a NumPy reference, stores, integrity, retrieval, encoding.

* quantize / dequantize (numpy, and jax.numpy under jit: bit for bit the same) against a
  row-by-row float64 reference: scales, codes, |x - deq(q(x))| <= scale / 2, zero and
  non-finite rows, the int4 nibble layout;
* a round trip through int8 / int4 stores (float rows quantized on write, or pre-quantized
  `Quantized` rows), their size against bfloat16, and the dtype recorded and enforced;
* verify() and reads find a corrupted codes or scales chunk, and the repair restores the store;
* retrieval over an int8 / int4 store equals retrieval over the float32 store of the dequantized
  rows, exactly (8 devices, chunks that do not divide N, with and without R^{-1/2});
* `api.encode(..., dtype="int8")` (quantized on the device) stores the quantization of the phi that
  `api.encode` returns in memory, and its retrieval ranks like the bfloat16 store's.
"""

import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trackstar_jax as tsj
from trackstar_jax import norms, quantize, retrieval
from trackstar_jax import store as store_lib
from trackstar_jax.jobs import verify_store


def _rows(seed=0, n=41, d=300):
  """Heavy-tailed rows at very different scales, with an all-zero row and a row zero in one int4 group."""
  rng = np.random.default_rng(seed)
  x = (rng.standard_t(3, size=(n, d)) * rng.uniform(1e-3, 1e3, size=(n, 1))).astype(np.float32)
  x[3] = 0
  x[5, :128] = 0
  return x


def _reference(x, dtype):
  """Row by row, group by group, in float64: (scale [n, groups], codes [n, d] int)."""
  qmax, g = {"int8": (127, x.shape[1]), "int4": (7, quantize.INT4_GROUP)}[dtype]
  n, d = x.shape
  groups = -(-d // g)
  scale, codes = np.zeros((n, groups)), np.zeros((n, d), np.int64)
  for i in range(n):
    for j in range(groups):
      v = x[i, j * g : (j + 1) * g].astype(np.float64)
      scale[i, j] = np.abs(v).max() / qmax
      if scale[i, j] > 0:
        codes[i, j * g : (j + 1) * g] = np.round(v / scale[i, j])
  return scale, codes


@pytest.mark.parametrize("dtype", quantize.QUANTIZED)
@pytest.mark.parametrize("d", [300, 128, 7, 1])
def test_quantize_matches_numpy_reference(dtype, d):
  x = _rows(d=d)
  q = quantize.quantize(x, dtype)
  lay = quantize.layout(dtype, d)
  assert q.codes.shape == (len(x), lay.codes_cols) and q.codes.dtype == np.dtype(lay.codes_dtype)
  assert q.scale.shape == (len(x), lay.scale_cols) and q.scale.dtype == np.float32
  ref_scale, ref_codes = _reference(x, dtype)
  np.testing.assert_allclose(q.scale, ref_scale, rtol=2e-7)  # absmax * fl(1 / qmax): within an ulp
  codes = quantize.unpack_int4(q.codes, d) if dtype == "int4" else q.codes
  assert np.abs(codes).max() <= quantize.QMAX[dtype]
  # Codes are the nearest integers (a value within float32 rounding of a half may go either way).
  assert (codes != ref_codes).mean() < 1e-3, (codes != ref_codes).sum()
  deq = quantize.dequantize(q.codes, q.scale, dtype, dim=d)
  assert deq.shape == x.shape and deq.dtype == np.float32
  g = quantize.INT4_GROUP if dtype == "int4" else d
  per_elem = np.repeat(q.scale, g, axis=1)[:, :d]
  assert (np.abs(x.astype(np.float64) - deq) <= per_elem / 2 * (1 + 1e-5)).all()
  assert (deq[3] == 0).all() and (q.scale[3] == 0).all()  # a zero row stays exactly zero
  if dtype == "int4" and d > 128:
    assert q.scale[5, 0] == 0 and (deq[5, :128] == 0).all() and q.scale[5, 1] > 0
  # The device path is the same arithmetic, bit for bit.
  qj = jax.jit(lambda v: quantize.quantize(v, dtype, xp=jnp))(x)
  np.testing.assert_array_equal(np.asarray(qj.codes), q.codes)
  np.testing.assert_array_equal(np.asarray(qj.scale), q.scale)
  dj = jax.jit(lambda c, s: quantize.dequantize(c, s, dtype, dim=d, xp=jnp))(*qj)
  np.testing.assert_array_equal(np.asarray(dj), deq)


def test_int4_nibble_layout_and_special_rows():
  q = quantize.quantize(np.array([[-7.0, 7.0, 0.0]], np.float32), "int4")  # scale 1: codes -7, 7, 0
  np.testing.assert_array_equal(q.scale, [[1.0]])
  assert q.codes.tolist() == [[(-7 + 8) | (7 + 8) << 4, 8 | 8 << 4]]  # low nibble = even column
  x = np.array([[1.0, np.nan, 2.0], [np.inf, 1.0, 0.0]], np.float32)
  for dtype in quantize.QUANTIZED:
    with np.errstate(invalid="ignore"):
      deq = quantize.dequantize(*quantize.quantize(x, dtype), dtype, dim=3)
    assert np.isnan(deq).all()  # a non-finite row stays visibly non-finite
  assert quantize.layout("int4", 300) == quantize.Layout("uint8", 150, 3)
  assert quantize.layout("int4", 300).row_bytes == 162 and quantize.layout("int8", 300).row_bytes == 304
  with pytest.raises(ValueError, match="int8"):
    quantize.layout("int2", 4)


def _meta(dtype, **kw):
  base = dict(num_rows=41, dim=300, chunk_rows=8, dtype=dtype, checkpoint="/ckpt/wd", step=3)
  return store_lib.StoreMeta(**{**base, **kw})


def _write(store, phi, chunks=None):
  ids = np.arange(len(phi), dtype=np.int64) * 3
  with store_lib.AsyncWriter(store) as writer:
    for c in range(store.num_chunks) if chunks is None else chunks:
      a, b = store.chunk_range(c)
      writer.submit(start=a, ids=ids[a:b], phi=phi[a:b])
  return ids


def _size(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("dtype", quantize.QUANTIZED)
def test_store_round_trip_size_and_dtype_refusal(tmp_path, dtype):
  x = _rows()
  url = str(tmp_path / f"{dtype}.zarr")
  store = store_lib.open_store(url, expected_meta=_meta(dtype), create=True)
  ids = _write(store, x)
  reopened = store_lib.open_store(url, expected_meta=_meta(dtype))
  assert reopened.is_complete() and reopened.dtype == dtype and reopened.verify() == []
  expect = quantize.quantize(x, dtype)
  chunk = reopened.read(0, 41)
  np.testing.assert_array_equal(chunk.ids, ids)
  np.testing.assert_array_equal(chunk.phi, expect.codes)
  np.testing.assert_array_equal(chunk.scale, expect.scale)
  np.testing.assert_array_equal(reopened.decode(chunk), quantize.dequantize(*expect, dtype, dim=300))
  got = list(reopened.iter_chunks(rows_per_chunk=5, process_index=1, process_count=2))
  assert [c.start for c in got] == [5, 15, 25, 35]
  for c in got:
    np.testing.assert_array_equal(c.scale, expect.scale[c.start : c.start + 5])
  # Pre-quantized rows (what encode hands over from the device) give the same store.
  url2 = str(tmp_path / "pre.zarr")
  pre = store_lib.open_store(url2, expected_meta=_meta(dtype), create=True)
  with store_lib.AsyncWriter(pre) as writer:
    for c in range(pre.num_chunks):
      a, b = pre.chunk_range(c)
      writer.submit(start=a, ids=ids[a:b], phi=quantize.Quantized(expect.codes[a:b], expect.scale[a:b]))
  assert pre.read(0, 41).phi.tobytes() == chunk.phi.tobytes()
  with pytest.raises(ValueError, match="takes codes"):
    pre.write_rows(start=0, ids=ids[:8], phi=quantize.Quantized(expect.codes[:8, :5], expect.scale[:8]))
  # Size against bfloat16 (same rows, same chunking; checksums and ids included).
  bf16 = store_lib.open_store(str(tmp_path / "bf16.zarr"), expected_meta=_meta("bfloat16"), create=True)
  _write(bf16, x)
  ratio = _size(tmp_path / "bf16.zarr") / _size(url)
  assert ratio > {"int8": 1.8, "int4": 3.0}[dtype], ratio
  # A store keeps its dtype: asking for another one on resume is refused, naming both.
  for other in ("bfloat16", "int8" if dtype == "int4" else "int4"):
    with pytest.raises(store_lib.StoreMismatchError) as e:
      store_lib.open_store(url, expected_meta=_meta(other), create=True)
    msg = str(e.value)
    assert f"dtype: stored='{dtype}' expected='{other}'" in msg and "config.store.dtype" in msg, msg
  with pytest.raises(store_lib.StoreMismatchError, match="stored='bfloat16' expected='int8'"):
    store_lib.open_store(str(tmp_path / "bf16.zarr"), expected_meta=_meta("int8"), create=True)
  assert store_lib.open_store(url).read(0, 41).phi.tobytes() == chunk.phi.tobytes()  # nothing was lost


@pytest.mark.parametrize("array", ["phi", "scale"])
def test_verify_finds_a_corrupted_int8_chunk_and_repair_restores_it(tmp_path, array):
  x = _rows()
  clean = store_lib.open_store(str(tmp_path / "clean.zarr"), expected_meta=_meta("int8"), create=True)
  _write(clean, x)
  url = f"file://{tmp_path}/s.zarr"
  store = store_lib.open_store(url, expected_meta=_meta("int8"), create=True)
  _write(store, x)
  f = os.path.join(tmp_path, "s.zarr", array, "c", "2", "0")
  with open(f, "r+b") as fh:  # flip one byte of the data (not the checksum)
    fh.seek(3)
    byte = fh.read(1)
    fh.seek(3)
    fh.write(bytes([byte[0] ^ 0x10]))
  bad = store.verify()
  assert [(b.chunk, b.start, b.stop) for b in bad] == [(2, 16, 24)] and array in bad[0].reason, bad
  with pytest.raises(store_lib.StoreDataError, match=r"chunk 2 \(rows \[16, 24\)\)"):
    retrieval.retrieve(store, np.ones((2, 300), np.float32), k=3, rows_per_chunk=16)
  assert verify_store.run(url=url, repair=True) == bad
  assert store.pending_chunks() == [2]
  _write(store, x, store.pending_chunks())
  assert store.verify() == [] and store.read(0, 41).scale.tobytes() == clean.read(0, 41).scale.tobytes()
  assert store.read(0, 41).phi.tobytes() == clean.read(0, 41).phi.tobytes()


@pytest.mark.parametrize("dtype", quantize.QUANTIZED)
@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_retrieval_equals_float_store_of_dequantized_rows(dtype, matmul_dtype):
  """Exact: the same top/bottom rows and bit-equal scores, on 8 devices, with and without R^{-1/2}."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(150, 96)).astype(np.float32)
  x[7] = 0  # a zero row (zero score)
  meta = store_lib.StoreMeta(num_rows=150, dim=96, chunk_rows=16, dtype=dtype)
  compact = store_lib.open_store(f"memory://c_{uuid.uuid4().hex}", expected_meta=meta, create=True)
  _write(compact, x)
  deq = compact.decode(compact.read(0, 150))
  ref_dtype = "float32" if matmul_dtype == "float32" else "bfloat16"  # the step rounds to it anyway
  ref_meta = store_lib.StoreMeta(num_rows=150, dim=96, chunk_rows=16, dtype=ref_dtype)
  ref = store_lib.open_store(f"memory://r_{uuid.uuid4().hex}", expected_meta=ref_meta, create=True)
  _write(ref, deq)
  q = rng.normal(size=(6, 96)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  inv = np.linalg.qr(rng.normal(size=(96, 96)))[0].astype(np.float32) * 0.5
  for kw in (dict(normalize=False), dict(inv_sqrt=inv), dict()):
    got, want = (
      retrieval.retrieve(s, q, k=5, rows_per_chunk=40, matmul_dtype=matmul_dtype, **kw) for s in (compact, ref)
    )
    for name, a in got.to_arrays().items():
      np.testing.assert_array_equal(a, getattr(want, name), err_msg=f"{name} {kw}")
  # The other feeds of the compact store: a second scan on the norms cached from the first (those of the
  # dequantized rows), and the reference step with inline norms and copies (rows equal; scores to an ulp).
  cache = norms.NormCache.for_source(compact, inv_sqrt=None, matmul_dtype=matmul_dtype, layout="5x8")
  norm = np.maximum(np.linalg.norm(deq[:40].astype(np.float64), axis=1), np.sqrt(np.finfo(np.float32).tiny))
  np.testing.assert_allclose(cache.get(0, 40), 1 / norm, rtol=1e-2)  # row 7 = 0: `hessian.inv_norm`'s floor
  again = retrieval.retrieve(compact, q, k=5, rows_per_chunk=40, matmul_dtype=matmul_dtype)
  for name, a in got.to_arrays().items():
    np.testing.assert_array_equal(getattr(again, name), a, err_msg=name)
  inline = retrieval.retrieve(
    compact, q, k=5, rows_per_chunk=40, matmul_dtype=matmul_dtype, select="reference", transfers_ahead=0, pinned=False
  )
  np.testing.assert_array_equal(inline.top_rows, got.top_rows)
  np.testing.assert_array_equal(inline.bottom_rows, got.bottom_rows)
  np.testing.assert_allclose(inline.top_scores, got.top_scores, rtol=1e-6)
  # In memory (`InMemoryEncodings(dtype=...)`) the same as through the store (last case: cosine, no R).
  mem = retrieval.retrieve(
    retrieval.InMemoryEncodings(x, np.arange(150) * 3, dtype=dtype),
    q,
    k=5,
    rows_per_chunk=40,
    matmul_dtype=matmul_dtype,
  )
  np.testing.assert_array_equal(mem.top_scores, got.top_scores)
  np.testing.assert_array_equal(mem.top_ids, got.top_ids)


def _tiny_lm():
  from trackstar_jax.data import batching  # pylint: disable=g-import-not-at-top
  from trackstar_jax.models import DecoderLM, TransformerConfig  # pylint: disable=g-import-not-at-top

  vocab, seq = 32, 8
  model = DecoderLM(TransformerConfig(vocab_size=vocab, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=seq))
  params = model.init(jax.random.key(0), jnp.ones((1, seq), jnp.int32))
  rng = np.random.default_rng(0)

  def examples(n, first_id):
    tokens = rng.integers(1, vocab, (n, seq)).astype(np.int32)
    pad = np.arange(seq)[None] < rng.integers(4, seq + 1, n)[:, None]
    return batching.Examples(
      inputs=tokens * pad,
      targets=np.roll(tokens, -1, 1) * pad,
      loss_mask=pad.astype(np.float32),
      pad_mask=pad,
      ids=np.arange(first_id, first_id + n, dtype=np.int64),
    )

  return model, params, examples(60, 100), examples(5, 0)


def test_encode_quantizes_on_device_like_the_host_and_ranks_like_bf16(tmp_path):
  model, params, corpus, queries = _tiny_lm()
  enc = tsj.build_encoder(model=model, params=params, d_in=4, d_out=4)
  phi = tsj.encode(enc, corpus)  # float32 in memory
  stores = {
    dt: tsj.encode(enc, corpus, store=str(tmp_path / dt), dtype=dt, chunk_rows=16)
    for dt in ("bfloat16", "int8", "int4")
  }
  for dt in quantize.QUANTIZED:
    s = stores[dt]
    host = quantize.quantize(phi, dt)
    got = s.read(0, 60)
    np.testing.assert_array_equal(got.scale, host.scale)
    np.testing.assert_array_equal(got.phi, host.codes)
    again = tsj.encode(enc, corpus, store=str(tmp_path / dt), dtype=dt, chunk_rows=16)  # resumes: nothing to do
    assert again.is_complete()
    with pytest.raises(store_lib.StoreMismatchError, match="config.store.dtype"):
      tsj.encode(enc, corpus, store=str(tmp_path / dt), dtype="bfloat16", chunk_rows=16)
  res = {dt: tsj.retrieve(encoder=enc, queries=queries, store=s, k=10) for dt, s in stores.items()}
  for dt, min_overlap in (("int8", 0.9), ("int4", 0.7)):
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res[dt].top_ids, res["bfloat16"].top_ids)])
    assert overlap >= min_overlap, (dt, overlap)
