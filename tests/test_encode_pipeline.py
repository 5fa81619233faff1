"""The pipelined encode loop writes bitwise the store of the one-chunk-at-a-time loop; `prefetch` helpers.

Pipelined: batches built on a thread ahead, early device-to-host copies, chunks
collected and written on a collector thread while the next is dispatched. None
of it may change a bit of the store, lose a write, or hide an error.
"""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trackstar_jax as tsj
from trackstar_jax import encoding, prefetch, quantize
from trackstar_jax import store as store_lib
from trackstar_jax.data import batching
from trackstar_jax.models import DecoderLM, TransformerConfig

VOCAB, SEQ = 32, 8


@pytest.fixture(scope="module")
def tiny():
  model = DecoderLM(TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=SEQ))
  params = model.init(jax.random.key(0), jnp.ones((1, SEQ), jnp.int32))
  rng = np.random.default_rng(0)
  n = 70
  tokens = rng.integers(1, VOCAB, (n, SEQ)).astype(np.int32)
  pad = np.arange(SEQ)[None] < rng.integers(3, SEQ + 1, n)[:, None]
  corpus = batching.Examples(
    inputs=tokens * pad,
    targets=np.roll(tokens, -1, 1) * pad,
    loss_mask=pad.astype(np.float32),
    pad_mask=pad,
    ids=np.arange(1000, 1000 + n, dtype=np.int64),
  )
  enc = tsj.build_encoder(model=model, params=params, correction="none", d_in=4, d_out=4)
  return enc, corpus


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8", "int4"])
def test_pipelined_store_equals_unpipelined(tiny, tmp_path, dtype, monkeypatch):
  enc, corpus = tiny
  stores, written = {}, []
  write_rows = store_lib.EncodingStore.write_rows

  def recording_write_rows(self, *, phi, **kw):  # what each loop hands the store: quantized on the device?
    written.append(type(phi).__name__)
    return write_rows(self, phi=phi, **kw)

  monkeypatch.setattr(store_lib.EncodingStore, "write_rows", recording_write_rows)
  # (pipeline, writes in flight, fsync): the previous loop, the pipelined one, and with more writes, no fsync.
  variants = ((False, 2, True), (True, 2, True), (True, 5, False))
  for pipeline, writes, fsync in variants:
    meta = encoding.store_meta(
      enc, num_rows=len(corpus), corpus_fingerprint=encoding.fingerprint(corpus), dtype=dtype, chunk_rows=16
    )
    url = f"file://{tmp_path}/{pipeline}_{writes}.zarr"
    store = (
      encoding.open_or_create(url, meta)
      if fsync
      else store_lib.open_store(url, expected_meta=meta, create=True, fsync=False)
    )
    encoding.encode_to_store(
      enc, corpus, store=store, batch_size=6, pipeline=pipeline, writes_in_flight=writes
    )  # 6: partial batches
    stores[pipeline, writes] = store_lib.open_store(store.url).read(0, len(corpus))
  for part in ("phi", "scale"):  # codes and scales of int8 / int4 (quantized on the device in every loop)
    bits = {
      p: None if getattr(c, part) is None else np.ascontiguousarray(getattr(c, part)).view(np.uint8)
      for p, c in stores.items()
    }
    first = bits[False, 2]
    assert (first is None) == (not quantize.is_quantized(dtype) and part == "scale")
    for other in bits.values():
      assert (other is None) == (first is None)
      if first is not None:
        np.testing.assert_array_equal(other, first)
  stores[True] = stores[True, 2]
  np.testing.assert_array_equal(stores[True].ids, corpus.ids)
  assert len(written) == 3 * 5 and set(written) == {"Quantized" if quantize.is_quantized(dtype) else "ndarray"}
  want = encoding.encode_to_array(enc, corpus, batch_size=6)  # the same phi, in float32
  if quantize.is_quantized(dtype):  # the device's codes are the host quantization of the float32 rows
    codes, scale = quantize.quantize(want, dtype)
    np.testing.assert_array_equal(stores[True].phi, codes)
    np.testing.assert_array_equal(stores[True].scale, scale)
  else:
    np.testing.assert_allclose(np.asarray(stores[True].phi, np.float32), want, rtol=1e-2 if dtype == "bfloat16" else 0)


