"""The retrieval step's selection: lax.top_k / sort cost by width, and the fused step under other group layouts.

  python benchmarks/probes/probe_selection.py topk|groups|kernels|crc  # GPU host
  ONLY_DEFAULT=1 XLA_FLAGS=... python benchmarks/probes/probe_selection.py groups   # the default layout only
  python benchmarks/probes/probe_selection.py groups --small            # CPU smoke test

A one-off diagnostic (BENCHMARKS.md, Retrieval): `groups` times the cached fused step at Q = 1024,
d = 4096, C = 65536 with `retrieval.group_sizes` replaced by each layout and checks that every layout
returns bitwise the default's result over 3 chunks (one of small integers: ties). `kernels` times
select="fused" (XLA) against select="kernel" (`narrow_topk`) under several tile settings, each checked bitwise
against "fused" on the same 3 chunks and, separately, on a chunk with NaN, infinite and zero rows.
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
from trackstar_jax import narrow_topk, retrieval  # noqa: E402

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


def step_inputs():
  """The fused step's case (Q, d, C, k, unit queries, a chunk of normal rows, a chunk of small integers: ties)."""
  q_n, d, c, k = (8, 64, 4096, 4) if small else (1024, 4096, 65536, 10)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(q_n, d)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  phi = jax.random.normal(jax.random.key(0), (c, d), jnp.bfloat16)
  tied = jax.random.randint(jax.random.key(1), (c, d), -2, 3).astype(jnp.bfloat16).at[::17].set(0)
  return q_n, d, c, k, q, phi, tied


if what == "topk":
  for n in (160, 256) if small else (160, 256, 1024, 4096, 8192):
    x = jax.random.normal(jax.random.key(0), (16 if small else 2048, n), jnp.float32)
    f = jax.jit(lambda x: lax.top_k(x, 10))
    g = jax.jit(lambda x: jnp.sort(x, axis=-1))
    print("TOPK", n, f"top_k {bt(lambda: f(x)):.4f} ms", f"sort {bt(lambda: g(x)):.4f} ms", flush=True)
if what == "groups":
  q_n, d, c, k, q, phi, tied = step_inputs()
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
if what == "kernels":
  q_n, d, c, k, q, phi, tied = step_inputs()
  odd = phi.at[5::997].set(jnp.nan).at[7::1999].set(jnp.inf).at[11::89].set(0)  # NaN, inf and zero rows
  mesh = mesh_lib.make_mesh(devices=jax.local_devices()[:1])
  mm = jax.jit(lambda x, y: jnp.dot(x, y.T, preferred_element_type=jnp.float32))
  qb = jnp.asarray(q, jnp.bfloat16)
  # (name, select, narrow_topk.MAX_COLUMNS, ELEMENTS, NUM_WARPS): MAX_COLUMNS 512 keeps the two levels of
  # group maxima (the kernel on rows of 256 / 160), 4096 lets the kernel take all 4,096 first-level maxima at once.
  variants = [
    ("fused", "fused", 512, 2048, 4),
    ("kernel", "kernel", 512, 2048, 4),
    ("kernel_4096_w8", "kernel", 512, 4096, 8),
  ]
  variants += [(f"kernel_one_level_w{w}", "kernel", 4096, 2048, w) for w in (4, 8)]
  if os.environ.get("VARIANTS"):
    variants = [v for v in variants if v[0] in os.environ["VARIANTS"].split(",")]
  t_mm = {n: bt(lambda: mm(qb, phi), n) for n in (10, 50)}  # noqa: B023
  ref = {}
  for name, select, columns, elements, warps in variants:
    narrow_topk.MAX_COLUMNS, narrow_topk.ELEMENTS, narrow_topk.NUM_WARPS = columns, elements, warps
    jax.clear_caches()
    retrieval._compiled.cache_clear()
    try:
      topk = retrieval.StreamingTopK(q, k=k, mesh=mesh, select=select)
      ch = topk.put(start=0, ids=np.arange(c), phi=phi)
      ch = ch._replace(inv_norms=topk.update_device(ch))
      t = {n: bt(lambda: topk.update_device(ch) or topk._state, n) for n in (10, 50)}  # noqa: B023
      same = {}
      for label, chunks in (("equal", (phi, tied, phi)), ("equal_nan_inf_zero", (odd,))):
        chk = retrieval.StreamingTopK(q, k=k, mesh=mesh, select=select)
        for j, p in enumerate(chunks):
          c2 = chk.put(start=j * c, ids=np.arange(c), phi=p)
          c2 = c2._replace(inv_norms=topk.update_device(topk.put(start=0, ids=np.arange(c), phi=p)))
          chk.update_device(c2)
        res = [np.asarray(x) for x in chk.local_result()]
        ref.setdefault(label, res)
        same[label] = all(np.array_equal(a.view(np.int32), b.view(np.int32)) for a, b in zip(res, ref[label]))
      print(
        "KERNELS", name, " ".join(f"step{n} {t[n]:.4f} ms ratio{n} {t_mm[n] / t[n]:.3f}" for n in t),
        " ".join(f"{key} {v}" for key, v in same.items()), flush=True,
      )  # fmt: skip
    except Exception as e:  # noqa: BLE001  (a tile setting Triton refuses: report it, go on)
      print("KERNELS", name, "failed:", type(e).__name__, str(e).splitlines()[0][:300], flush=True)
  print("KERNELS matmul", " ".join(f"matmul{n} {t_mm[n]:.4f} ms" for n in t_mm), flush=True)
if what == "crc":
  import crc32c

  bufs = [np.random.default_rng(i).integers(0, 255, 1 << (16 if small else 25), dtype=np.uint8) for i in range(32)]
  for th in (1, 4, 8, 16):
    with cf.ThreadPoolExecutor(th) as ex:
      t = time.perf_counter()
      list(ex.map(crc32c.crc32c, bufs))
      dt = time.perf_counter() - t
      print("CRC crc32c-package threads", th, f"{sum(b.nbytes for b in bufs) / dt / 1e9:.2f} GB/s", flush=True)
