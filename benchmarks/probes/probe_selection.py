"""The retrieval step's selection: lax.top_k / sort cost by width, and the fused step under other group layouts.

  python benchmarks/probes/probe_selection.py topk|groups|crc          # GPU host
  ONLY_DEFAULT=1 XLA_FLAGS=... python benchmarks/probes/probe_selection.py groups   # the default layout only
  python benchmarks/probes/probe_selection.py groups --small            # CPU smoke test

A one-off diagnostic (BENCHMARKS.md, Retrieval): `groups` times the cached fused step at Q = 1024,
d = 4096, C = 65536 with `retrieval.group_sizes` replaced by each layout and checks that every layout
returns bitwise the default's result over 3 chunks (one of small integers: ties).
"""

import concurrent.futures as cf
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from trackstar_jax import mesh as mesh_lib  # noqa: E402
from trackstar_jax import retrieval  # noqa: E402

what = sys.argv[1]
small = "--small" in sys.argv


def bt(fn, n=20):
  r = fn()
  jax.block_until_ready(r)
  best = 1e9
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
      r = fn()
    jax.block_until_ready(r)
    best = min(best, (time.perf_counter() - t) / n)
  return best * 1e3


if what == "topk":
  for n in (160, 256) if small else (160, 256, 1024, 4096, 8192):
    x = jax.random.normal(jax.random.key(0), (16 if small else 2048, n), jnp.float32)
    f = jax.jit(lambda x: lax.top_k(x, 10))
    g = jax.jit(lambda x: jnp.sort(x, axis=-1))
    print("TOPK", n, f"top_k {bt(lambda: f(x)):.4f} ms", f"sort {bt(lambda: g(x)):.4f} ms", flush=True)
if what == "groups":
  q_n, d, c, k = (8, 64, 4096, 4) if small else (1024, 4096, 65536, 10)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(q_n, d)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  phi = jax.random.normal(jax.random.key(0), (c, d), jnp.bfloat16)
  tied = jax.random.randint(jax.random.key(1), (c, d), -2, 3).astype(jnp.bfloat16).at[::17].set(0)
  mesh = mesh_lib.make_mesh(devices=jax.local_devices()[:1])
  mm = jax.jit(lambda x, y: jnp.dot(x, y.T, preferred_element_type=jnp.float32))
  qb = jnp.asarray(q, jnp.bfloat16)
  t_mm = bt(lambda: mm(qb, phi))
  orig = retrieval.group_sizes
  ref = None
  layouts = ("default", (16,), (32,), (64,), (8, 8), (32, 16), (64, 16), (32, 8))
  if os.environ.get("ONLY_DEFAULT"):
    layouts = ("default",)
  for layout in layouts:
    retrieval.group_sizes = orig if layout == "default" else (lambda rows, k, L=layout: L)
    retrieval._compiled.cache_clear()
    topk = retrieval.StreamingTopK(q, k=k, mesh=mesh)
    ch = topk.put(start=0, ids=np.arange(c), phi=phi)
    ch = ch._replace(inv_norms=topk.update_device(ch))
    t = bt(lambda: topk.update_device(ch) or topk._state)
    chk = retrieval.StreamingTopK(q, k=k, mesh=mesh)
    for j, p in enumerate((phi, tied, phi)):
      c2 = chk.put(start=j * c, ids=np.arange(c), phi=p)
      c2 = c2._replace(inv_norms=topk.update_device(topk.put(start=0, ids=np.arange(c), phi=p)))
      chk.update_device(c2)
    res = [np.asarray(x) for x in chk.local_result()]
    same = ref is None or all(np.array_equal(a, b) for a, b in zip(res, ref))
    ref = ref or res
    print(
      "GROUPS",
      layout,
      orig(c, k) if layout == "default" else "",
      f"step {t:.4f} ms matmul {t_mm:.4f} ratio {t_mm / t:.3f} equal_to_default {same}",
      flush=True,
    )
  retrieval.group_sizes = orig
if what == "crc":
  import crc32c

  bufs = [np.random.default_rng(i).integers(0, 255, 1 << (16 if small else 25), dtype=np.uint8) for i in range(32)]
  for th in (1, 4, 8, 16):
    with cf.ThreadPoolExecutor(th) as ex:
      t = time.perf_counter()
      list(ex.map(crc32c.crc32c, bufs))
      dt = time.perf_counter() - t
      print("CRC crc32c-package threads", th, f"{sum(b.nbytes for b in bufs) / dt / 1e9:.2f} GB/s", flush=True)
