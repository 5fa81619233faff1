"""Zero-copy from the page cache? Chunk-file mmaps page-locked read-only with the CUDA driver, copied by DMA.

  python benchmarks/probes/probe_mmap_register.py DIR     # GPU host: 64 chunk files of 32 MiB in DIR

A one-off diagnostic (BENCHMARKS.md, Streaming). PJRT's `dma_map` registers host memory writable,
which the kernel refuses for a file mapping; the driver's `cuMemHostRegister` with
CU_MEMHOSTREGISTER_READ_ONLY pins without write access. If it takes a read-only mmap of a chunk
file, the page cache itself is DMA-able: a streamed byte crosses host memory once for the copy (and
once for its checksum), not four times. This times registration (serial, threads, MAP_POPULATE),
the copy from registered mmaps into a jax array's device buffer vs the same copy from a registered
anonymous buffer and vs PJRT's device_put from a dma_map-ped buffer (the h2d reference), checks the
bytes, and times whole pipelined scans (register + crc32c + copy + unregister). NOTES / PROBE JSON.
"""

import concurrent.futures as cf
import ctypes
import json
import mmap
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
  import crc32c
except ImportError:
  crc32c = None

root = sys.argv[1]
n_files, fbytes = 64, 32 << 20
PORTABLE, DEVICEMAP, READ_ONLY = 1, 2, 8
out, notes = {}, {}
dev = jax.local_devices()[0]
client = dev.client
jnp.zeros(1).block_until_ready()  # XLA has made the primary context

cu = ctypes.CDLL("libcuda.so.1")
cu.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
cu.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
cu.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
cu.cuStreamSynchronize.argtypes = [ctypes.c_void_p]


def err(r):
  if r == 0:
    return None
  name = ctypes.c_char_p()
  cu.cuGetErrorName(r, ctypes.byref(name))
  return f"{r} {name.value.decode() if name.value else '?'}"


def check(r, what):
  if r != 0:
    raise RuntimeError(f"{what}: {err(r)}")


check(cu.cuInit(0), "cuInit")
cudev, ctx = ctypes.c_int(), ctypes.c_void_p()
check(cu.cuDeviceGet(ctypes.byref(cudev), 0), "cuDeviceGet")
check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), cudev), "cuDevicePrimaryCtxRetain")


def use_ctx():
  check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


