"""Exact Adam's per-layer path (`gradients._layer_tap`): what the per-example G costs, and variants of it.

  python benchmarks/probes/probe_layer_grad.py 1b|lama     # GPU host
  python benchmarks/probes/probe_layer_grad.py small       # CPU smoke test
  python benchmarks/probes/probe_layer_grad.py 1b@256      # a shape at T tokens, B scaled to keep B * T
  SWEEP=2_64_128_4_3,... VARIANTS=parts,g_then_pallas_2_64_128_4_3,...   # scale_project's settings to try

A one-off diagnostic (BENCHMARKS.md, Encode job). For one MLP matrix [k, l] of the shape, times the
training step's weight gradient (sum over the batch) against ways of forming
phi_e = P_in^T (G_e * S) P_out with G_e = x_e^T dy_e (per example, T tokens) and S = 1/sqrt(V) elementwise:

  current     G float32, scaled, rounded to bf16, then one einsum with P_in and P_out (today's code)
  g_bf16      G's matmul writes bf16 (rounded once), scaled in float32, rounded again
  order_in    as current, P_in contracted first, then P_out
  chunk_N     as current, over blocks of N rows of k (lax.map): G's block may stay in L2
  per_example as current, one example at a time (lax.map)
  pallas      a Pallas (Triton) kernel below: G's tiles never leave the chip (and a sweep of tile sizes)
  g_then_pallas  G from the matmul library in bf16, then `scaled_projection` (the library's path since C5);
              g_then_pallas_E_K_L_W_S: E examples per program, [K, L] tiles, W warps, S stages

and, as PART lines, the two halves of g_then_pallas alone: G's matmul and the kernel on a ready G.

and prints each variant's relative error against a float32 computation of the same phi.
"""

import functools
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pl_triton  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from trackstar_jax import scaled_projection  # noqa: E402

SHAPES = {  # B, T, k (in), l (out), d_in, d_out
  "1b": (16, 512, 2048, 8192, 64, 64),
  "lama": (256, 128, 512, 2048, 64, 64),
  "small": (2, 64, 128, 256, 16, 16),
}


TILE_SWEEP = (
  (128, 128, 32, 8, 3),
  (128, 128, 64, 4, 3),
  (128, 128, 128, 8, 2),
  (128, 256, 64, 8, 3),
  (256, 128, 64, 8, 3),
  (64, 128, 64, 4, 3),
  (128, 64, 64, 4, 3),
  (128, 128, 64, 8, 4),
  (128, 128, 64, 8, 3, 1),  # x transposed to [B, K, T] first
  (128, 128, 128, 8, 2, 1),
)


# scale_project's settings swept: (examples per program, block_k, block_l, num_warps, num_stages). Runs
# C5-C8 swept examples = 1; sharing S's and P_out's tiles over E examples cuts the L2 traffic by ~E.
PROJECT_SWEEP = (
  (1, 32, 128, 4, 3),
  (1, 64, 64, 4, 4),
  (2, 64, 128, 4, 3),
  (2, 64, 128, 8, 3),
  (2, 64, 64, 4, 4),
  (2, 32, 128, 4, 3),
  (4, 64, 128, 8, 3),
  (4, 64, 64, 8, 3),
  (4, 32, 128, 4, 3),
  (4, 32, 128, 8, 3),
  (4, 32, 64, 4, 4),
  (8, 32, 64, 8, 3),
  (8, 16, 128, 4, 3),
  (4, 16, 128, 4, 3),
)


def best_ms(fn, *args, n=10):
  jax.block_until_ready(fn(*args))
  best = 1e9
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
      r = fn(*args)
    jax.block_until_ready(r)
    best = min(best, (time.perf_counter() - t) / n)
  return best * 1e3


# bf16 operands as the encoder uses on accelerators; XLA:CPU has no bf16 x bf16 -> f32 dot.
OPERAND = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def mm(eq, *ops, out=jnp.float32):
  return jnp.einsum(eq, *[o.astype(OPERAND) for o in ops], preferred_element_type=out)


def current(x, dy, s, p_in, p_out):
  g = mm("btk,btl->bkl", x, dy) * s
  return mm("bkl,kY,lZ->bYZ", g, p_in, p_out)


def g_bf16(x, dy, s, p_in, p_out):
  g = mm("btk,btl->bkl", x, dy, out=OPERAND).astype(jnp.float32) * s
  return mm("bkl,kY,lZ->bYZ", g, p_in, p_out)


def order_in(x, dy, s, p_in, p_out):
  g = mm("btk,btl->bkl", x, dy) * s
  return mm("bYl,lZ->bYZ", mm("bkl,kY->bYl", g, p_in), p_out)


