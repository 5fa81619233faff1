"""Can the store feed skip the staging copy? device_put from DMA-mapped (page-locked) host buffers.

  python benchmarks/probes/probe_dma.py DIR            # GPU host: a 2 GiB bf16 store in DIR
  python benchmarks/probes/probe_dma.py DIR --small    # CPU smoke test (tests/test_benchmarks.py)

A one-off diagnostic (BENCHMARKS.md, Streaming), not a benchmark of the library. PJRT copies a
numpy array to a GPU through a staging buffer unless the array lies in memory registered with
`client.dma_map`. This times, on one 256 MiB chunk: device_put from fresh pageable memory, from a
jax pinned_host array, and from a dma_map-ped numpy buffer (checking the device gets the bytes);
then the whole store read with the library's chunk-file reader into reused dma_map-ped buffers,
alone and with each chunk's device_put (a buffer is reused once its copy is done), checked and
unchecked (one preadv: the ceiling of any checked read); the host's memory-copy bandwidth; the
disk past the page cache (O_DIRECT); and whether a read-only or a writable shared mmap of a chunk
file can be dma_map-ped (zero-copy from the page cache). One line per rate, then NOTES and PROBE
JSON lines.
"""

import collections
import concurrent.futures as cf
import json
import mmap
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from trackstar_jax import chunk_files  # noqa: E402
from trackstar_jax import store as store_lib  # noqa: E402

root = sys.argv[1]
small = "--small" in sys.argv
n, d, cr, rows = (4096, 64, 256, 1024) if small else (262144, 4096, 4096, 32768)  # 2 GiB bf16, 256 MiB chunks
path = os.path.join(root, "s.zarr")
meta = store_lib.StoreMeta(num_rows=n, dim=d, chunk_rows=cr, dtype="bfloat16")
st = store_lib.open_store(path, expected_meta=meta, create=True)
block = np.random.default_rng(1).normal(size=(cr, d)).astype(jnp.bfloat16)
with store_lib.AsyncWriter(st, max_pending=4) as w:
  for c in range(st.num_chunks):
    lo, hi = st.chunk_range(c)
    w.submit(start=lo, ids=np.arange(lo, hi), phi=np.roll(block, c, axis=0))
files = chunk_files.ChunkFiles(os.path.join(path, "phi"), chunk_rows=cr, num_rows=n, cols=d, dtype=jnp.bfloat16)
dev = jax.local_devices()[0]
client = dev.client
dst = jax.sharding.SingleDeviceSharding(dev)
out, notes = {}, {}
chunk_bytes = rows * d * 2


def rate(label, fn, nbytes, rep=3):
  fn()
  best = 1e9
  for _ in range(rep):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  out[label] = nbytes / best / 1e9
  print(label, f"{out[label]:.2f} GB/s", flush=True)


def mapped_buffer(nbytes):
  """A page-aligned anonymous buffer, dma_map-ped when the client can (else plain)."""
  mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
  buf = np.frombuffer(mm, np.uint8)
  try:
    client.dma_map(buf.ctypes.data, nbytes)
    return buf, True
  except Exception as e:  # noqa: BLE001 - the CPU client has no dma_map: the probe still runs
    notes.setdefault("dma_map_error", str(e)[:200])
    return buf, False


def read_into(buf, start):
  """The library's chunk-file reader, into `buf` (rows [start, start + rows)): its per-file tasks, checked."""
  flat = buf[:chunk_bytes]
  pool = chunk_files.executor()
  c0, c1 = start // cr, -(-(start + rows) // cr)
  return [pool.submit(files._read_chunk, c, start, start + rows, flat) for c in range(c0, c1)]  # noqa: SLF001


for flags in ("MAP_SHARED", "MAP_PRIVATE"):  # what a new buffer costs: first-touch page faults, then registration
  for touched in (False, True):
    fresh_buf = np.frombuffer(mmap.mmap(-1, chunk_bytes, flags=getattr(mmap, flags)), np.uint8)
    t = time.perf_counter()
    if touched:
      fresh_buf[::4096] = 1
    t_touch = time.perf_counter() - t
    try:
      t = time.perf_counter()
      client.dma_map(fresh_buf.ctypes.data, chunk_bytes)
      notes[f"{flags} dma_map_{'touched' if touched else 'untouched'}_ms"] = round((time.perf_counter() - t) * 1e3, 1)
      client.dma_unmap(fresh_buf.ctypes.data)
    except Exception:  # noqa: BLE001, S110 - the CPU client: see dma_map_error
      pass
    if touched:
      notes[f"{flags} first_touch_ms"] = round(t_touch * 1e3, 1)
    del fresh_buf
