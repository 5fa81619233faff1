"""Issue 14's ratios, measured side by side in one run: retrieval step, store streaming, encode job.

  python benchmarks/bench_perf.py                    # GPU: every section at full size (~3 min on one H200)
  python benchmarks/bench_perf.py --sections=retrieval,stream
  python benchmarks/bench_perf.py --small            # CPU smoke test (tests/test_benchmarks.py)

retrieval  One `StreamingTopK` step over a device-resident chunk (Q=1024, d=4096,
           C=65536, k=10), no R^{-1/2} and a full one, against a bare bf16 matmul of
           the same [Q, d] x [d, C] (f32 out): select="reference" (the previous
           step), "fused" on a first scan (norms by their own function) and on a
           later scan (norms from the cache), "kernel" (the same with `narrow_topk`'s
           selections, the default on GPUs) on a later scan; the norm function
           alone; and whether fused and kernel == reference bitwise over 3 chunks (one of small integers with
           duplicated rows: ties), with the reference fed the same norms (the
           selection alone) and verbatim (norms inside the step, where XLA may
           round them differently by an ulp).
stream     A bf16 store on local disk (just written, so in the page cache) streamed
           to the device: a plain sequential read of its files (GB/s), the
           store's reads alone (`iter_chunks`, 4 in flight) with phi read
           directly from the chunk files (`chunk_files`, the default for local
           stores) and through TensorStore (direct_reads=False: *_tensorstore),
           the host-to-device copy rate of one chunk from pageable memory, from
           pinned memory and from a dma_map-ped numpy buffer, the feed alone
           (store reads in flight + background copies), and whole
           `retrieval.retrieve` scans with the previous loop (reference step, 2
           reads, inline copies, pageable) and the new one (reads into reused
           dma_map-ped buffers, `host_buffers`; *_fresh_buffers: into new
           pageable ones); feed and scan with direct reads unless named
           *_tensorstore.
encode     The encode job's loop (`encoding.encode_to_store`, exact Adam by default)
           into a local-disk store and into memory://, pipelined and not, against
           the encoder kernel alone and a jitted AdamW training step, all at the
           same batch and sequence length (LAMA shapes: model small, seq 128,
           batch 256, d_in = d_out = 64). With exact Adam, also the kernel and
           the disk job with einsums forced on its layers (*_xla_layers:
           `encoder.layer_kernel="xla"`; the default "auto" takes
           `scaled_projection`'s Pallas kernel on a GPU). disk_write*: the same
           bytes written plainly (os.write, one chunk per file, fsynced or
           not) to the same directory, the rate no disk job can pass.
           --encode_jobs=job_disk_pipelined,... runs only those jobs.

Output: one JSON line per measurement, then "RATIO name value" lines (the
issue's targets: retrieval >= 0.85 no R / >= 0.6 full R, bitwise equal;
stream >= 0.8 of the h2d rate; encode job >= 0.9 of the training step).
Timings: best of --repeat runs (after a warm-up that compiles). BENCHMARKS.md
quotes this script's output.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import trackstar_jax as tsj  # noqa: E402
from trackstar_jax import chunk_files, configs, encoding, host_buffers, losses, mapped_chunks, retrieval  # noqa: E402
from trackstar_jax import mesh as mesh_lib  # noqa: E402
from trackstar_jax import store as store_lib  # noqa: E402
from trackstar_jax.data import batching  # noqa: E402
from trackstar_jax.models import DecoderLM, TransformerConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402

FULL = dict(
  queries=1024, dim=4096, rows=65536, k=10, stream_rows=262144, stream_chunk=32768, store_chunk=4096,
  model="small", dtype="bfloat16", vocab=16384, seq=128, batch=256, d=64, encode_rows=32768, steps=10,
  matmul_n=8192, matmul_steps=100,
)  # fmt: skip
SMALL = dict(
  queries=8, dim=64, rows=1024, k=4, stream_rows=4096, stream_chunk=1024, store_chunk=256,
  model="tiny", dtype="float32", vocab=256, seq=16, batch=8, d=4, encode_rows=64, steps=2,
  matmul_n=64, matmul_steps=2,
)  # fmt: skip

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke test, not a benchmark")
p.add_argument("--sections", default="retrieval,stream,encode")
p.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
p.add_argument("--dir", default="", help="local-disk directory for the stores (default: a temp dir)")
p.add_argument("--correction", default="adam", help="encode: none | adam | adam_rank1 | adafactor")
p.add_argument("--encode_jobs", default="", help="encode: comma-separated job cases to run (default: all)")
p.add_argument("--dims", default="", help="retrieval: comma-separated encoding dims to sweep (default --dim)")
p.add_argument(
  "--trace_dir",
  default="",
  help="also trace the fused step, the default store scan and the disk encode job (jax.profiler; trace_summary.py)",
)
for key, value in FULL.items():
  p.add_argument(f"--{key}", type=type(value), default=None)


def emit(**record) -> dict:
  record["device"] = str(jax.devices()[0])
  print(json.dumps(record), flush=True)
  return record


def ratio(name: str, value: float) -> None:
  print(f"RATIO {name} {value:.3f}", flush=True)


def best_time(fn, wait, repeat: int, steps: int = 1) -> float:
  """Best over `repeat` runs of (`steps` calls of fn, then wait), per call; one untimed warm-up run first."""
  fn()
  wait()
  best = float("inf")
  for _ in range(repeat):
    t = time.perf_counter()
    for _ in range(steps):
      fn()
    wait()
    best = min(best, (time.perf_counter() - t) / steps)
  return best


def trace(a, name: str, fn, wait, steps: int = 10) -> None:
  """`steps` calls of fn under jax.profiler; emits what the device did (trace_summary)."""
  log_dir = os.path.join(a.trace_dir, name)
  with trace_summary.traced(log_dir):
    for _ in range(steps):
      fn()
    wait()
  emit(section="trace", name=name, steps=steps, **trace_summary.summarize(log_dir))


# --- retrieval --------------------------------------------------------------------------------------------


def _state(topk):
  return tuple(np.asarray(x) for x in topk.local_result())


def retrieval_case(a, *, full_inv: bool) -> None:
  rng = np.random.default_rng(0)
  q_n, d, c, k = a.queries, a.dim, a.rows, a.k
  q = rng.normal(size=(q_n, d)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  inv = None
  if full_inv:  # a dense SPD-like R^{-1/2}: speed does not depend on its values
    m = rng.normal(size=(d, d)).astype(np.float32) / np.sqrt(d)
    inv = np.eye(d, dtype=np.float32) + 0.1 * (m + m.T)
  keys = jax.random.split(jax.random.key(0), 3)  # made on the device: numpy would take seconds at full size
  tied = jax.random.randint(keys[1], (c, d), -2, 3).astype(jnp.bfloat16)
  tied = tied.at[::17].set(tied[3])  # duplicated rows: equal scores
  phis = [jax.random.normal(keys[0], (c, d), jnp.bfloat16), tied, jax.random.normal(keys[2], (c, d), jnp.bfloat16)]
  ids = np.arange(c)
  mesh = mesh_lib.make_mesh(devices=jax.local_devices()[:1])
  out = [None]
  mm = jax.jit(lambda x, y: jnp.dot(x, y.T, preferred_element_type=jnp.float32))
  qb = jnp.asarray(q, jnp.bfloat16)
  t_mm = best_time(
    lambda: out.__setitem__(0, mm(qb, phis[0])), lambda: jax.block_until_ready(out[0]), a.repeat, a.steps
  )
  results, times = {}, {}
  norm_fn = retrieval.StreamingTopK(q, k=k, mesh=mesh, inv_sqrt=inv)  # the fused step's norms, shared below
  variants = ("reference", "fused_first", "fused_cached", "kernel_cached")
  for variant in variants:
    select = variant.split("_")[0]
    topk = retrieval.StreamingTopK(q, k=k, mesh=mesh, inv_sqrt=inv, select=select)
    chunk = topk.put(start=0, ids=ids, phi=phis[0])
    if variant.endswith("_cached"):
      chunk = chunk._replace(inv_norms=topk.update_device(chunk))
    times[variant] = best_time(lambda: topk.update_device(chunk), topk.wait, a.repeat, a.steps)  # noqa: B023
    if a.trace_dir and variant.endswith("_cached") and d == FULL["dim"]:
      trace(a, f"retrieval_{'full' if full_inv else 'no'}_inv_{variant}", lambda: topk.update_device(chunk), topk.wait)  # noqa: B023
    if variant == "fused_first":
      norm_out = [None]
      times["norms"] = best_time(
        lambda: norm_out.__setitem__(0, norm_fn.update_device(chunk)),  # noqa: B023
        lambda: jax.block_until_ready(norm_out[0]),
        a.repeat,
        a.steps,
      )
  # Equality over 3 chunks: fused (first scan; later scan = cached norms, the same values) vs the reference
  # step fed the same norms (the selection alone), and vs the reference step verbatim (norms inside it).
  for variant, select, shared in (
    ("fused", "fused", False),
    ("kernel", "kernel", False),
    ("reference", "reference", True),
    ("inline", "reference", False),
  ):
    check = retrieval.StreamingTopK(q, k=k, mesh=mesh, inv_sqrt=inv, select=select)
    for j, phi in enumerate(phis):
      ch = check.put(start=j * c, ids=ids, phi=phi)
      if shared:
        ch = ch._replace(inv_norms=norm_fn.update_device(norm_fn.put(start=j * c, ids=ids, phi=phi)))
      check.update_device(ch)
    results[variant] = _state(check)
  flops = 2 * q_n * c * d
  equal = {
    v: all(np.array_equal(x, y) for x, y in zip(results[v], results["reference"]))
    for v in ("fused", "kernel", "inline")
  }
  rows_equal = all(np.array_equal(results["fused"][i], results["inline"][i]) for i in (1, 3))
  max_diff = max(float(np.nanmax(np.abs(results["fused"][i] - results["inline"][i]))) for i in (0, 2))
  r = emit(
    section="retrieval", Q=q_n, d=d, C=c, k=k, full_inv=full_inv, matmul_ms=t_mm * 1e3,
    matmul_tflops=flops / t_mm / 1e12, **{f"{v}_ms": t * 1e3 for v, t in times.items()},
    **{f"{v}_ratio": t_mm / times[v] for v in variants},
    bitwise_equal=equal["fused"], kernel_bitwise_equal=equal["kernel"], bitwise_equal_inline_norms=equal["inline"],
    rows_equal_inline_norms=rows_equal,
    max_score_diff_inline_norms=max_diff,
  )  # fmt: skip
  tag = ("full_inv" if full_inv else "no_inv") + ("" if d == FULL["dim"] or a.small else f"_d{d}")
  for v in variants:
    ratio(f"retrieval_{tag}_{v}_vs_matmul", r[f"{v}_ratio"])
  ratio(f"retrieval_{tag}_bitwise_equal", float(equal["fused"]))
  ratio(f"retrieval_{tag}_kernel_bitwise_equal", float(equal["kernel"]))
  ratio(f"retrieval_{tag}_bitwise_equal_inline_norms", float(equal["inline"]))


# --- streaming --------------------------------------------------------------------------------------------


def _write_store(url: str, n: int, d: int, chunk_rows: int) -> store_lib.EncodingStore:
  meta = store_lib.StoreMeta(num_rows=n, dim=d, chunk_rows=chunk_rows, dtype="bfloat16")
  store = store_lib.open_store(url, expected_meta=meta, create=True)
  block = np.random.default_rng(1).normal(size=(chunk_rows, d)).astype(jnp.bfloat16)
  with store_lib.AsyncWriter(store, max_pending=4) as w:
    for c in range(store.num_chunks):
      lo, hi = store.chunk_range(c)
      w.submit(start=lo, ids=np.arange(lo, hi), phi=np.roll(block, c, axis=0)[: hi - lo])
  return store


def _gbps(nbytes: int, seconds: float) -> float:
  return nbytes / seconds / 1e9


def stream_section(a, root: str) -> None:
  n, d, rows = a.stream_rows, a.dim, a.stream_chunk
  path = os.path.join(root, "stream.zarr")
  t = time.perf_counter()
  store = _write_store(path, n, d, a.store_chunk)
  write_s = time.perf_counter() - t
  nbytes = n * d * 2
  files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(path, "phi")) for f in fs]

  def read_files():
    for f in sorted(files):
      with open(f, "rb") as fh:
        while fh.read(1 << 24):
          pass

  seq_s = best_time(read_files, lambda: None, a.repeat)
  ts_store = store_lib.open_store(path, direct_reads=False)  # phi through TensorStore: the path before chunk_files
  if not store.direct_reads or ts_store.direct_reads:
    raise RuntimeError(
      f"{path}: direct reads are {store.direct_reads} (expected on) with direct_reads=True and {ts_store.direct_reads} "
      "with direct_reads=False: is google-crc32c installed (pip install google-crc32c), TRACKSTAR_DIRECT_READS unset?"
    )

  def read_store(s):
    for _ in s.iter_chunks(rows_per_chunk=rows, prefetch=4):
      pass

  read_s = {
    "store_read_direct": best_time(lambda: read_store(store), lambda: None, a.repeat),
    "store_read_tensorstore": best_time(lambda: read_store(ts_store), lambda: None, a.repeat),
  }
  dev = jax.local_devices()[0]
  chunk = np.asarray(store.read(0, rows).phi)
  dst = jax.sharding.SingleDeviceSharding(dev)
  out = [None]
  pageable_s = best_time(
    lambda: out.__setitem__(0, jax.device_put(chunk, dst)), lambda: out[0].block_until_ready(), a.repeat
  )
  pinned = jax.device_put(chunk, jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"))
  pinned.block_until_ready()
  pinned_s = best_time(
    lambda: out.__setitem__(0, jax.device_put(pinned, dst)), lambda: out[0].block_until_ready(), a.repeat
  )
  stage_s = best_time(
    lambda: out.__setitem__(0, jax.device_put(chunk, pinned.sharding)), lambda: out[0].block_until_ready(), a.repeat
  )
  piece = 32 << 20
  mapped_s = None
  if host_buffers.dma_unsupported(dev.client) is None and dev.platform != "cpu":  # device_put from a dma_map-ped
    mapped_pool = host_buffers.BufferPool(chunk.nbytes, 1, register=dev.client.dma_map, unregister=dev.client.dma_unmap)
    buf = mapped_pool.take()
    buf[:] = chunk.reshape(-1).view(np.uint8)
    mapped_pool.release(buf)
    mapped = mapped_pool.take().view(chunk.dtype).reshape(chunk.shape)  # reused: now registered
    mapped_s = best_time(
      lambda: out.__setitem__(0, jax.device_put(mapped, dst)), lambda: out[0].block_until_ready(), a.repeat
    )
    mapped_pool.close()
  pieces_s = {  # retrieval.put_in_pieces: 32 MiB copies, joined on the device (copy_piece_mib=32)
    f"h2d_pieces{'_pinned' if p else ''}": best_time(
      lambda p=p: out.__setitem__(0, retrieval.put_in_pieces(chunk, dst, piece_bytes=piece, pinned=p)),
      lambda: out[0].block_until_ready(),
      a.repeat,
    )
    for p in (False, True)
  }
  q = np.random.default_rng(2).normal(size=(a.queries, d)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  mesh = mesh_lib.make_mesh(devices=jax.local_devices()[:1])

  def feed(
    reads, ahead, pinned_on, src=store, piece_mib=retrieval.RetrieveOptions.copy_piece_mib, pool_on=False,
    mapped_on=False, defer=True,
  ):  # fmt: skip
    topk = retrieval.StreamingTopK(q, k=a.k, mesh=mesh, copy_piece_mib=piece_mib)
    pool = None
    if pool_on:  # as retrieve(pinned_reads=True): reused dma_map-ped read buffers, kept across scans
      pool = host_buffers.shared_pool([dev], nbytes=src.phi_bytes(rows), max_buffers=reads + ahead + 1)
    windows = mapped_chunks.shared_windows([dev]) if mapped_on else None  # as retrieve(mapped_reads=True)
    last = None
    chunks = src.iter_chunks(
      rows_per_chunk=rows, prefetch=reads, buffers=pool, windows=windows, defer_checks=mapped_on and defer
    )  # as retrieve reads them
    for ch in retrieval.device_chunks(topk, chunks, pad_to=rows, ahead=ahead, pinned=pinned_on, buffers=pool):
      last = ch.phi
    last.block_until_ready()
    if pool is not None:
      pool.drain()

  feeds = {
    "feed_previous": (2, 0, False, ts_store, 0),  # the previous loop: TensorStore, 2 reads, inline whole copies
    "feed_mapped": (4, 2, False, store, 0, True, True),  # the defaults: chunk files mapped, page-locked (CUDA)
    "feed_mapped_checked_first": (4, 2, False, store, 0, True, True, False),  # each copy after its crc32c checks
    "feed_pinned_reads": (4, 2, False, store, 0, True),  # direct reads into reused dma_map-ped buffers
    "feed_pageable": (4, 2, False),  # direct reads into fresh buffers, one pageable copy per chunk (run 6's default)
    "feed_pinned": (4, 2, True),
    "feed_pageable_pieces": (4, 2, False, store, 32),  # 32 MiB copies joined on the device
    "feed_tensorstore": (4, 2, False, ts_store),  # phi read through TensorStore
  }
  feed_s = {name: best_time(lambda cfg=cfg: feed(*cfg), lambda: None, a.repeat) for name, cfg in feeds.items()}
  scans = {
    "retrieve_previous": dict(
      select="reference", reads_in_flight=2, transfers_ahead=0, pinned=False, cache_norms=False, copy_piece_mib=0
    ),
    "retrieve_new": dict(cache_norms=False),  # the defaults (mapped_reads=True: the page cache DMA-ed, on CUDA)
    "retrieve_new_buffered": dict(mapped_reads=False, cache_norms=False),  # the previous defaults (run B7)
    "retrieve_new_fresh_buffers": dict(pinned_reads=False, mapped_reads=False, cache_norms=False),  # run 6's
    "retrieve_new_pinned": dict(pinned=True, mapped_reads=False, cache_norms=False),
    "retrieve_new_pieces": dict(copy_piece_mib=32, mapped_reads=False, cache_norms=False),
    "retrieve_new_tensorstore": dict(cache_norms=False),
  }
  scan_s = {
    name: best_time(
      lambda name=name, kw=kw: retrieval.retrieve(
        ts_store if name.endswith(("_tensorstore", "_previous")) else store,
        q,
        k=a.k,
        rows_per_chunk=rows,
        mesh=mesh,
        **kw,
      ),
      lambda: None,
      a.repeat,
    )
    for name, kw in scans.items()
  }
  # A scan's fixed costs, paid once per `retrieve` whatever the store's size: the step's set-up (queries to the
  # device, state made), the final merge copied back, the ids of the 2 Q k results read from the store, and
  # the check that every chunk is committed (listings; these two grow with the store's chunks).
  # With the pipeline's fill (the first chunk's read and copy) they set the scan's rate on a small store.
  topk0 = retrieval.StreamingTopK(q, k=a.k, mesh=mesh)
  hits = np.random.default_rng(3).integers(0, n, size=(2, a.queries, a.k))
  fixed_s = dict(
    init_s=best_time(lambda: retrieval.StreamingTopK(q, k=a.k, mesh=mesh).wait(), lambda: None, a.repeat),
    result_s=best_time(topk0.local_result, lambda: None, a.repeat),
    read_ids_s=best_time(lambda: store.read_ids(hits), lambda: None, a.repeat),
    require_complete_s=best_time(store.require_complete, lambda: None, a.repeat),
    scan_s=scan_s["retrieve_new"],
  )
  if a.trace_dir:
    trace(
      a, "retrieve_new",
      lambda: retrieval.retrieve(store, q, k=a.k, rows_per_chunk=rows, mesh=mesh, cache_norms=False),
      lambda: None, steps=3,
    )  # fmt: skip
  first_scans = {
    "retrieve_new_fresh_buffers_one_scan": dict(pinned_reads=False, mapped_reads=False),
    "retrieve_new_buffered_first_scan": dict(mapped_reads=False),
    "retrieve_new_first_scan": {},  # the defaults: windows registered by the warm-up thread as the scan runs
    "retrieve_new_first_scan_warmed": {},  # after `map_store_ahead` finished (as while tsj.retrieve encodes)
  }
  warm_s = None
  for name, kw in first_scans.items():
    host_buffers.clear()  # a process's first scan: its read buffers made, faulted in and registered on the way
    mapped_chunks.clear()
    if name.endswith("_warmed"):
      t = time.perf_counter()
      ahead = retrieval.map_store_ahead(store, rows_per_chunk=rows, mesh=mesh)
      if ahead is not None:
        ahead.result()
        warm_s = time.perf_counter() - t
    t = time.perf_counter()  # one scan each, not the best of several: what a one-off job over this store sees
    retrieval.retrieve(store, q, k=a.k, rows_per_chunk=rows, mesh=mesh, cache_norms=False, **kw)
    scan_s[name] = time.perf_counter() - t
  # Does registering stall the device's compute (as it stalls copies)? Matmuls dispatched one by one, alone
  # and while a warm-up registers the whole store (what tsj.retrieve overlaps with encoding the queries).
  mm_x = jnp.ones((a.matmul_n, a.matmul_n), jnp.bfloat16)
  mm_f = jax.jit(lambda x: (x @ x) * 0.5)
  mm_steps = max(1, int(a.matmul_steps))

  def matmuls():
    y = mm_x
    for _ in range(mm_steps):
      y = mm_f(y)
    y.block_until_ready()

  matmuls()
  t = time.perf_counter()
  matmuls()
  matmul_alone_s = time.perf_counter() - t
  mapped_chunks.clear()
  ahead = retrieval.map_store_ahead(store, rows_per_chunk=rows, mesh=mesh)
  t = time.perf_counter()
  matmuls()
  matmul_during_warm_s = time.perf_counter() - t
  warm_overlapped = ahead is not None and not ahead.done()  # the warm-up outlasted the matmuls
  if ahead is not None:
    ahead.result()
  rates = dict(
    sequential_read=_gbps(nbytes, seq_s),
    h2d_pageable=_gbps(chunk.nbytes, pageable_s),
    h2d_pinned=_gbps(chunk.nbytes, pinned_s),
    pinned_staging=_gbps(chunk.nbytes, stage_s),
    **({} if mapped_s is None else {"h2d_dma_mapped": _gbps(chunk.nbytes, mapped_s)}),
    **{k: _gbps(chunk.nbytes, v) for k, v in pieces_s.items()},
    **{k: _gbps(nbytes, v) for k, v in {**read_s, **feed_s, **scan_s}.items()},
  )
  emit(
    section="stream", rows=n, d=d, chunk_rows=rows, store_chunk_rows=a.store_chunk, store_gib=nbytes / 2**30,
    write_s=write_s, gbps=rates, queries=a.queries, k=a.k, read_threads=chunk_files.THREADS,
    warm_s=warm_s, warm_gbps=None if not warm_s else _gbps(nbytes, warm_s), matmul_alone_s=matmul_alone_s,
    matmul_during_warm_s=matmul_during_warm_s, warm_outlasted_matmuls=warm_overlapped, fixed_s=fixed_s,
  )  # fmt: skip
  ratio("stream_matmul_during_warm_vs_alone", matmul_alone_s / matmul_during_warm_s)
  copies = ("h2d_pageable", "h2d_pinned", "h2d_dma_mapped", "h2d_pieces", "h2d_pieces_pinned")
  h2d = max(rates[k] for k in copies if k in rates)  # the best copy
  for name in (*feeds, *scan_s):
    ratio(f"stream_{name}_vs_h2d", rates[name] / h2d)
  ratio("stream_store_read_direct_vs_sequential_read", rates["store_read_direct"] / rates["sequential_read"])
  ratio("stream_store_read_direct_vs_tensorstore", rates["store_read_direct"] / rates["store_read_tensorstore"])
  ratio("stream_retrieve_new_vs_tensorstore", rates["retrieve_new"] / rates["retrieve_new_tensorstore"])
  ratio("stream_retrieve_new_vs_sequential_read", rates["retrieve_new"] / rates["sequential_read"])
  ratio("stream_retrieve_new_vs_previous", rates["retrieve_new"] / rates["retrieve_previous"])
  ratio("stream_retrieve_new_vs_fresh_buffers", rates["retrieve_new"] / rates["retrieve_new_fresh_buffers"])
  ratio("stream_retrieve_new_vs_buffered", rates["retrieve_new"] / rates["retrieve_new_buffered"])
  ratio("stream_feed_mapped_vs_checked_first", rates["feed_mapped"] / rates["feed_mapped_checked_first"])
  ratio(
    "stream_first_scan_vs_fresh_buffers_one_scan",
    rates["retrieve_new_first_scan"] / rates["retrieve_new_fresh_buffers_one_scan"],
  )
  shutil.rmtree(path, ignore_errors=True)


# --- encode job -------------------------------------------------------------------------------------------


def _lama_like(rng, n: int, seq: int, vocab: int) -> batching.Examples:
  """Short sentences padded to seq (LAMA T-REx: ~20-60 tokens of 128), loss on every real token."""
  lengths = rng.integers(max(2, seq // 6), max(3, seq // 2), n)
  tokens = rng.integers(1, vocab, (n, seq)).astype(np.int32)
  pad = np.arange(seq)[None] < lengths[:, None]
  return batching.Examples(
    inputs=tokens * pad,
    targets=np.roll(tokens, -1, 1) * pad,
    loss_mask=pad.astype(np.float32),
    pad_mask=pad,
    ids=np.arange(n, dtype=np.int64),
  )


def encode_section(a, root: str) -> None:
  mc = configs.model_config(a.model, max_len=a.seq)
  mc.dtype = a.dtype
  model = DecoderLM(TransformerConfig.from_config(mc, vocab_size=a.vocab))
  rng = np.random.default_rng(0)
  examples = _lama_like(rng, a.encode_rows, a.seq, a.vocab)
  batch = examples.batch(np.arange(a.batch))
  params = jax.jit(model.init)(jax.random.key(0), batch["inputs"][:1])
  # Training step (AdamW), donated, on a device-resident batch: the rate the job is held to.
  tx = optax.adamw(1e-4)
  state = [params, tx.init(params)]
  gbatch = jax.device_put(batch)

  def train_step(params, opt_state, b):
    loss, g = jax.value_and_grad(lambda p: losses.mean_token_loss(model.apply(p, b["inputs"], b["pad_mask"]), b))(
      params
    )
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  jstep = jax.jit(train_step, donate_argnums=(0, 1))
  out = [None]

  def run_train():
    state[0], state[1], out[0] = jstep(state[0], state[1], gbatch)

  train_s = best_time(run_train, lambda: jax.block_until_ready(out[0]), a.repeat, a.steps)
  params = state[0]
  st = None
  if a.correction in ("adam", "adam_rank1"):  # synthetic positive second moments (speed does not depend on them)
    st = optax.scale_by_adam().init(params)
    st = st._replace(nu=jax.tree.map(lambda x: jnp.full(x.shape, 1e-4, jnp.float32) * (1 + 0.01 * jnp.cos(x)), st.nu))
  elif a.correction == "adafactor":
    st = optax.scale_by_factored_rms(min_dim_size_to_factor=32).init(params)
    st = jax.tree.map(lambda x: x + 1e-4 if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
  encoders, kernel_s = {}, {}
  # Exact Adam's layers: the default (`encoder.layer_kernel="auto"`: `scaled_projection`'s Pallas kernel on
  # a GPU) and einsums forced ("xla"), side by side.
  for kernel in ("auto", "xla") if a.correction == "adam" else ("auto",):
    enc = tsj.build_encoder(
      model=model,
      params=params,
      opt_state=st,
      seq_len=a.seq,
      d_in=a.d,
      d_out=a.d,
      correction=a.correction,
      layer_kernel=kernel,
    )
    kernel_s[kernel] = best_time(
      lambda enc=enc: out.__setitem__(0, enc.encode(batch)), lambda: jax.block_until_ready(out[0]), a.repeat, a.steps
    )
    encoders[kernel] = enc
  enc = encoders["auto"]
  meta = encoding.store_meta(enc, num_rows=len(examples), corpus_fingerprint=encoding.fingerprint(examples))
  for e in encoders.values():  # compiles what the job's batches need
    warm = store_lib.open_store(f"memory://bench_enc_{os.getpid()}_warm{id(e)}", expected_meta=meta, create=True)
    encoding.encode_to_store(e, examples, store=warm, batch_size=a.batch)
  job_s = {}
  jobs = (  # (name, url, pipelined loop, writes in flight, fsync, phi written directly to its chunk files)
    ("job_disk_pipelined", os.path.join(root, "enc_p"), True, None, True, True),  # the defaults
    ("job_disk_writes2", os.path.join(root, "enc_2"), True, 2, True, True),  # the default of runs E1 and E2
    ("job_disk_writes4", os.path.join(root, "enc_4"), True, 4, True, True),
    ("job_disk_tensorstore", os.path.join(root, "enc_t"), True, 2, True, False),  # before direct writes
    ("job_disk_previous_loop", os.path.join(root, "enc_u"), False, 2, True, False),
    ("job_disk_writes8", os.path.join(root, "enc_w"), True, 8, True, True),
    ("job_disk_writes8_nosync", os.path.join(root, "enc_n"), True, 8, False, True),
    ("job_memory_pipelined", f"memory://bench_enc_{os.getpid()}_p", True, None, True, False),
    ("job_memory_previous_loop", f"memory://bench_enc_{os.getpid()}_u", False, 2, True, False),
  )
  if "xla" in encoders:
    jobs += (("job_disk_pipelined_xla_layers", os.path.join(root, "enc_x"), True, None, True, True),)
  only = set(a.encode_jobs.split(",")) if a.encode_jobs else None
  for name, url, pipeline, writes, fsync, direct in jobs:
    if only and name not in only:
      continue
    job_enc = encoders["xla" if name.endswith("_xla_layers") else "auto"]
    best = float("inf")
    for rep in range(min(2, a.repeat)):  # whole jobs: seconds each, little spread
      # A new URL per run: reopening a finished store would resume it with nothing left to encode.
      run_url = f"{url}_{rep}"
      store = store_lib.open_store(run_url, expected_meta=meta, create=True, fsync=fsync, direct_writes=direct)
      if store.completed_chunks():
        raise RuntimeError(f"{run_url} is not empty: the timing would measure a resume.")
      t = time.perf_counter()
      if a.trace_dir and rep == 1 and name == "job_disk_pipelined":
        with trace_summary.traced(os.path.join(a.trace_dir, name)):
          encoding.encode_to_store(
            job_enc, examples, store=store, batch_size=a.batch, pipeline=pipeline, writes_in_flight=writes
          )
        emit(section="trace", name=name, **trace_summary.summarize(os.path.join(a.trace_dir, name)))
      else:
        encoding.encode_to_store(
          job_enc, examples, store=store, batch_size=a.batch, pipeline=pipeline, writes_in_flight=writes
        )
      best = min(best, time.perf_counter() - t)
      if run_url.startswith("/"):
        shutil.rmtree(run_url, ignore_errors=True)
    job_s[name] = best
  rates = dict(train=a.batch / train_s, kernel=a.batch / kernel_s["auto"])
  # The disk's own rate for the job's bytes (files of one chunk, written and fsynced as the job's store
  # does): the rows/s a job into this directory cannot pass, whatever the device does.
  row_bytes, chunk_bytes = int(enc.dim) * 2, meta.chunk_rows * int(enc.dim) * 2
  disk_s = {
    sync: _plain_write_s(os.path.join(root, "plain"), len(examples) * row_bytes, chunk_bytes, fsync=sync)
    for sync in (True, False)
  }
  rates.update(disk_write=len(examples) / disk_s[True], disk_write_nosync=len(examples) / disk_s[False])
  if "xla" in kernel_s:
    rates["kernel_xla_layers"] = a.batch / kernel_s["xla"]
  rates.update({k: len(examples) / v for k, v in job_s.items()})
  emit(
    section="encode", model=a.model, dtype=a.dtype, seq=a.seq, batch=a.batch, rows=len(examples), dim=int(enc.dim),
    correction=a.correction, layer_modes=sorted(set(enc.modes().values())),
    layer_kernels=sorted(set(enc.projector.layer_kernels().values())), examples_per_s=rates,
    store_mb_per_s_at_job=rates.get("job_disk_pipelined", 0.0) * row_bytes / 1e6,
    disk_write_mb_per_s=rates["disk_write"] * row_bytes / 1e6,
    disk_write_nosync_mb_per_s=rates["disk_write_nosync"] * row_bytes / 1e6,
  )  # fmt: skip
  if "kernel_xla_layers" in rates:
    ratio("encode_kernel_xla_layers_vs_kernel", rates["kernel_xla_layers"] / rates["kernel"])
  for name in ("kernel", *(["kernel_xla_layers"] if "kernel_xla_layers" in rates else []), *job_s):
    ratio(f"encode_{name}_vs_train", rates[name] / rates["train"])
  for name in job_s:
    ratio(f"encode_{name}_vs_kernel", rates[name] / rates["kernel"])
  for name in ("kernel", *job_s):
    ratio(f"encode_{name}_vs_disk_write", rates[name] / rates["disk_write"])


def _plain_write_s(directory: str, nbytes: int, file_bytes: int, *, fsync: bool) -> float:
  """Seconds to write nbytes as files of file_bytes with plain os.write (each fsynced if asked), then remove them."""
  os.makedirs(directory, exist_ok=True)
  block = np.random.default_rng(2).bytes(min(file_bytes, 1 << 24))
  t = time.perf_counter()
  for i in range(-(-nbytes // file_bytes)):
    left = min(file_bytes, nbytes - i * file_bytes)
    fd = os.open(os.path.join(directory, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      while left > 0:
        left -= os.write(fd, block[:left])
      if fsync:
        os.fsync(fd)
    finally:
      os.close(fd)
  seconds = time.perf_counter() - t
  shutil.rmtree(directory, ignore_errors=True)
  return seconds


def main() -> None:
  a = p.parse_args()
  for key, value in (SMALL if a.small else FULL).items():
    if getattr(a, key) is None:
      setattr(a, key, value)
  sections = [s for s in a.sections.split(",") if s]
  unknown = set(sections) - {"retrieval", "stream", "encode"}
  if unknown:
    p.error(f"unknown sections {sorted(unknown)}")
  root = a.dir or tempfile.mkdtemp(prefix="bench_perf_")
  os.makedirs(root, exist_ok=True)
  try:
    if "retrieval" in sections:
      for dim in [int(x) for x in a.dims.split(",")] if a.dims else [a.dim]:
        a.dim = dim
        retrieval_case(a, full_inv=False)
        if dim <= 8192:  # a full [d, d] R^{-1/2}: beyond this the paper's R is block-diagonal
          retrieval_case(a, full_inv=True)
    if "stream" in sections:
      stream_section(a, root)
    if "encode" in sections:
      encode_section(a, root)
  finally:
    if not a.dir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
