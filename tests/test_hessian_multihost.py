"""fit_hessian over several processes: per-device partial sums of phi phi^T, reduced once, no phi gathered.

* `launch.fit_hessian` with 2 processes x 2 devices (jax.distributed on localhost, gloo) gives the
  R^{-1/2} and lambda of 1 process x 4 devices (relative error < 1e-5), full and block-diagonal.
* `hessian.second_moment` over batches spread over 2 processes equals a float64 NumPy sum
  (padding rows excluded), and its peak host memory (ru_maxrss) does not grow with the sample
  size, while gathering the same phi on every host (the previous multi-process path) does: the
  measurement can see the growth it rules out.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import test_encode_job as jobs  # launcher helpers: flags, environments, process groups, logs

from trackstar_jax import hessian as hessian_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# R^{-1/2} amplifies R's float32 rounding (a different summation order over processes) by R's condition number:
# dim 64 (4 blocks of 4 x 4) from 300 rows keeps R well conditioned, and float64 eigendecompositions (a float32
# eigh alone is ~1e-3 off for a rank-deficient R) make the 1e-5 comparison measure the accumulation.
OVERRIDES = dict(
  encoder__d_in=4, encoder__d_out=4, hessian__train_sample=300, hessian__top_k_eig=20, hessian__dtype="float64"
)


def _fit(workdir, tmp_path, name, *, processes, **extra):
  path = str(tmp_path / f"{name}.npz")
  over = {**OVERRIDES, **extra, "hessian__path": path}
  logs = [str(tmp_path / f"{name}_{i}.log") for i in range(processes)]
  if processes == 1:
    procs = [jobs._start("fit_hessian", workdir, logs[0], env=jobs._env(devices=4), **over)]
  else:
    port = jobs._free_port()
    procs = [
      jobs._start("fit_hessian", workdir, logs[i], env=jobs._env(devices=2, process_id=i, port=port), **over)
      for i in range(processes)
    ]
  jobs._finish(procs, logs)
  return hessian_lib.Hessian.load(path), logs


@pytest.mark.integration
@pytest.mark.parametrize("block_diagonal", [False, True])
def test_two_processes_fit_the_hessian_of_one(trained, tmp_path, block_diagonal):
  one, _ = _fit(trained.workdir, tmp_path, "one", processes=1, hessian__block_diagonal=block_diagonal)
  two, logs = _fit(trained.workdir, tmp_path, "two", processes=2, hessian__block_diagonal=block_diagonal)
  with open(logs[1]) as f:
    assert "process 1/2, local devices 2, global devices 4" in f.read()
  assert one.meta["n_train"] == two.meta["n_train"] == OVERRIDES["hessian__train_sample"]
  assert one.meta["n_eval"] == two.meta["n_eval"] == 60
  assert np.shape(two.inv_sqrt) == np.shape(one.inv_sqrt) == ((4, 16, 16) if block_diagonal else (64, 64))
  assert two.lam == pytest.approx(one.lam, rel=1e-5)
  rel = np.max(np.abs(two.inv_sqrt - one.inv_sqrt)) / np.max(np.abs(one.inv_sqrt))
  assert rel < 1e-5, rel


_SCRIPT = textwrap.dedent(
  """
  import json, resource, sys
  import numpy as np
  from trackstar_jax import mesh as mesh_lib
  mesh_lib.maybe_initialize_distributed()
  import jax
  from trackstar_jax import hessian

  D, B, BLOCKS = 512, 256, 4
  pi, pc = jax.process_index(), jax.process_count()
  mesh = mesh_lib.make_mesh()

  def local_batch(n, i):  # this process's rows of global batch i (deterministic; the last batch part padding)
    rng = np.random.default_rng([n, i, pi])
    phi = rng.standard_normal((B // pc, D), dtype=np.float32)
    valid = np.arange(i * B + pi * (B // pc), i * B + (pi + 1) * (B // pc)) < n
    phi[~valid] = 1e3  # padding rows are garbage: they must not count
    return phi, valid

  def streamed(n):
    for i in range(-(-n // B)):
      phi, valid = local_batch(n, i)
      g = mesh_lib.shard_batch({"phi": phi, "valid": valid}, mesh)
      yield g["phi"], g["valid"]

  def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  out = {}
  hessian.second_moment(streamed(B), block_diagonal=True, n_blocks=BLOCKS)  # compile + warm up
  hessian.second_moment(streamed(B))
  for block in (False, True):
    for n in (2048, 32768 - 100):
      before = maxrss_mb()
      r, count = hessian.second_moment(streamed(n), block_diagonal=block, n_blocks=BLOCKS)
      out[f"partials block={block} n={n}"] = dict(grow_mb=maxrss_mb() - before, count=count)
      ref = np.zeros((D, D))
      for i in range(-(-n // B)):  # every process's rows, in float64 on the host, one batch at a time
        for p in range(pc):
          rng = np.random.default_rng([n, i, p])
          phi = rng.standard_normal((B // pc, D), dtype=np.float32).astype(np.float64)
          valid = np.arange(i * B + p * (B // pc), i * B + (p + 1) * (B // pc)) < n
          ref += phi[valid].T @ phi[valid]
      ref /= n
      if block:
        db = D // BLOCKS
        ref = np.stack([ref[b * db:(b + 1) * db, b * db:(b + 1) * db] for b in range(BLOCKS)])
      out[f"partials block={block} n={n}"]["rel_err"] = float(np.max(np.abs(r - ref)) / np.max(np.abs(ref)))
  # The previous multi-process path, for comparison: every host gathers every sampled phi, then sums.
  for n in (2048, 32768 - 100):
    before = maxrss_mb()
    parts = [local_batch(n, i) for i in range(-(-n // B))]
    phi = mesh_lib.allgather(np.concatenate([p for p, _ in parts]))
    valid = mesh_lib.allgather(np.concatenate([v for _, v in parts]))
    hessian.second_moment([(phi, valid)])
    out[f"gathered n={n}"] = dict(grow_mb=maxrss_mb() - before)
    del parts, phi, valid
  if pi == 0:
    print("RESULT " + json.dumps(out), flush=True)
  """
)


def test_partial_sums_over_processes_are_exact_and_memory_flat(tmp_path):
  script = tmp_path / "accumulate.py"
  script.write_text(_SCRIPT)
  port = jobs._free_port()
  procs, logs = [], [str(tmp_path / f"p{i}.log") for i in range(2)]
  for i in range(2):
    with open(logs[i], "wb") as f:
      procs.append(
        subprocess.Popen(
          ["timeout", str(jobs.TIMEOUT_S), sys.executable, str(script)],
          cwd=REPO,
          env=jobs._env(devices=2, process_id=i, port=port),
          stdout=f,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
  jobs._finish(procs, logs)
  with open(logs[0]) as f:
    line = next(x for x in f.read().splitlines() if x.startswith("RESULT "))
  out = json.loads(line[len("RESULT ") :])
  print(json.dumps(out, indent=1))  # the measured figures (pytest -s shows them)
  small, large = 2048, 32768 - 100
  for block in (False, True):
    for n in (small, large):
      got = out[f"partials block={block} n={n}"]
      assert got["count"] == n
      assert got["rel_err"] < 1e-5, (block, n, got)
    # Peak host memory of the accumulation does not grow with N (16x more rows: < 8 MB more high-water mark) ...
    assert out[f"partials block={block} n={large}"]["grow_mb"] < 8, out
  # ... while gathering phi (32668 x 512 float32 = 64 MB per host) does.
  assert out[f"gathered n={large}"]["grow_mb"] > 48, out
