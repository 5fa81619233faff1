"""(G * S) P_out with the elementwise scaling fused into the projection's loads (Pallas, GPU).

Exact Adam's per-layer path (`gradients._layer_tap`) forms each example's
gradient G_e [K, L], scales it by S = 1/sqrt(V) and projects it:
phi_e = P_in^T (G_e * S) P_out. Written as einsums, XLA fuses the scaling into
the matmul that forms G, and so forms G with its own (Triton) matmul at about
half the rate of the matmul library on an H200
(`benchmarks/probes/probe_layer_grad.py`, BENCHMARKS.md "Encode job"). Here G
comes from the matmul library in the projection's operand dtype, and one
kernel reads each of its tiles once, scales it in float32 and contracts it with
P_out's rows: H_e = (G_e * S) P_out [K, Z] is all it writes. Each program
projects two examples, so each tile of S and P_out it loads serves both, and
the programs of one K block run together on S's rows (L2, not HBM, is what
bounds the kernel).

Numerics: G is rounded to the operand dtype (bf16 on accelerators) before the
scaling as well as after it, where the einsum path rounds once; both
accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

# encoder.layer_kernel="auto" takes this kernel on GPUs with bf16 operands. It trades XLA's fused path (G
# formed by a Triton matmul at ~390 TFLOP/s on an H200, the scaling in its epilogue, G' written and read
# in bf16) for the matmul library's G (~730 TFLOP/s) plus one bf16 write and read of G. With two examples
# per program it measured faster at every length tried (BENCHMARKS.md "Encode job", run D1: one MLP
# matrix of the 1B shape at 128, 256 and 512 tokens, 1.41-1.54x; LAMA's at 128 tokens, 1.20x).
# Tile sizes, largest first (`benchmarks/probes/probe_layer_grad.py` sweeps them); Triton's dots need >= 16.
BLOCK_K = (64, 32, 16)
BLOCK_L = (128, 64, 32, 16)
MIN_DOT = 16
# Examples per program, largest first (`examples_per_program`). Examples in one program share each loaded
# tile of S and P_out, cutting the kernel's L2-to-SM traffic: two were 1.16x (1B) and 1.22x (LAMA) faster
# than one (run D1); four (at d_out 64: (64, 64) tiles, 4 warps) 1.01x / 1.02x faster than two end to end
# (run E3: exact Adam at the 1B shape 0.962x vs 0.952x the training step; E4: the LAMA kernel 0.864x vs
# 0.848x). Eight were no faster (D1). Four at d_out 128 is not measured.
EXAMPLES = (4, 2, 1)


# Shared memory a Triton program may use on an H100 / H200 (227 KiB). `shared_memory_bytes` is what the
# kernel asks for: fitted exactly to Triton's requests in runs D1, D3 and D5 (RESOURCE_EXHAUSTED messages).
SHARED_MEMORY_BYTES = 232448


def shared_memory_bytes(examples: int, block_k: int, block_l: int, z: int, itemsize: int, stages: int = 3) -> int:
  """Bytes of shared memory the kernel requests: P_out's [block_l, z] tile in every pipeline stage, G's
  and S's (float32) tiles in all but one."""
  return stages * block_l * z * itemsize + (stages - 1) * (
    examples * block_k * block_l * itemsize + block_k * block_l * 4
  )


def tiles(
  k: int, l: int, z: int = MIN_DOT, *, examples: int = 1, itemsize: int = 2, stages: int = 3
) -> tuple[int, int] | None:
  """(block_k, block_l) tiling a [K, L] kernel exactly, largest first, whose tiles fit shared memory with
  d_out = z, `examples` per program and `stages` pipeline stages; None if none does (the einsum path then)."""
  z_pad = max(MIN_DOT, pl.next_power_of_2(z))
  for bk in (b for b in BLOCK_K if k % b == 0):
    for bl in (b for b in BLOCK_L if l % b == 0):
      if shared_memory_bytes(examples, bk, bl, z_pad, itemsize, stages) <= SHARED_MEMORY_BYTES:
        return bk, bl
  return None


# "auto" takes the kernel up to this d_out. Wider, it fits shared memory only with narrow tiles and its
# per-program accumulators spill: d_out 256 took 5.5 ms and 512 took 55 ms on the 1B matrix, against 0.23 ms
# at 64 and 0.30 ms at 128 (run D6).
AUTO_MAX_D_OUT = 128


def auto_chooses(dtype, backend: str, d_out: int = MIN_DOT) -> bool:
  """What `layer_kernel="auto"` picks for one layer call: the kernel on a GPU with bf16 operands and
  d_out <= AUTO_MAX_D_OUT."""
  return backend == "gpu" and dtype == jnp.bfloat16 and d_out <= AUTO_MAX_D_OUT


def mesh_supported(mesh: Mesh | None) -> bool:
  """The kernel runs per device over the batch: every mesh axis but `data` must have size 1."""
  return mesh is None or all(size == 1 for name, size in mesh.shape.items() if name != "data")


