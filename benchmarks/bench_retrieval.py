"""Retrieval step rate vs a bare bf16 matmul of the same shape, on one device.

  python benchmarks/bench_retrieval.py                 # GPU: the README table's cases
  python benchmarks/bench_retrieval.py --small         # CPU smoke test (tests/test_benchmarks.py)

One streaming top-k step (`retrieval.StreamingTopK.update`: score matmul +
running exact top-k / bottom-k) over a chunk of C corpus rows already on the
device, against jnp.dot of the same [Q, d] x [d, C] in bf16. Mean of --steps
steps after warm-up. README "Results" quotes its output.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from trackstar_jax import mesh as mesh_lib  # noqa: E402
from trackstar_jax.retrieval import StreamingTopK  # noqa: E402

# (Q, d, C, k, full R^{-1/2})
CASES = (
  (1024, 4096, 65536, 10, False),
  (4096, 4096, 65536, 10, False),
  (1024, 16384, 16384, 10, False),
  (1024, 1024, 65536, 10, False),
  (16, 4096, 65536, 10, False),
  (1024, 4096, 65536, 100, False),
  (1024, 4096, 65536, 10, True),
  (4096, 1024, 65536, 10, True),
)
SMALL = ((8, 64, 1024, 4, False), (8, 64, 1024, 4, True))


def _time(fn, wait, steps: int) -> float:
  fn()
  wait()
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  wait()
  return (time.perf_counter() - t) / steps


def bench(q_n: int, d: int, c: int, k: int, use_inv: bool, *, steps: int) -> dict:
  rng = np.random.default_rng(0)
  q = rng.normal(size=(q_n, d)).astype(np.float32)
  phi = jnp.asarray(rng.normal(size=(c, d)), jnp.bfloat16)
  out = [None]
  mm = jax.jit(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32))
  qb = jnp.asarray(q, jnp.bfloat16)
  t_mm = _time(lambda: out.__setitem__(0, mm(qb, phi)), lambda: jax.block_until_ready(out[0]), steps)
  topk = StreamingTopK(
    q,
    k=k,
    matmul_dtype="bfloat16",
    inv_sqrt=np.eye(d, dtype=np.float32) if use_inv else None,
    mesh=mesh_lib.make_mesh(devices=jax.local_devices()[:1]),
  )
  ids = np.arange(c)
  t_step = _time(lambda: topk.update(start=0, ids=ids, phi=phi), topk.wait, steps)
  flops = 2 * q_n * c * d
  return dict(
    Q=q_n,
    d=d,
    C=c,
    k=k,
    full_inv=use_inv,
    matmul_tflops=flops / t_mm / 1e12,
    matmul_ms=t_mm * 1e3,
    step_tflops=flops / t_step / 1e12,
    step_ms=t_step * 1e3,
    ratio=t_mm / t_step,
    device=str(jax.devices()[0]),
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke test, not a benchmark")
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  for case in SMALL if args.small else CASES:
    r = bench(*case, steps=args.steps)
    print(json.dumps(r), flush=True)
    print(
      f"Q={r['Q']} d={r['d']} C={r['C']} k={r['k']} inv={r['full_inv']}: matmul {r['matmul_tflops']:.1f} TF/s "
      f"({r['matmul_ms']:.2f} ms), step {r['step_tflops']:.1f} TF/s ({r['step_ms']:.2f} ms), "
      f"ratio {r['ratio']:.2f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
