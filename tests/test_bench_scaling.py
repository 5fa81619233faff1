"""launch/bench_scaling.py --small runs on 2 fake CPU devices and reports every job at n = 1 and n = 2.

A smoke test of the benchmark script (CPU timings mean nothing): in a
subprocess, because the device count must be set before jax is imported.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = ("encode", "encode_d2h", "retrieve", "retrieve_host")


def test_bench_scaling_small():
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(
    [
      "timeout",
      "300",
      sys.executable,
      os.path.join(REPO, "launch", "bench_scaling.py"),
      "--small",
      "--steps=3",
      "--warmup=1",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=330,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  lines = out.stdout.splitlines()
  records = [json.loads(line) for line in lines if line.startswith("{")]
  assert sorted((r["job"], r["n"]) for r in records) == sorted((j, n) for j in JOBS for n in (1, 2))
  for r in records:
    per_step = r["global_rows"] * (16 if r["unit"] == "tok/s" else 1)  # --small: tokens = rows x seq 16
    assert r["global_rows"] == (2 if r["unit"] == "tok/s" else 512) * r["n"], r  # fixed per device
    assert abs(r["throughput"] * r["step_s"] / per_step - 1) < 1e-6, r
    assert 0 < r["min_s"] <= r["step_s"] <= r["max_s"], r
    assert 0 < r["efficiency"] < 10 and (r["n"] > 1 or r["efficiency"] == 1.0), r
  # The table: one row per (job, n) after its header.
  table = lines[next(i for i, line in enumerate(lines) if line.startswith("job ")) + 1 :]
  assert sorted((line.split()[0], int(line.split()[1])) for line in table if line.strip()) == sorted(
    (j, n) for j in JOBS for n in (1, 2)
  ), table