def _kernel(g_ref, s_ref, p_ref, h_ref, *, block_l: int, l_steps: int, precision):
  # g_ref [E, bk, L], s_ref [bk, L], p_ref [L, Z], h_ref [E, bk, Z]: the E examples of one program share
  # each loaded tile of S and P_out (L2-to-SM traffic, not HBM, bounds this kernel: BENCHMARKS.md).
  examples = g_ref.shape[0]

  def over_l(j, hs):
    cols = pl.ds(j * block_l, block_l)
    s, p = s_ref[:, cols].astype(jnp.float32), p_ref[cols, :]
    return tuple(
      h + pl_triton.dot((g_ref[e, :, cols].astype(jnp.float32) * s).astype(p.dtype), p, precision=precision)
      for e, h in enumerate(hs)
    )

  zeros = tuple(jnp.zeros(h_ref.shape[1:], jnp.float32) for _ in range(examples))
  hs = jax.lax.fori_loop(0, l_steps, over_l, zeros)
  for e, h in enumerate(hs):
    h_ref[e] = h


def examples_per_program(b: int, requested: int | None = None) -> int:
  """Examples each program projects (sharing its S and P_out tiles): `requested`, else the largest of
  EXAMPLES dividing b."""
  if requested is not None:
    if requested < 1 or b % requested:
      raise ValueError(f"scale_project: examples={requested} does not divide the batch of {b}.")
    return requested
  return next(e for e in EXAMPLES if b % e == 0)


def scale_project(
  g: jax.Array,
  scale: jax.Array,
  p_out: jax.Array,
  *,
  interpret: bool = False,
  block: tuple[int, int] | None = None,
  examples: int | None = None,
  num_warps: int = 4,
  num_stages: int = 3,
) -> jax.Array:
  """H [B, K, Z] float32 = (g * scale) p_out per example, on one device.

  Args:
    g: [B, K, L] per-example gradients, in the operand dtype.
    scale: [K, L] float32 elementwise correction.
    p_out: [L, Z] output-side projection, in the operand dtype.
    interpret: Pallas' interpreter (CPU).
    block, num_warps, num_stages: tiles (block_k, block_l; default `tiles`) and Triton's launch
      settings (the probe sweeps them).
    examples: examples per program (default `examples_per_program`).
  """
  (b, k, l), z = g.shape, p_out.shape[1]
  if scale.shape != (k, l) or p_out.shape[0] != l:
    raise ValueError(f"scale_project: g {g.shape}, scale {scale.shape}, p_out {p_out.shape} do not match.")
  # Examples per program and tiles together: the most examples whose tiles fit (a wide d_out: fewer).
  choices = (examples_per_program(b, examples),) if examples is not None else [x for x in EXAMPLES if b % x == 0]
  itemsize = jnp.dtype(p_out.dtype).itemsize
  for e in choices:
    found = block or tiles(k, l, z, examples=e, itemsize=itemsize, stages=num_stages)
    if found is not None:
      break
  if found is None or k % found[0] or l % found[1]:
    raise ValueError(
      f"scale_project: a [{k}, {l}] kernel with d_out {z} does not tile by {block or (BLOCK_K, BLOCK_L)} "
      f"within {SHARED_MEMORY_BYTES} bytes of shared memory (use encoder.layer_kernel='xla')."
    )
  bk, bl = found
  z_pad = max(MIN_DOT, pl.next_power_of_2(z))  # Triton's blocks are powers of 2; zero columns add nothing
  if z_pad != z:
    p_out = jnp.pad(p_out, ((0, 0), (0, z_pad - z)))
  precision = jax.lax.Precision.HIGHEST if p_out.dtype == jnp.float32 else None
  h = pl.pallas_call(
    functools.partial(_kernel, block_l=bl, l_steps=l // bl, precision=precision),
    out_shape=jax.ShapeDtypeStruct((b, k, z_pad), jnp.float32),
    # Example groups vary fastest (Triton's program id 0): the programs of one K block run together on S's rows.
    grid=(b // e, k // bk),
    in_specs=[
      pl.BlockSpec((e, bk, l), lambda g, i: (g, i, 0)),
      pl.BlockSpec((bk, l), lambda g, i: (i, 0)),
      pl.BlockSpec((l, z_pad), lambda g, i: (0, 0)),
    ],
    out_specs=pl.BlockSpec((e, bk, z_pad), lambda g, i: (g, i, 0)),
    compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="scale_project",
  )(g, scale, p_out)
  return h[..., :z] if z_pad != z else h


def sharded_scale_project(g, scale, p_out, *, mesh: Mesh | None, interpret: bool = False) -> jax.Array:
  """`scale_project` inside a jit over `mesh`: each device projects its own examples (batch on `data`)."""
  fn = functools.partial(scale_project, interpret=interpret)
  if mesh is None or mesh.size == 1:
    return fn(g, scale, p_out)
  if not mesh_supported(mesh):
    raise ValueError(f"scale_project runs over the batch only; mesh {dict(mesh.shape)} shards other axes.")
  return jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P("data"), check_vma=False)(
    g, scale, p_out
  )
