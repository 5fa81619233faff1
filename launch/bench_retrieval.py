"""Retrieval step vs a bare bf16 matmul of the same shape: old and new step, same run.

  python launch/bench_retrieval.py           # one GPU, the shapes README "Results" quotes (~1 min)
  python launch/bench_retrieval.py --small   # CPU: tiny shapes, checks that the script runs
  python launch/bench_retrieval.py --groups=32,16   # the new step with other group sizes (old: default)

Per shape, one compiled executable each of: the bare jnp.dot [Q, d] x [d, C]
(bf16 in, f32 out); the step before the single-read selection (`legacy_step`,
kept here as it was, only to compare against); and `StreamingTopK`'s step.
Same process, same random data on device. A time is the median of 20 samples,
each 5 back-to-back calls (block_until_ready at the end) divided by 5, after
a warm-up. Before timing, old and new each take one step from an empty state
over a chunk with 10% padding rows and must agree: "bitwise", or within a few
ulp where XLA fuses the norms' sum of squares differently (CPU: into the dot).
"passes" counts the writes + reads of an f32 [Q, C]-sized buffer (the score
block) in the compiled HLO, the memory traffic the rewrite removes.
"""

import argparse
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from trackstar_jax import retrieval as R

# (Q, d, C, k, full R^{-1/2}); the GPU ones are README's. Small: C = 3000 leaves a last partial group.
SHAPES = [(1024, 4096, 65536, 10, False), (4096, 4096, 65536, 10, False), (1024, 16384, 16384, 10, False),
          (1024, 1024, 65536, 10, False), (16, 4096, 65536, 10, False), (1024, 4096, 65536, 100, False),
          (1024, 4096, 65536, 10, True), (4096, 1024, 65536, 10, True)]
SMALL = [(64, 128, 4096, 10, False), (128, 64, 3000, 10, True), (16, 128, 4096, 5, False)]


# --- The step as it was: scaled and masked score copies, one selection per side. ---
_default_group_sizes = R.group_sizes  # the old step keeps these under --groups


