"""Where can store-to-device streaming go on this host? Page-cache reads, crc32c and device_put rates by threads.

  python benchmarks/probes/probe_stream.py DIR            # GPU host: a 2 GiB bf16 store in DIR
  python benchmarks/probes/probe_stream.py DIR --small    # CPU smoke test (tests/test_benchmarks.py)

A one-off diagnostic (BENCHMARKS.md, Streaming, "where the time goes"), not a benchmark of the
library: it writes a store, then times os.preadv of its chunk files on 1-16 threads, crc32c
(google_crc32c and the crc32c package) on 1-16 threads, TensorStore's reads, and device_put of
one 256 MiB chunk and of 32 MiB pieces (pageable, pinned, staged), and whether a pinned array's
numpy view shares its memory. Prints one line per rate and a final PROBE JSON line.
"""

import concurrent.futures as cf
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from trackstar_jax import store as store_lib  # noqa: E402

try:
  import google_crc32c
except ImportError:
  google_crc32c = None
try:
  import crc32c
except ImportError:
  crc32c = None
root = sys.argv[1]
small = "--small" in sys.argv
n, d, cr = (4096, 64, 256) if small else (262144, 4096, 4096)  # 2 GiB bf16
path = os.path.join(root, "s.zarr")
meta = store_lib.StoreMeta(num_rows=n, dim=d, chunk_rows=cr, dtype="bfloat16")
st = store_lib.open_store(path, expected_meta=meta, create=True)
block = np.random.default_rng(1).normal(size=(cr, d)).astype(jnp.bfloat16)
t = time.perf_counter()
with store_lib.AsyncWriter(st, max_pending=4) as w:
  for c in range(st.num_chunks):
    lo, hi = st.chunk_range(c)
    w.submit(start=lo, ids=np.arange(lo, hi), phi=np.roll(block, c, axis=0))
print("write GB/s", n * d * 2 / (time.perf_counter() - t) / 1e9, flush=True)
files = [os.path.join(path, "phi", "c", str(i), "0") for i in range(n // cr)]
fsz = os.path.getsize(files[0])
out = {}


def rate(label, fn, nbytes, rep=2):
  fn()
  best = 1e9
  for _ in range(rep):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  out[label] = nbytes / best / 1e9
  print(label, f"{out[label]:.2f} GB/s", flush=True)


bufs = [np.empty(fsz, np.uint8) for _ in files]


def read_one(i):
  fd = os.open(files[i], os.O_RDONLY)
  try:
    os.preadv(fd, [bufs[i]], 0)
  finally:
    os.close(fd)


for th in (1, 2, 4, 8, 16):
  with cf.ThreadPoolExecutor(th) as ex:
    rate(f"preadv threads={th}", lambda: list(ex.map(read_one, range(len(files)))), fsz * len(files))
if google_crc32c:
  for th in (1, 4, 8, 16):
    with cf.ThreadPoolExecutor(th) as ex:
      rate(
        f"google_crc32c threads={th}",
        lambda: list(ex.map(lambda b: google_crc32c.value(b[:-4]), bufs)),
        fsz * len(files),
      )
if crc32c:
  for th in (1, 4, 8, 16):
    with cf.ThreadPoolExecutor(th) as ex:
      rate(f"crc32c threads={th}", lambda: list(ex.map(lambda b: crc32c.crc32c(b[:-4]), bufs)), fsz * len(files))
ts_st = store_lib.open_store(path, direct_reads=False)  # phi through TensorStore
for rpc in (cr, 8 * cr):
  rate(
    f"tensorstore iter_chunks rows={rpc} prefetch=4",
    lambda: [None for _ in ts_st.iter_chunks(rows_per_chunk=rpc, prefetch=4)],
    n * d * 2,
    rep=1,
  )
dev = jax.local_devices()[0]
dst = jax.sharding.SingleDeviceSharding(dev)
pin = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
pieces = [bufs[i][:-4].view(jnp.bfloat16).reshape(cr, d) for i in range(len(files))]  # 64 x 32 MiB = 2 GiB
big = np.concatenate(pieces[:8])  # 256 MiB
rate("device_put 256MiB pageable", lambda: jax.device_put(big, dst).block_until_ready(), big.nbytes, rep=3)
pbig = jax.device_put(big, pin)
pbig.block_until_ready()
rate("device_put 256MiB pinned->dev", lambda: jax.device_put(pbig, dst).block_until_ready(), big.nbytes, rep=3)
rate("device_put 256MiB ->pinned staging", lambda: jax.device_put(big, pin).block_until_ready(), big.nbytes, rep=3)
for th in (1, 4, 8, 16):
  with cf.ThreadPoolExecutor(th) as ex:
    rate(
      f"par device_put 32MiB pageable threads={th}",
      lambda: [x.block_until_ready() for x in ex.map(lambda p: jax.device_put(p, dst), pieces)],
      len(pieces) * pieces[0].nbytes,
    )
    rate(
      f"par ->pinned staging threads={th}",
      lambda: [x.block_until_ready() for x in ex.map(lambda p: jax.device_put(p, pin), pieces)],
      len(pieces) * pieces[0].nbytes,
    )
pinned_pieces = [jax.device_put(p, pin) for p in pieces]
jax.block_until_ready(pinned_pieces)
rate(
  "seq pinned->dev pieces",
  lambda: jax.block_until_ready([jax.device_put(p, dst) for p in pinned_pieces]),
  len(pieces) * pieces[0].nbytes,
)
# zero-copy view of a pinned array?
try:
  ptr = pbig.unsafe_buffer_pointer()
  print("pinned unsafe_buffer_pointer ok", hex(ptr))
except Exception as e:
  print("pinned unsafe_buffer_pointer ERR", e)
try:
  v = np.asarray(pbig)
  print("np.asarray(pinned) shares memory:", v.__array_interface__["data"][0] == pbig.unsafe_buffer_pointer())
except Exception as e:
  print("np.asarray pinned ERR", e)
print("PROBE", json.dumps(out))