use_ctx()
stream = ctypes.c_void_p()
check(cu.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # non-blocking

os.makedirs(root, exist_ok=True)
base = np.random.default_rng(0).integers(0, 256, fbytes, dtype=np.uint8)
paths = []
for i in range(n_files):
  p = os.path.join(root, f"c{i}")
  data = np.roll(base, i * 4099)
  with open(p, "wb") as f:
    f.write(data.tobytes())
    f.write((0).to_bytes(4, "little"))  # a stand-in checksum word, as the store's chunk files end
  paths.append(p)
for p in paths:  # in the page cache, as a store just written (or read before) is
  with open(p, "rb") as f:
    while f.read(64 << 20):
      pass


def file_map(p, populate=False):
  fd = os.open(p, os.O_RDONLY)
  try:
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    mm = mmap.mmap(fd, fbytes, flags=flags, prot=mmap.PROT_READ)
  finally:
    os.close(fd)
  return mm, np.frombuffer(mm, np.uint8)


def addr(a):
  return a.ctypes.data


# 1. Which flags take a read-only file mapping?
mm, a = file_map(paths[0])
for name, fl in (("portable|read_only", PORTABLE | READ_ONLY), ("read_only", READ_ONLY), ("portable", PORTABLE),
                 ("portable|devicemap|read_only", PORTABLE | DEVICEMAP | READ_ONLY)):  # fmt: skip
  t = time.perf_counter()
  r = cu.cuMemHostRegister_v2(addr(a), fbytes, fl)
  notes[f"register {name}"] = err(r) or f"ok {1e3 * (time.perf_counter() - t):.2f} ms"
  if r == 0:
    cu.cuMemHostUnregister(addr(a))
print("NOTES", json.dumps(notes), flush=True)
FLAGS = PORTABLE | READ_ONLY
if not notes["register portable|read_only"].startswith("ok"):
  print("PROBE", json.dumps(out))
  sys.exit(0)
del a, mm

maps = [file_map(p) for p in paths]
total = n_files * fbytes


def register_all(threads=1, ms=None):
  ms = ms or maps

  def one(m):
    use_ctx()
    check(cu.cuMemHostRegister_v2(addr(m[1]), fbytes, FLAGS), "register")

  t = time.perf_counter()
  if threads == 1:
    for m in ms:
      one(m)
  else:
    with cf.ThreadPoolExecutor(threads) as ex:
      list(ex.map(one, ms))
  return time.perf_counter() - t


def unregister_all(ms=None):
  t = time.perf_counter()
  for m in ms or maps:
    check(cu.cuMemHostUnregister(addr(m[1])), "unregister")
  return time.perf_counter() - t


for threads in (1, 4, 16):
  s = register_all(threads)
  u = unregister_all()
  out[f"register {threads} threads GB/s"] = total / s / 1e9
  out["unregister GB/s"] = total / u / 1e9
  print(f"register {threads} threads: {total / s / 1e9:.1f} GB/s, unregister {total / u / 1e9:.1f}", flush=True)
pop = [file_map(p, populate=True) for p in paths]
s = register_all(16, pop)
unregister_all(pop)
out["register 16 threads MAP_POPULATE GB/s"] = total / s / 1e9
del pop
print(f"register 16 threads MAP_POPULATE: {total / s / 1e9:.1f} GB/s", flush=True)

# 2. The copy from registered file mappings into a jax array's device buffer.
dst = jnp.zeros(total, jnp.uint8).block_until_ready()
dptr = dst.unsafe_buffer_pointer()


def copy_all(srcs, piece=fbytes):
  t = time.perf_counter()
  for i, s in enumerate(srcs):
    check(cu.cuMemcpyHtoDAsync_v2(dptr + i * piece, s, piece, stream), "memcpy")
  check(cu.cuStreamSynchronize(stream), "sync")
  return time.perf_counter() - t


def best(fn, nbytes, rep=3):
  fn()
  return nbytes / min(fn() for _ in range(rep)) / 1e9


def timed(fn):
  def run():
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

  return run


register_all(16)
out["copy registered file mmaps GB/s"] = best(lambda: copy_all([addr(m[1]) for m in maps]), total)
print(f"copy from registered file mmaps: {out['copy registered file mmaps GB/s']:.1f} GB/s", flush=True)
host = np.asarray(dst)
for i in (0, 17, n_files - 1):
  notes[f"bytes equal file {i}"] = bool(np.array_equal(host[i * fbytes : (i + 1) * fbytes], maps[i][1]))
del host
# PJRT's device_put from a registered (but not dma_map-ped) mapping: still staged?
v = maps[3][1].view(jnp.bfloat16).reshape(4096, -1)
out["pjrt device_put from cuda-registered mmap GB/s"] = best(timed(lambda: jax.device_put(v, dev).block_until_ready()),
                                                             fbytes)  # fmt: skip
unregister_all()

# The references: a registered anonymous buffer via the same copy, and PJRT from a dma_map-ped one.
anon = np.frombuffer(mmap.mmap(-1, 256 << 20, flags=mmap.MAP_PRIVATE), np.uint8)
anon[:] = 1
check(cu.cuMemHostRegister_v2(addr(anon), anon.nbytes, PORTABLE), "register anon")
out["copy registered anon GB/s"] = best(lambda: copy_all([addr(anon)] * 8, 256 << 20), 8 * anon.nbytes)
cu.cuMemHostUnregister(addr(anon))
client.dma_map(addr(anon), anon.nbytes)
av = anon.view(jnp.bfloat16).reshape(32768, -1)
out["pjrt device_put dma_mapped anon GB/s"] = best(
  timed(lambda: jax.device_put(av, dev).block_until_ready()), anon.nbytes
)
client.dma_unmap(addr(anon))
print({k: round(v, 1) for k, v in out.items()}, flush=True)

# 3. Whole scans: each file's mapping registered on a pool thread (optionally its crc32c computed
# there), then copied on the stream; unregistered once its copy is done. Or kept registered.
pool = cf.ThreadPoolExecutor(16)


def prep(m, do_register, do_crc):
  use_ctx()
  if do_register:
    check(cu.cuMemHostRegister_v2(addr(m[1]), fbytes, FLAGS), "register")
  if do_crc and crc32c is not None:
    crc32c.crc32c(m[1])


def scan(do_register=True, do_crc=True, ahead=16):
  t = time.perf_counter()
  futs = [pool.submit(prep, m, do_register, do_crc) for m in maps]
  done = []
  for i, (m, f) in enumerate(zip(maps, futs)):
    f.result()
    check(cu.cuMemcpyHtoDAsync_v2(dptr + i * fbytes, addr(m[1]), fbytes, stream), "memcpy")
    done.append(m)
    if len(done) > ahead:
      check(cu.cuStreamSynchronize(stream), "sync")
      if do_register:
        unregister_all(done)
      done = []
  check(cu.cuStreamSynchronize(stream), "sync")
  if do_register:
    unregister_all(done)
  return time.perf_counter() - t


notes["crc32c"] = crc32c is not None
out["scan register+crc+copy+unregister GB/s"] = best(lambda: scan(True, True), total)
out["scan register+copy+unregister GB/s"] = best(lambda: scan(True, False), total)
register_all(16)
out["scan kept registered, crc+copy GB/s"] = best(lambda: scan(False, True), total)
out["scan kept registered, copy GB/s"] = best(lambda: scan(False, False), total)
unregister_all()
t = time.perf_counter()
list(pool.map(lambda m: crc32c.crc32c(m[1]) if crc32c else None, maps))
out["crc32c of mmaps 16 threads GB/s"] = total / (time.perf_counter() - t) / 1e9

# 4. Eight files mapped side by side (MAP_FIXED into one reserved range), registered as one range, and
# PJRT's device_put of the 256 MiB view: the path a library feed would take.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_SHARED_, MAP_PRIVATE_, MAP_FIXED_, MAP_ANON_ = 0x01, 0x02, 0x10, 0x20


def window(ps):
  nb = len(ps) * fbytes
  base = libc.mmap(None, nb, 0, MAP_PRIVATE_ | MAP_ANON_, -1, 0)
  for j, p in enumerate(ps):
    fd = os.open(p, os.O_RDONLY)
    got = libc.mmap(base + j * fbytes, fbytes, mmap.PROT_READ, MAP_SHARED_ | MAP_FIXED_, fd, 0)
    os.close(fd)
    assert got == base + j * fbytes, ctypes.get_errno()
  arr = np.ctypeslib.as_array((ctypes.c_uint8 * nb).from_address(base))
  return base, nb, arr


wins = [window(paths[i : i + 8]) for i in range(0, n_files, 8)]
t = time.perf_counter()
for base, nb, _ in wins:
  check(cu.cuMemHostRegister_v2(base, nb, FLAGS), "register window")
out["register 256 MiB windows GB/s"] = total / (time.perf_counter() - t) / 1e9
views = [w[2].view(jnp.bfloat16).reshape(32768, -1) for w in wins]


def put_windows(do_crc):
  def run():
    t = time.perf_counter()
    futs = [pool.submit(crc32c.crc32c, w[2]) for w in wins] if do_crc and crc32c else []
    xs = []
    for j, v in enumerate(views):
      if futs:
        futs[j].result()
      xs.append(jax.device_put(v, dev))
    for x in xs:
      x.block_until_ready()
    return time.perf_counter() - t

  return run


out["pjrt device_put 256 MiB windows GB/s"] = best(put_windows(False), total)
out["pjrt device_put 256 MiB windows + crc GB/s"] = best(put_windows(True), total)
got = np.asarray(jax.device_put(views[2], dev)).view(np.uint8).reshape(-1)
notes["window bytes equal"] = bool(
  np.array_equal(got[:fbytes], maps[16][1]) and np.array_equal(got[-fbytes:], maps[23][1])
)
t = time.perf_counter()
for base, _, _ in wins:
  check(cu.cuMemHostUnregister(base), "unregister window")
out["unregister windows GB/s"] = total / (time.perf_counter() - t) / 1e9


def scan_windows():  # per scan: register each window on a thread (+ crc), device_put, unregister after
  def prep_w(w):
    use_ctx()
    check(cu.cuMemHostRegister_v2(w[0], w[1], FLAGS), "register window")
    if crc32c:
      crc32c.crc32c(w[2])

  t = time.perf_counter()
  futs = [pool.submit(prep_w, w) for w in wins]
  xs = []
  for j, v in enumerate(views):
    futs[j].result()
    xs.append(jax.device_put(v, dev))
  for x in xs:
    x.block_until_ready()
  for w in wins:
    check(cu.cuMemHostUnregister(w[0]), "unregister window")
  return time.perf_counter() - t


out["scan windows register+crc+put+unregister GB/s"] = best(scan_windows, total)
print("NOTES", json.dumps(notes))
print("PROBE", json.dumps({k: round(v, 2) for k, v in out.items()}))