def _legacy_candidates(vals, k, groups):
  q, c = vals.shape
  if not groups:
    return vals, jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (q, c))
  g = groups[0]
  grouped = vals.reshape(q, c // g, g)
  cand_v, cand_i = _legacy_candidates(grouped.max(axis=-1), k, groups[1:])
  _, j = lax.top_k(cand_v, k)
  gi = jnp.sort(jnp.take_along_axis(cand_i, j, axis=-1), axis=-1)
  new_vals = jnp.take_along_axis(grouped, gi[:, :, None], axis=1).reshape(q, k * g)
  return new_vals, (gi[:, :, None] * g + jnp.arange(g, dtype=jnp.int32)).reshape(q, k * g)


def _legacy_merge(vals, rows, new_vals, row0, k, groups=()):
  span = math.prod(groups)
  pad = -new_vals.shape[1] % span
  if pad:
    new_vals = jnp.pad(new_vals, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  new_vals, cols = _legacy_candidates(new_vals, k, tuple(groups))
  v, i = lax.top_k(jnp.concatenate([vals, new_vals], axis=-1), k)
  return v, jnp.take_along_axis(jnp.concatenate([rows, row0 + cols], axis=-1), i, axis=-1)


def legacy_step(t: R.StreamingTopK):
  """The old jitted step for t's mesh, queries and k (bf16, normalize); state: 4 x [n_dev, Q, k]."""
  axes, k, mm = tuple(t.mesh.axis_names), t.k, jnp.bfloat16

  def local_step(qm, inv, state, phi, valid, row0):
    top_v, top_r, bot_v, bot_r = (s[0] for s in state)
    c = phi.shape[0]
    row0 = row0 + lax.axis_index(axes) * c
    groups = _default_group_sizes(c, k)
    phi = phi.astype(mm)
    s = jnp.dot(qm, phi.T, preferred_element_type=jnp.float32)
    s = s * R._inv_norm(phi if inv is None else R._apply_inv(phi, inv, mm))[None, :]  # pylint: disable=protected-access
    top_v, top_r = _legacy_merge(top_v, top_r, jnp.where(valid, s, -jnp.inf), row0, k, groups)
    bot_v, bot_r = _legacy_merge(bot_v, bot_r, jnp.where(valid, -s, -jnp.inf), row0, k, groups)
    return tuple(x[None] for x in (top_v, top_r, bot_v, bot_r))

  sspec = (P(axes, None, None),) * 4
  inv_spec = None if t._inv is None else P()  # pylint: disable=protected-access
  fn = R._shard_map(local_step, mesh=t.mesh, in_specs=(P(), inv_spec, sspec, P(axes, None), P(axes), P()),  # pylint: disable=protected-access
                    out_specs=sspec)
  return jax.jit(fn, donate_argnums=(2,))


def legacy_state(t: R.StreamingTopK):
  q = t._q.shape[0]  # pylint: disable=protected-access
  return tuple(jnp.full((t.n_dev, q, t.k), fill, dtype) for fill, dtype in ((-np.inf, jnp.float32), (-1, jnp.int32)) * 2)


def empty_state(t: R.StreamingTopK):
  """A fresh copy of t's initial state (steps donate theirs)."""
  return tuple(jax.device_put(np.full(x.shape, fill, x.dtype), x.sharding)
               for x, fill in zip(t._state, (-np.inf, -1)))  # pylint: disable=protected-access


# --- Score-block traffic in compiled HLO text (CPU or GPU). ---
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_F32 = re.compile(r"\bf32\[([\d,]+)\]")
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "call", "while", "conditional",
         "async-start", "async-update", "async-done"}
_SPARSE = {"gather", "dynamic-slice"}  # read a few elements of their first operand


def _computations(hlo: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """name -> [(instruction, shape, opcode, rest of line)]."""
  comps, cur = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      cur = comps.setdefault(re.match(r"(?:ENTRY )?%?([\w.\-]+)", line).group(1), [])
    elif cur is not None and (m := _INSTR.match(line)):
      cur.append(m.groups())
  return comps


_ELEMENTWISE = {"bitcast", "reshape", "broadcast", "convert", "select", "compare", "multiply", "negate", "add",
                "subtract", "maximum", "minimum", "and", "or", "not"}


def _only_gathered(body, value: str, big) -> bool:
  """Whether a fusion body reads `value` only at gathered elements or small slices (elementwise ops between)."""
  users = [i for i in body if re.search(rf"%{re.escape(value)}\b", i[3].split("), ")[0])]
  return bool(users) and all(
      (op in _SPARSE and re.match(rf"\s*(?:\S+ )?%{re.escape(value)}\b", rest))
      or (op == "slice" and not big(shape))
      or (op in _ELEMENTWISE and _only_gathered(body, name, big)) for name, shape, op, rest in users)


def score_passes(hlo: str, q: int, c: int) -> int:
  """Full writes + reads of f32 buffers of >= q * c / 2 elements led by q (the score block), in compiled HLO.

  Counts instructions outside fusion bodies and reducers; a read only through a gather or a small slice
  is not a pass.
  """
  def big(shape_text):
    for m in _F32.finditer(shape_text):
      dims = [int(x) for x in m.group(1).split(",")]
      while dims and dims[0] in (1, 2) and dims[0] != q:  # [1, Q, C], [2, Q, C]
        dims = dims[1:]
      if dims and dims[0] == q and 2 * math.prod(dims) >= q * c:  # slices of most of it count too
        return True
    return False

  comps = _computations(hlo)
  inner = set(re.findall(r" fusion\(.*?calls=%?([\w.\-]+)", hlo))
  inner |= {m for line in hlo.splitlines() if " call(" not in line for m in re.findall(r"to_apply=%?([\w.\-]+)", line)}
  inner |= set(re.findall(r"called_computations=\{%?([\w.\-]+)", hlo))
  shapes = {i[0]: i[1] for name, body in comps.items() if name not in inner for i in body}
  passes = 0
  for name, body in comps.items():
    if name in inner:
      continue
    for _, shape, op, rest in body:
      if op in _FREE:
        continue
      passes += big(shape)
      operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
      fused = re.search(r"calls=%?([\w.\-]+)", rest) if op == "fusion" else None
      params = {}
      if fused:  # operand index -> parameter name in the fusion body
        params = {int(m.group(1)): n for n, _, o, r in comps.get(fused.group(1), []) if o == "parameter"
                  for m in [re.match(r"(\d+)\)", r)] if m}
      for idx, ref in enumerate(operands):
        if ref not in shapes or not big(shapes[ref]) or ref in operands[:idx]:
          continue
        if (op in _SPARSE and idx == 0) or (idx in params and _only_gathered(comps[fused.group(1)], params[idx], big)):
          continue
        passes += 1
  return passes


def median_ms(fn, state, samples=20, inner=5):
  """Median per-call time of state = fn(state); returns (ms, last state)."""
  state = jax.block_until_ready(fn(state))  # warm-up
  ts = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(inner):
      state = fn(state)
    jax.block_until_ready(state)
    ts.append((time.perf_counter() - t0) / inner)
  return 1e3 * float(np.median(ts)), state


def bench(q_n, d, c, k, use_inv, seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(k1, (q_n, d), jnp.float32)
  phi = jax.random.normal(k2, (c, d), jnp.bfloat16)
  inv = jnp.eye(d) + 0.01 * jax.random.normal(k3, (d, d)) if use_inv else None
  inv = None if inv is None else (inv + inv.T) / 2  # symmetric, as R^{-1/2}
  qb = q.astype(jnp.bfloat16)
  mm = jax.jit(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32)).lower(qb, phi).compile()
  t = R.StreamingTopK(q, k=k, matmul_dtype="bfloat16", inv_sqrt=inv, mesh=jax.sharding.Mesh(
      np.asarray(jax.local_devices()[:1]), ("data",)))
  phi_s = jax.device_put(phi, t._phi_sharding)  # pylint: disable=protected-access
  all_valid = jax.device_put(jnp.ones(c, bool), t._rows_sharding)  # pylint: disable=protected-access
  some_valid = jax.device_put(jax.random.uniform(k4, (c,)) > 0.1, t._rows_sharding)  # pylint: disable=protected-access
  row0 = jnp.int32(0)
  args = (t._q, t._inv)  # pylint: disable=protected-access
  new = t._step.lower(*args, empty_state(t), phi_s, all_valid, row0).compile()  # pylint: disable=protected-access
  old = legacy_step(t).lower(*args, legacy_state(t), phi_s, all_valid, row0).compile()

  # Agreement: one step from an empty state, 10% padding rows. The selection is exact, so old and new
  # differ only where XLA fuses the norm's sum of squares differently (CPU: into the dot), by an ulp.
  nv, nr = (np.asarray(x[0]) for x in new(*args, empty_state(t), phi_s, some_valid, row0))
  ov, orow, obv, obr = (np.asarray(x[0]) for x in old(*args, legacy_state(t), phi_s, some_valid, row0))
  ov, orow = np.stack([ov, obv]), np.stack([orow, obr])
  ulps = int(np.max(np.abs(nv.view(np.int32).astype(np.int64) - ov.view(np.int32))))
  same_rows = float(np.mean(nr == orow))
  assert ulps <= 4 and same_rows >= 0.999, f"old != new: {ulps} ulp, {same_rows:.4%} rows equal"
  agree = "bitwise" if ulps == 0 and same_rows == 1 else f"{ulps} ulp, {same_rows:.2%} rows"

  t_mm, _ = median_ms(lambda _: mm(qb, phi), None)
  t_old, _ = median_ms(lambda st: old(*args, st, phi_s, all_valid, row0), legacy_state(t))
  t_new, _ = median_ms(lambda st: new(*args, st, phi_s, all_valid, row0), empty_state(t))
  p_old, p_new = score_passes(old.as_text(), q_n, c), score_passes(new.as_text(), q_n, c)
  return t_mm, t_old, t_new, p_old, p_new, agree


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU)")
  parser.add_argument("--groups", default="", help="e.g. 32,16: the new step's group sizes instead of group_sizes()")
  args = parser.parse_args()
  shapes = SMALL if args.small else SHAPES
  if args.groups:  # traced inside the step, so replacing the module's function is enough
    groups = tuple(int(g) for g in args.groups.split(","))
    R.group_sizes = lambda rows, k: groups
    print(f"new step groups: {groups}")
  print(f"device: {jax.devices()[0].device_kind}", flush=True)
  rows = []
  for q_n, d, c, k, use_inv in shapes:
    t0 = time.perf_counter()
    t_mm, t_old, t_new, p_old, p_new, agree = bench(q_n, d, c, k, use_inv)
    rows.append((q_n, d, c, k, use_inv, t_mm, t_old, t_new, t_mm / t_old, t_mm / t_new, p_old, p_new, agree))
    print(f"Q={q_n} d={d} C={c} k={k} inv={use_inv}: matmul {2 * q_n * d * c / t_mm / 1e9:.1f} TF/s, "
          f"old {t_old:.3f} ms, new {t_new:.3f} ms, old vs new: {agree} ({time.perf_counter() - t0:.1f} s)", flush=True)
  print("\n|    Q |     d |     C |   k | inv | matmul ms | old ms | new ms | old ratio | new ratio | passes old/new | old vs new |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print("| {:4d} | {:5d} | {:5d} | {:3d} | {:3s} | {:9.3f} | {:6.3f} | {:6.3f} | {:9.2f} | {:9.2f} | {:>8d}/{:<5d} | {} |".format(
        *r[:4], "yes" if r[4] else "no", *r[5:]))


if __name__ == "__main__":
  main()