def test_a_failed_write_stops_the_pipelined_job_and_resume_completes_it(tiny, tmp_path, monkeypatch):
  enc, corpus = tiny
  meta = encoding.store_meta(enc, num_rows=len(corpus), corpus_fingerprint=encoding.fingerprint(corpus), chunk_rows=16)
  clean = encoding.open_or_create(f"file://{tmp_path}/clean.zarr", meta)
  encoding.encode_to_store(enc, corpus, store=clean, batch_size=6)
  write_rows, calls = store_lib.EncodingStore.write_rows, []

  def third_write_fails(self, **kw):  # on the collector thread, while the main thread dispatches
    calls.append(kw["start"])
    if len(calls) == 3:
      raise OSError("disk full")
    return write_rows(self, **kw)

  monkeypatch.setattr(store_lib.EncodingStore, "write_rows", third_write_fails)
  url = f"file://{tmp_path}/resumed.zarr"
  with pytest.raises(OSError, match="disk full"):  # raised in the caller's thread, not lost on the collector's
    encoding.encode_to_store(enc, corpus, store=encoding.open_or_create(url, meta), batch_size=6)
  assert calls == [0, 16, 32]  # nothing written past the failure
  monkeypatch.setattr(store_lib.EncodingStore, "write_rows", write_rows)
  encoding.encode_to_store(enc, corpus, store=encoding.open_or_create(url, meta), batch_size=6)
  got, want = store_lib.open_store(url).read(0, len(corpus)), clean.read(0, len(corpus))
  np.testing.assert_array_equal(np.asarray(got.phi).view(np.uint8), np.asarray(want.phi).view(np.uint8))
  np.testing.assert_array_equal(got.ids, corpus.ids)


def test_default_writes_in_flight_hold_a_bounded_number_of_bytes(tiny, tmp_path, monkeypatch):
  enc, corpus = tiny
  meta = encoding.store_meta(enc, num_rows=len(corpus), corpus_fingerprint=encoding.fingerprint(corpus), chunk_rows=16)
  store = encoding.open_or_create(f"file://{tmp_path}/s.zarr", meta)
  assert store.chunk_bytes == 16 * (enc.dim * 2 + 8)  # bf16 phi and an int64 id per row
  mib = 1 << 20
  for chunk_bytes, want in ((store.chunk_bytes, 8), (512 * mib, 8), (1024 * mib, 4), (1536 * mib, 2), (8192 * mib, 2)):
    monkeypatch.setattr(store_lib.EncodingStore, "chunk_bytes", chunk_bytes)
    assert encoding.writes_in_flight_for(store) == want, chunk_bytes
  monkeypatch.undo()
  seen = []
  writer_init = store_lib.AsyncWriter.__init__

  def recording_init(self, store, *, max_pending):
    seen.append(max_pending)
    writer_init(self, store, max_pending=max_pending)

  monkeypatch.setattr(store_lib.AsyncWriter, "__init__", recording_init)
  encoding.encode_to_store(enc, corpus, store=store, batch_size=6)
  assert seen == [encoding.MAX_WRITES_IN_FLIGHT]  # small chunks: the most writes in flight


def test_phi_batches_prefetched_equal_inline(tiny):
  enc, corpus = tiny
  got = [np.asarray(p) for p, _ in encoding.phi_batches(enc, corpus, batch_size=16)]
  want = [np.asarray(p) for p, _ in encoding.phi_batches(enc, corpus, batch_size=16, prefetch=0)]
  assert len(got) == 5
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_ahead_order_errors_and_early_stop():
  made = []

  def items():
    for i in range(10**6):
      made.append(i)
      yield i

  it = prefetch.ahead(items(), depth=3)
  assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
  it.close()
  n = len(made)
  time.sleep(0.2)
  assert len(made) == n <= 5 + 3 + 1  # the producer stopped, at most `depth` (+ the one in hand) ahead

  def failing():
    yield 1
    raise OSError("disk gone")

  it = prefetch.ahead(failing())
  assert next(it) == 1
  with pytest.raises(OSError, match="disk gone"):
    next(it)


def test_background_calls_run_in_order_and_raise():
  seen, lock = [], threading.Lock()

  def record(x):
    with lock:
      seen.append(x)

  with prefetch.BackgroundCalls(record, depth=2) as calls:
    for i in range(20):
      calls.put(x=i)
  assert seen == list(range(20))

  def fail(x):
    if x == 3:
      raise ValueError("write 3 failed")

  calls = prefetch.BackgroundCalls(fail, depth=1)
  with pytest.raises(ValueError, match="write 3 failed"):
    for i in range(100):
      calls.put(x=i)
      time.sleep(0.001)
    calls.close()
