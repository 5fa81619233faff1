"""Compact stores: size, write rate and retrieval scan rate of bfloat16 vs int8 vs int4, side by side.

  python benchmarks/bench_compact.py --dir=/tmp/bench_compact      # GPU: d = 2^16, N = 65536 (LAMA-sized)
  python benchmarks/bench_compact.py --small                       # CPU smoke test (tests/test_benchmarks.py)

For each dtype the same N x d Gaussian rows (made on the device chunk by
chunk, seeded per chunk) are written into a local store (int8 / int4 quantized
on the device, as the encode job does) and then scanned by `tsj.retrieve`
(Q queries, top-k and bottom-k, every row; timed after a warm-up scan, with
JAX's persistent compilation cache on so that the timed call does not compile):

  source=store   the whole retrieval from the store: read (page cache: the
                 store was just written), host-to-device copy of the compact
                 chunk, dequantize on device, score, select
  source=memory  the same from host memory (`InMemoryEncodings(dtype=...)`),
                 without the store read

Prints one JSON line per (dtype, source): store bytes, bytes per row, write
seconds, scan seconds, rows/s and stored GB/s. Predicted: the scan is bound by
moving the store to the device (README: ~8 GB/s pageable host-to-device), so
rows/s should grow with the compression, up to 2x (int8) and 3.8x (int4)
the bfloat16 rate, until the step itself (the matmul) is the bound.
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

import trackstar_jax as tsj  # noqa: E402
from trackstar_jax import quantize  # noqa: E402
from trackstar_jax import store as store_lib  # noqa: E402

DTYPES = ("bfloat16", "int8", "int4")


def _rows(seed: int, n: int, d: int) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (n, d), jnp.float32)


def _size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def write_store(url: str, dtype: str, *, n: int, d: int, chunk_rows: int) -> tuple[tsj.EncodingStore, float]:
  """The benchmark rows in a new store of `dtype`; (store, seconds)."""
  if os.path.exists(url):
    shutil.rmtree(url)
  store = tsj.open_store(
    url, expected_meta=store_lib.StoreMeta(num_rows=n, dim=d, dtype=dtype, chunk_rows=chunk_rows), create=True
  )
  if quantize.is_quantized(dtype):
    convert = jax.jit(lambda x: quantize.quantize(x, dtype, xp=jnp))
  else:
    convert = jax.jit(lambda x: x.astype(dtype))
  t = time.perf_counter()
  with store_lib.AsyncWriter(store, max_pending=2) as writer:
    for c in range(store.num_chunks):
      a, b = store.chunk_range(c)
      rows = jax.tree.map(np.asarray, convert(_rows(c, b - a, d)))
      writer.submit(start=a, ids=np.arange(a, b), phi=rows)
  return store, time.perf_counter() - t


def _scan(source, queries, *, k: int, chunk_rows: int, **streaming) -> float:
  tsj.retrieve(query_phi=queries, store=source, k=k, chunk_rows=chunk_rows, **streaming)  # compiles
  t = time.perf_counter()
  tsj.retrieve(query_phi=queries, store=source, k=k, chunk_rows=chunk_rows, **streaming)
  return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke test, not a benchmark")
  p.add_argument("--n", type=int, default=65536, help="corpus rows (LAMA T-REx: ~65k sentences)")
  p.add_argument("--d", type=int, default=65536, help="encoding dimension (the paper's 2^16)")
  p.add_argument("--queries", type=int, default=1024)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--chunk_rows", type=int, default=4096, help="rows per retrieval step (host memory: x2 in flight)")
  p.add_argument("--store_chunk_rows", type=int, default=4096)
  p.add_argument("--dir", default="", help="where the stores go (default: a temporary directory, removed)")
  p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="also scan from memory")
  p.add_argument("--dtypes", default=",".join(DTYPES))
  p.add_argument("--pinned", action=argparse.BooleanOptionalAction, default=None, help="retrieve's pinned staging")
  p.add_argument("--copy_piece_mib", type=int, default=None, help="retrieve's piecewise copies (0: one copy)")
  args = p.parse_args()
  if args.small:
    args.n, args.d, args.queries, args.k, args.chunk_rows, args.store_chunk_rows = 512, 256, 8, 4, 128, 64
  root = args.dir or tempfile.mkdtemp(prefix="bench_compact_")
  os.makedirs(root, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # each retrieve call builds its step anew: compile it once
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  q = np.array(_rows(10**6, args.queries, args.d))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  try:
    for dtype in args.dtypes.split(","):
      url = os.path.join(root, f"{dtype}.zarr")
      store, write_s = write_store(url, dtype, n=args.n, d=args.d, chunk_rows=args.store_chunk_rows)
      nbytes = _size(url)
      base = dict(dtype=dtype, N=args.n, d=args.d, Q=args.queries, k=args.k, chunk_rows=args.chunk_rows)
      base.update(store_bytes=nbytes, bytes_per_row=nbytes / args.n, write_s=write_s, device=str(jax.devices()[0]))
      sources = [("store", store)]
      if args.memory:
        chunk = store.read(0, args.n)  # the store's rows as they are
        if quantize.is_quantized(dtype):
          mem = tsj.InMemoryEncodings.from_codes(chunk.phi, chunk.scale, chunk.ids, dtype=dtype, dim=args.d)
        else:
          mem = tsj.InMemoryEncodings(chunk.phi, chunk.ids)
        sources.append(("memory", mem))
      for name, source in sources:
        streaming = {
          n: v for n, v in (("pinned", args.pinned), ("copy_piece_mib", args.copy_piece_mib)) if v is not None
        }
        scan_s = _scan(source, q, k=args.k, chunk_rows=args.chunk_rows, **streaming)
        r = dict(base, source=name, scan_s=scan_s, rows_per_s=args.n / scan_s, stored_GBps=nbytes / scan_s / 1e9)
        print(json.dumps(r), flush=True)
        print(
          f"{dtype:9s} {name:6s}: {nbytes / 2**20:9.1f} MiB ({nbytes / args.n:8.0f} B/row), write {write_s:7.2f} s, "
          f"scan {scan_s:7.3f} s = {r['rows_per_s']:11.0f} rows/s ({r['stored_GBps']:.2f} GB/s of store)",
          flush=True,
        )
      del store, sources
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