def chunked(rows):
  def fn(x, dy, s, p_in, p_out):
    b, t, k = x.shape
    xs = x.reshape(b, t, k // rows, rows).transpose(2, 0, 1, 3)

    def block(args):
      xc, sc, pc = args
      return mm("bkl,kY,lZ->bYZ", mm("btk,btl->bkl", xc, dy) * sc, pc, p_out)

    parts = jax.lax.map(block, (xs, s.reshape(k // rows, rows, -1), p_in.reshape(k // rows, rows, -1)))
    return jnp.sum(parts, axis=0)

  return fn


# The experiment: a Pallas (Triton) kernel that keeps each [block_k, block_l] tile of G_e on chip. It
# accumulates the tile over tokens, scales it by S's tile and contracts it at once with P_out's rows,
# so only H_e = (G_e * S) P_out [K, d_out] is written; P_in is applied after. Measured slower than
# XLA's own plan at the 1B shape (its matmul runs at ~300 TFLOP/s; BENCHMARKS.md): not in the library.
TILES = dict(block_k=128, block_l=128, block_t=64, num_warps=8, num_stages=3, x_kt=0)


def _tile_kernel(x_ref, dy_ref, s_ref, p_ref, h_ref, *, block_l, block_t, t_steps, l_steps, x_kt):
  block_k = x_ref.shape[0 if x_kt else 1]

  def over_l(j, h):
    cols = pl.ds(j * block_l, block_l)

    def over_t(t, g):
      rows = pl.ds(t * block_t, block_t)
      if x_kt:
        return g + pl_triton.dot(x_ref[:, rows], dy_ref[rows, cols])
      return g + pl_triton.dot(x_ref[rows, :], dy_ref[rows, cols], trans_a=True)

    g = jax.lax.fori_loop(0, t_steps, over_t, jnp.zeros((block_k, block_l), jnp.float32))
    g = (g * s_ref[:, cols]).astype(p_ref.dtype)
    return h + pl_triton.dot(g, p_ref[cols, :])

  h_ref[...] = jax.lax.fori_loop(0, l_steps, over_l, jnp.zeros(h_ref.shape, jnp.float32))


def scaled_grad_projection(x, dy, scale, p_out, **tiles):
  """H [B, K, Z] float32, H_e = (x_e^T dy_e * scale) p_out; x [B, T, K], dy [B, T, L] with T % block_t == 0."""
  tl = {**TILES, **tiles}
  (b, t, k), (l, z) = x.shape, p_out.shape
  bk, bl, bt, x_kt = tl["block_k"], tl["block_l"], tl["block_t"], tl["x_kt"]
  if x_kt:  # x as [B, K, T]: the first dot's operand row-major
    x = jnp.swapaxes(x, 1, 2)
  # Grid (examples, K blocks): the first axis varies fastest (Triton's program_id 0), so the programs
  # running together share S's tiles.
  return pl.pallas_call(
    functools.partial(_tile_kernel, block_l=bl, block_t=bt, t_steps=t // bt, l_steps=l // bl, x_kt=x_kt),
    out_shape=jax.ShapeDtypeStruct((b, k, z), jnp.float32),
    grid=(b, k // bk),
    in_specs=[
      pl.BlockSpec((None, bk, t), lambda e, i: (e, i, 0))
      if x_kt
      else pl.BlockSpec((None, t, bk), lambda e, i: (e, 0, i)),
      pl.BlockSpec((None, t, l), lambda e, i: (e, 0, 0)),
      pl.BlockSpec((bk, l), lambda e, i: (i, 0)),
      pl.BlockSpec((l, z), lambda e, i: (0, 0)),
    ],
    out_specs=pl.BlockSpec((None, bk, z), lambda e, i: (e, i, 0)),
    compiler_params=pl_triton.CompilerParams(num_warps=tl["num_warps"], num_stages=tl["num_stages"]),
    interpret=jax.default_backend() == "cpu",
  )(x, dy, scale, p_out)


def g_then_pallas(**tiles):
  """G from the matmul library in the operand dtype, then `scaled_projection.scale_project` (the library's path)."""

  def fn(x, dy, s, p_in, p_out):
    g = mm("btk,btl->bkl", x, dy, out=OPERAND)
    h = scaled_projection.scale_project(g, s, p_out.astype(OPERAND), interpret=jax.default_backend() == "cpu", **tiles)
    return mm("bkZ,kY->bYZ", h, p_in)

  return fn


def pallas(**tiles):
  def fn(x, dy, s, p_in, p_out):
    h = scaled_grad_projection(x.astype(OPERAND), dy.astype(OPERAND), s, p_out.astype(OPERAND), **tiles)
    return mm("bkZ,kY->bYZ", h, p_in)

  return fn


def per_example(x, dy, s, p_in, p_out):
  return jax.lax.map(lambda a: current(a[0][None], a[1][None], s, p_in, p_out)[0], (x, dy))


def parse_shape(arg: str) -> tuple[int, ...]:
  """SHAPES[name], or name@T: T tokens per example and the batch scaled to keep B * T."""
  name, _, tokens = arg.partition("@")
  b, t, *rest = SHAPES[name]
  if tokens:
    b, t = b * t // int(tokens), int(tokens)
  return (b, t, *rest)


def main():
  shape = sys.argv[1]
  b, t, k, l, d_in, d_out = parse_shape(shape)
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (b, t, k), jnp.bfloat16)
  dy = (jax.random.normal(keys[1], (b, t, l), jnp.float32) * 1e-3).astype(jnp.bfloat16)
  s = jax.random.uniform(keys[2], (k, l), jnp.float32, 1.0, 1e3)
  p_in = jax.random.normal(keys[3], (k, d_in), jnp.float32)
  p_out = jax.random.normal(keys[4], (l, d_out), jnp.float32)
  args = (x, dy, s, p_in, p_out)

  wgrad = jax.jit(lambda x, dy: mm("btk,btl->kl", x, dy))
  t_w = best_ms(wgrad, x, dy)
  flop = 2 * b * t * k * l
  print(
    f"SHAPE {shape} B={b} T={t} k={k} l={l} d={d_in}x{d_out}; G float32 {b * k * l * 4 / 2**30:.3f} GiB", flush=True
  )
  print(f"wgrad (training step's part) {t_w:.3f} ms ({flop / t_w / 1e9:.0f} TFLOP/s)", flush=True)
  exact = jax.jit(
    lambda *a: jnp.einsum(
      "bkl,kY,lZ->bYZ",
      jnp.einsum("btk,btl->bkl", a[0].astype(jnp.float32), a[1].astype(jnp.float32)) * a[2],
      a[3],
      a[4],
    )
  )(*args)
  variants = {"current": current, "g_bf16": g_bf16, "order_in": order_in, "per_example": per_example}
  for rows in (64, 256) if k >= 256 else (8,):
    variants[f"chunk_{rows}"] = chunked(rows)
  variants["pallas"] = pallas()
  variants["g_then_pallas"] = g_then_pallas()
  sweep = PROJECT_SWEEP if shape != "small" else ((2, 16, 64, 4, 3),)
  if os.environ.get("SWEEP"):  # SWEEP=2_128_64_4_3,...: these settings instead
    sweep = tuple(tuple(map(int, c.split("_"))) for c in os.environ["SWEEP"].split(","))
  for cfg in sweep:  # (examples, block_k, block_l, warps, stages)
    if b % cfg[0] == 0:
      tiles = dict(examples=cfg[0], block=cfg[1:3], num_warps=cfg[3], num_stages=cfg[4])
      variants["g_then_pallas_" + "_".join(map(str, cfg))] = g_then_pallas(**tiles)
  if shape != "small":  # tile configurations: (block_k, block_l, block_t, num_warps, num_stages)
    for cfg in TILE_SWEEP:
      tiles = dict(zip(("block_k", "block_l", "block_t", "num_warps", "num_stages", "x_kt"), cfg))
      variants["pallas_" + "_".join(map(str, cfg))] = pallas(**tiles)
  only = os.environ.get("VARIANTS")
  if not only or "parts" in only.split(","):  # g_then_pallas's halves, each alone
    g_mm = jax.jit(lambda x, dy: mm("btk,btl->bkl", x, dy, out=OPERAND))
    g = g_mm(x, dy)
    proj = jax.jit(functools.partial(scaled_projection.scale_project, interpret=jax.default_backend() == "cpu"))
    p_op = p_out.astype(OPERAND)
    print(f"PART g_matmul       {best_ms(g_mm, x, dy):8.3f} ms", flush=True)
    print(f"PART scale_project  {best_ms(proj, g, s, p_op):8.3f} ms (default settings)", flush=True)
    del g
  for name, fn in variants.items():
    if only and name not in only.split(","):
      continue
    f = jax.jit(fn)
    try:
      ms = best_ms(f, *args)
    except Exception as e:  # a tile configuration Triton cannot compile (resources): say so, go on
      print(f"VARIANT {name:12s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
      continue
    err = float(jnp.linalg.norm(f(*args) - exact) / jnp.linalg.norm(exact))
    print(f"VARIANT {name:12s} {ms:8.3f} ms  {ms / t_w:5.2f}x wgrad  rel err {err:.2e}", flush=True)
    if os.environ.get("HLO") and name in os.environ["HLO"].split(","):  # the compiled program's entry
      text = f.lower(*args).compile().as_text()
      entry = text[text.index("ENTRY") :]
      for line in entry.splitlines()[1:]:
        if "parameter(" not in line and line.strip() not in ("}", ""):
          print("  HLO", re.sub(r", metadata=\{[^}]*\}", "", line.strip())[:300], flush=True)


if __name__ == "__main__":
  main()