ref = np.asarray(st.read(0, rows).phi)
fresh = lambda: np.array(ref)  # noqa: E731 - fresh pageable memory each time, as the library's reads give
rate("h2d fresh pageable", lambda: jax.device_put(fresh(), dst).block_until_ready(), chunk_bytes)
rate("h2d reused pageable", lambda: jax.device_put(ref, dst).block_until_ready(), chunk_bytes)
pin = jax.device_put(ref, jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"))
rate("h2d pinned_host array", lambda: jax.device_put(pin, dst).block_until_ready(), chunk_bytes)
buf0, mapped = mapped_buffer(chunk_bytes)
notes["dma_map"] = mapped
buf0[:] = ref.reshape(-1).view(np.uint8)
view0 = buf0.view(jnp.bfloat16).reshape(rows, d)
rate("h2d dma_mapped numpy", lambda: jax.device_put(view0, dst).block_until_ready(), chunk_bytes)
got = np.asarray(jax.device_put(view0, dst))
notes["dma_mapped_bytes_equal"] = bool(np.array_equal(got.view(np.uint16), ref.view(np.uint16)))
half = jax.device_put(view0[rows // 2 :], dst)  # a view inside the mapped range: still no staging?
half.block_until_ready()
rate("h2d dma_mapped numpy, second half view", lambda: jax.device_put(view0[rows // 2 :], dst).block_until_ready(),
     chunk_bytes // 2)  # fmt: skip

n_bufs = 6
pool_bufs = [mapped_buffer(chunk_bytes)[0] for _ in range(n_bufs)]
starts = list(range(0, n - rows + 1, rows))
per_chunk = rows // cr


def library_read(c, dst_):
  """Chunk file c into dst_ with the library's reader (crc32c checked)."""
  files._read_chunk(c, c * cr, (c + 1) * cr, dst_)  # noqa: SLF001


def unchecked_read(c, dst_):
  """Chunk file c's data into dst_, no checksum: one preadv (the ceiling of any checked read)."""
  fd = os.open(files.path(c), os.O_RDONLY)
  try:
    os.preadv(fd, [dst_], 0)
  finally:
    os.close(fd)


def read_all(task=library_read, to_device=True, reads_ahead=3, threads=chunk_files.THREADS):
  """Every chunk into the reused buffers (`reads_ahead` in flight); device_put each when `to_device`."""
  ex = cf.ThreadPoolExecutor(threads)

  def run():
    free = collections.deque(pool_bufs)
    lent = collections.deque()  # (buffer, device array): free again once the array is ready
    reads = collections.deque()
    last = None
    for i in range(len(starts) + reads_ahead):
      if i < len(starts):
        if not free:
          b, arr = lent.popleft()
          arr.block_until_ready()
          free.append(b)
        b = free.popleft()
        fb = files.data_bytes
        c0 = starts[i] // cr
        reads.append((b, [ex.submit(task, c0 + j, b[j * fb : (j + 1) * fb]) for j in range(per_chunk)]))
      if i >= reads_ahead:
        b, futs = reads.popleft()
        for f in futs:
          f.result()
        if to_device:
          last = jax.device_put(b[:chunk_bytes].view(jnp.bfloat16).reshape(rows, d), dst)
          lent.append((b, last))
        else:
          free.append(b)
    if last is not None:
      last.block_until_ready()

  return run


total = len(starts) * chunk_bytes
rate("store read into reused mapped buffers (checked)", read_all(to_device=False), total)
rate("store read into reused mapped buffers (unchecked)", read_all(unchecked_read, to_device=False), total)
rate("store read + h2d from mapped buffers", read_all(), total)
rate("store read + h2d from mapped buffers, 5 reads ahead", read_all(reads_ahead=5), total)
rate("store read + h2d from mapped buffers (unchecked)", read_all(unchecked_read), total)
if jax.default_backend() != "cpu":  # the bytes arrived: a chunk on the device equals the store's
  fb = files.data_bytes
  for j in range(per_chunk):  # chunk 0 into the first buffer
    library_read(j, pool_bufs[0][j * fb : (j + 1) * fb])
  last = jax.device_put(pool_bufs[0][:chunk_bytes].view(jnp.bfloat16).reshape(rows, d), dst)
  notes["pool_roundtrip_ok"] = bool(np.array_equal(np.asarray(last).view(np.uint16), ref.view(np.uint16)))

# The host's memory bandwidth: parallel numpy copies (each byte read once, written once).
src = [np.ones(chunk_bytes // 4, np.uint8) for _ in range(16)]
dsts = [np.empty_like(x) for x in src]
with cf.ThreadPoolExecutor(16) as ex:
  rate("memcpy 16 threads (bytes copied)", lambda: list(ex.map(np.copyto, dsts, src)), sum(x.nbytes for x in src))


def direct_io(c, dst_):
  fd = os.open(files.path(c), os.O_RDONLY | os.O_DIRECT)  # the disk itself, past the page cache
  try:
    os.preadv(fd, [dst_], 0)
  finally:
    os.close(fd)


try:
  rate("O_DIRECT reads (the disk)", read_all(direct_io, to_device=False), total, rep=1)
except OSError as e:  # e.g. tmpfs has no O_DIRECT
  notes["o_direct_error"] = str(e)[:200]

# Zero-copy from the page cache: a read-only mmap of a chunk file, dma_map-ped?
fd = os.open(files.path(0), os.O_RDONLY)
try:
  fmm = mmap.mmap(fd, files.data_bytes, prot=mmap.PROT_READ)
  fbuf = np.frombuffer(fmm, np.uint8)
  try:
    t = time.perf_counter()
    client.dma_map(fbuf.ctypes.data, fbuf.nbytes)
    notes["file_mmap_dma_map_s"] = time.perf_counter() - t
    rate("h2d from dma_mapped file mmap (32 MiB)",
         lambda: jax.device_put(fbuf.view(jnp.bfloat16).reshape(cr, d), dst).block_until_ready(), fbuf.nbytes)  # fmt: skip
    client.dma_unmap(fbuf.ctypes.data)
  except Exception as e:  # noqa: BLE001
    notes["file_mmap_dma_map_error"] = str(e)[:200]
finally:
  os.close(fd)
fd = os.open(files.path(0), os.O_RDWR)  # a writable shared mapping of the page cache?
try:
  fbuf = np.frombuffer(mmap.mmap(fd, files.data_bytes, flags=mmap.MAP_SHARED), np.uint8)
  try:
    client.dma_map(fbuf.ctypes.data, fbuf.nbytes)
    notes["rw_file_mmap_dma_map"] = "ok"
    client.dma_unmap(fbuf.ctypes.data)
  except Exception as e:  # noqa: BLE001
    notes["rw_file_mmap_dma_map_error"] = str(e)[:200]
finally:
  os.close(fd)
print("NOTES", json.dumps(notes))
print("PROBE", json.dumps(out))
