"""Weak scaling from 1 to N local devices: encoding and retrieval, in one process.

  python benchmarks/bench_scaling.py                        # GPU: n = 1, 2, 4, ... of the local devices
  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
    python benchmarks/bench_scaling.py --small              # CPU smoke test: tiny shapes, not a benchmark

For each job and each n (powers of two up to the local device count), a mesh
`mesh.make_mesh(devices=jax.devices()[:n])` with one "data" axis, and a fixed
amount of work PER DEVICE, so the global work grows with n (weak scaling):

  encode          `TrackStarEncoder(..., mesh=mesh).encode(batch)`: model `small`,
                  bf16, per-device batch 64 x 256 tokens (global 64 n), d_in =
                  d_out = 64 (d = 2^16), exact Adam correction with synthetic
                  second moments. The batch is a fresh host numpy dict every
                  step: its host->device transfer (`mesh.shard_batch`) is INSIDE
                  the timed step, as in an encode job fed by a numpy pipeline.
  encode_d2h      the same, plus phi [64 n, d] float32 back to the host
                  (`np.asarray`) every step, as `pipeline.encode_corpus` does
                  before writing the store (same encoder: no extra compilation).
  retrieve        `StreamingTopK(queries, k=10, mesh=mesh).update(...)`: Q = 1024
                  queries, d = 4096, per-device chunk 65536 rows (global 65536 n),
                  bf16 matmul, no R^{-1/2}. The chunk phi is a device array
                  already sharded over "data" (compute only; `update` still sends
                  the chunk's [rows] validity mask from the host each step).
  retrieve_host   the same steps fed host numpy bf16 chunks: the chunk's
                  host->device transfer (rows x d x 2 bytes per device per step)
                  is inside the timed step, as in `retrieval.retrieve`, less the
                  store read.

Step time: median over --steps steps (each dispatched, then
`jax.block_until_ready`) after --warmup steps, the first of which compiles
(reported as first_s). Also reported: the mean step over --steps steps
dispatched back to back with one final block ("pipelined"), which hides
dispatch and host work behind device work. Throughput = global tokens (or
rows) per median step; efficiency = throughput(n) / (n x throughput(1)) = step(1) /
step(n). SPEC target: >= 0.90 at n = 2 for encode and retrieve; the encode_d2h
and retrieve_host rows show what moving phi across PCIe adds on top.

Output: one JSON line per (job, n), then a table. Data are random (non-zero);
speed does not depend on their values. On CPU the "devices" share the host's
cores, so efficiencies there mean nothing. Run time on 2 GPUs: ~2 minutes,
mostly one encoder compilation per n.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALL_JOBS = ("encode", "encode_d2h", "retrieve", "retrieve_host")
# Full-size defaults (GPU) and --small ones (a CPU smoke test in seconds).
DEFAULTS = dict(
  model="small", dtype="bfloat16", batch=64, seq=256, vocab=16384, d=64, rows=65536, dim=4096, queries=1024, k=10
)
SMALL = dict(model="tiny", dtype="float32", batch=2, seq=16, vocab=256, d=4, rows=512, dim=64, queries=8, k=4)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
p.add_argument("--jobs", default=",".join(ALL_JOBS), help=f"comma-separated, of {','.join(ALL_JOBS)}")
p.add_argument("--max_devices", type=int, default=0, help="largest n (0 = all local devices)")
p.add_argument("--steps", type=int, default=10, help="timed steps per (job, n)")
p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
p.add_argument("--model", help="encode: model preset (default small; --small: tiny)")
p.add_argument("--dtype", help="encode: model compute dtype (default bfloat16; --small: float32)")
p.add_argument("--batch", type=int, help="encode: examples per device per step (default 64)")
p.add_argument("--seq", type=int, help="encode: sequence length (default 256)")
p.add_argument("--vocab", type=int, help="encode: vocabulary size (default 16384)")
p.add_argument("--d", type=int, help="encode: d_in = d_out per block (default 64)")
p.add_argument("--correction", default="adam", help="encode: none | adam | adam_rank1 | adafactor")
p.add_argument("--rows", type=int, help="retrieve: chunk rows per device per step (default 65536)")
p.add_argument("--dim", type=int, help="retrieve: encoding dim (default 4096)")
p.add_argument("--queries", type=int, help="retrieve: number of queries Q (default 1024)")
p.add_argument("--k", type=int, help="retrieve: top-k / bottom-k per query (default 10)")
p.add_argument(
  "--check",
  action="store_true",
  help="also check every job's output against a brute-force "
  "reference at each n (vmap(grad) phi; a float32 top-k vs NumPy): check_* fields",
)
args = p.parse_args()
for key, value in (SMALL if args.small else DEFAULTS).items():
  if getattr(args, key) is None:
    setattr(args, key, value)
JOBS = tuple(j for j in args.jobs.split(",") if j)
unknown = set(JOBS) - set(ALL_JOBS)
if unknown:
  p.error(f"unknown jobs {sorted(unknown)}")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import trackstar_jax as tsj
from trackstar_jax import configs
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.models.transformer import DecoderLM, TransformerConfig
from trackstar_jax.retrieval import StreamingTopK


def device_counts() -> list[int]:
  """1, 2, 4, ... up to the local device count (or --max_devices)."""
  total = len(jax.local_devices())
  if args.max_devices:
    total = min(total, args.max_devices)
  counts = [1]
  while counts[-1] * 2 <= total:
    counts.append(counts[-1] * 2)
  return counts


def time_steps(step, wait) -> dict[str, float]:
  """Times step() (each followed by wait(), which blocks until it ran), after warm-up.

  Returns first_s (the first warm-up step, with compilation), step_s (median of
  --steps blocked steps), min_s, max_s, pipelined_s (mean of --steps steps
  dispatched back to back, one block at the end).
  """
  times = []
  for _ in range(args.warmup + args.steps):
    t = time.perf_counter()
    step()
    wait()
    times.append(time.perf_counter() - t)
  first, timed = times[0], times[args.warmup :]
  t = time.perf_counter()
  for _ in range(args.steps):
    step()
  wait()
  pipelined = (time.perf_counter() - t) / args.steps
  return dict(first_s=first, step_s=statistics.median(timed), min_s=min(timed), max_s=max(timed), pipelined_s=pipelined)


# ----------------------------------------------------------------------------- encode


def bench_encode(counts: list[int]):
  """Yields a result dict per (encode job, n): TrackStarEncoder.encode on numpy batches of args.batch * n rows."""
  mc = configs.model_config(args.model, max_len=args.seq)
  mc.dtype = args.dtype
  model = DecoderLM(TransformerConfig.from_config(mc, vocab_size=args.vocab))
  params = jax.jit(model.init)(jax.random.key(0), np.ones((1, args.seq), np.int32))
  # Synthetic optimizer state (positive, non-constant): speed does not depend on the values.
  if args.correction in ("adam", "adam_rank1"):
    opt_state = optax.scale_by_adam().init(params)
    opt_state = opt_state._replace(
      nu=jax.tree.map(
        lambda x: 1e-4 + 1e-6 * jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) / x.size, opt_state.nu
      )
    )
  elif args.correction == "adafactor":
    opt_state = optax.scale_by_factored_rms(min_dim_size_to_factor=32).init(params)
    opt_state = jax.tree.map(lambda x: x + 1e-4 if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state)
  else:
    opt_state = None
  rng = np.random.default_rng(0)
  for n in counts:
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:n])
    enc = tsj.build_encoder(
      model=model,
      params=params,
      opt_state=opt_state,
      seq_len=args.seq,
      mesh=mesh,
      d_in=args.d,
      d_out=args.d,
      correction=args.correction,
    )
    b = args.batch * n

    def new_batch():
      tokens = rng.integers(1, args.vocab, (b, args.seq)).astype(np.int32)
      return dict(
        inputs=tokens,
        targets=np.roll(tokens, -1, 1),
        loss_mask=np.ones(tokens.shape, np.float32),
        pad_mask=np.ones(tokens.shape, bool),
        ids=np.arange(b),
      )

    # A few distinct host batches, cycled: each step sends one to the devices again.
    batches = [new_batch() for _ in range(4)]
    out = [None, 0]

    def step():
      out[0] = enc.encode(batches[out[1] % len(batches)])
      out[1] += 1

    def step_d2h():
      step()
      out[0] = np.asarray(out[0])  # phi [b, dim] float32 to the host, as the encode job does per batch

    info = dict(
      n=n,
      per_device=f"{args.batch}x{args.seq}",
      global_rows=b,
      unit="tok/s",
      model=args.model,
      dtype=args.dtype,
      dim=enc.dim,
      correction=enc.correction.kind,
      modes=sorted(set(enc.modes().values())),
    )
    if args.check:  # the sharded fused encoding against the brute-force per-example gradients
      got, want = np.asarray(enc.encode(batches[0]), np.float64), np.asarray(enc.reference(batches[0]), np.float64)
      info["check_rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    for job, fn in (("encode", step), ("encode_d2h", step_d2h)):
      if job in JOBS:
        r = time_steps(fn, lambda: jax.block_until_ready(out[0]))
        assert out[0].shape == (b, enc.dim) and np.all(np.isfinite(out[0])), out[0].shape
        yield dict(job=job, throughput=b * args.seq / r["step_s"], **info, **r)


# ----------------------------------------------------------------------------- retrieve


def bench_retrieve(counts: list[int], *, host: bool):
  """Yields one result dict per n: StreamingTopK.update on chunks of args.rows * n rows."""
  rng = np.random.default_rng(1)
  q = rng.standard_normal((args.queries, args.dim), np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  if host:  # A random block tiled to the chunk: fast to build, and the values do not matter for speed.
    block = rng.standard_normal((min(args.rows, 4096), args.dim), np.float32).astype(jnp.bfloat16)
  for n in counts:
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:n])
    topk = StreamingTopK(q, k=args.k, mesh=mesh, matmul_dtype="bfloat16")
    c = args.rows * n
    ids = np.arange(c, dtype=np.int64)
    if host:
      phi = np.tile(block, (-(-c // block.shape[0]), 1))[:c]
    else:  # Generated on the devices, already split by rows over "data": update's device_put is a no-op.
      phi = jax.jit(
        lambda key: jax.random.normal(key, (c, args.dim), jnp.bfloat16), out_shardings=mesh_lib.data_sharding(mesh, 2)
      )(jax.random.key(n))
    start = [0]

    def step():
      topk.update(start=start[0], ids=ids, phi=phi)
      start[0] = (start[0] + c) % (2**30)  # Row offsets only; stay clear of the int32 row limit.

    r = time_steps(step, topk.wait)
    top_v = topk.local_result()[0]
    assert top_v.shape == (args.queries, args.k) and np.all(np.isfinite(top_v)), top_v
    flops = 2 * args.queries * c * args.dim
    if args.check:  # one exact (float32) step on this mesh against a NumPy top-k of the same chunk
      exact = StreamingTopK(q, k=args.k, mesh=mesh, matmul_dtype="float32")
      exact.update(start=0, ids=ids, phi=phi)
      rows = exact.local_result()[1]
      x = np.asarray(phi, np.float64)
      scores = (q.astype(np.float64) @ x.T) / np.linalg.norm(x, axis=1)
      r["check_topk_exact"] = bool(np.array_equal(np.sort(rows, 1), np.sort(np.argsort(-scores, 1)[:, : args.k], 1)))
    yield dict(
      job="retrieve_host" if host else "retrieve",
      n=n,
      per_device=f"{args.rows}x{args.dim}",
      global_rows=c,
      unit="rows/s",
      throughput=c / r["step_s"],
      tflops=flops / r["step_s"] / 1e12,
      queries=args.queries,
      k=args.k,
      chunk_gib_per_device=args.rows * args.dim * 2 / 2**30,
      **r,
    )


def main():
  counts = device_counts()
  devs = jax.devices()
  print(
    f"# {len(jax.local_devices())} local devices ({devs[0].platform}, {devs[0].device_kind}); "
    f"n = {counts}; jax {jax.__version__}",
    flush=True,
  )
  runs = []
  if {"encode", "encode_d2h"} & set(JOBS):
    runs.append(bench_encode(counts))  # one encoder (one compilation) per n serves both encode jobs
  runs += [bench_retrieve(counts, host=job == "retrieve_host") for job in ("retrieve", "retrieve_host") if job in JOBS]
  results, base = [], {}
  for run in runs:
    for r in run:
      base.setdefault(r["job"], r)  # n = 1 comes first
      r["efficiency"] = r["throughput"] / (r["n"] * base[r["job"]]["throughput"])
      r["device"] = devs[0].device_kind
      results.append(r)
      print(json.dumps(r), flush=True)
  print(
    f"\nweak scaling ({devs[0].device_kind}; step = median of {args.steps}; efficiency = "
    f"throughput(n) / (n x throughput(1)))"
  )
  print(
    f"{'job':<14}{'n':>3}  {'per device':<12}{'step ms':>10}{'pipelined ms':>14}{'throughput':>14}  "
    f"{'unit':<7}{'efficiency':>10}{'first s':>9}"
  )
  for r in sorted(results, key=lambda r: (ALL_JOBS.index(r["job"]), r["n"])):
    print(
      f"{r['job']:<14}{r['n']:>3}  {r['per_device']:<12}{r['step_s'] * 1e3:>10.2f}"
      f"{r['pipelined_s'] * 1e3:>14.2f}{r['throughput']:>14.4g}  {r['unit']:<7}{r['efficiency']:>10.3f}"
      f"{r['first_s']:>9.1f}"
    )


if __name__ == "__main__":
  main()
