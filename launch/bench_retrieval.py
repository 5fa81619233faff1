"""Retrieval step rate vs a bare bf16 matmul of the same shape, on one GPU.

  python launch/bench_retrieval.py

One streaming top-k step (score matmul + running exact top-k/bottom-k) over a
chunk of C corpus rows, against jnp.dot of the same [Q, d] x [d, C] in bf16.
README "Results" quotes its output.
"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from trackstar_jax import retrieval as R

def bench(f, *a, n=10):
  jax.block_until_ready(f(*a))
  t = time.perf_counter()
  for _ in range(n):
    out = f(*a)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n

for Q, d, C, k, use_inv in [(1024, 4096, 65536, 10, False), (4096, 4096, 65536, 10, False), (1024, 16384, 16384, 10, False), (1024, 1024, 65536, 10, False), (16, 4096, 65536, 10, False), (1024, 4096, 65536, 100, False), (1024, 4096, 65536, 10, True), (4096, 1024, 65536, 10, True)]:
  rng = np.random.default_rng(0)
  q = rng.normal(size=(Q, d)).astype(np.float32)
  phi = jnp.asarray(rng.normal(size=(C, d)), jnp.bfloat16)
  mm = jax.jit(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32))
  qb = jnp.asarray(q, jnp.bfloat16)
  t_mm = bench(mm, qb, phi)
  flops = 2 * Q * C * d
  inv = np.eye(d, dtype=np.float32) if use_inv else None
  t = R.StreamingTopK(q, k=k, matmul_dtype="bfloat16", inv_sqrt=inv)
  phi_s = jax.device_put(phi, t._phi_sharding)
  valid = jax.device_put(np.ones(C, bool), t._rows_sharding)
  def step(state):
    return t._step(t._q, t._inv, state, phi_s, valid, jnp.int32(0))
  st = step(t._state)
  jax.block_until_ready(st)
  tt = time.perf_counter()
  for _ in range(10):
    st = step(st)
  jax.block_until_ready(st)
  t_step = (time.perf_counter() - tt) / 10
  print(f"Q={Q} d={d} C={C} k={k} inv={use_inv}: matmul {flops/t_mm/1e12:.1f} TF/s ({t_mm*1e3:.2f} ms), step {flops/t_step/1e12:.1f} TF/s ({t_step*1e3:.2f} ms), ratio {t_mm/t_step:.2f}", flush=True)
