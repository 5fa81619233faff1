"""The benchmark scripts run in a tiny CPU configuration (no timing assertions: CPU timings mean nothing).

Each runs in a subprocess (the device count must be set before jax is imported)
and is checked on what it computed, not on its own arithmetic:
bench_scaling's --check compares every job's output at n = 1 and 2 devices
with a brute-force reference (per-example vmap(grad) encodings; a NumPy top-k).
"""

import gzip
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = ("encode", "encode_d2h", "retrieve", "retrieve_host")


def _run(script: str, *args: str, devices: int = 1, stdout: list | None = None) -> list[dict]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run(
    ["timeout", "300", sys.executable, os.path.join(REPO, "benchmarks", script), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=330,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  if stdout is not None:
    stdout.append(out.stdout)
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_scaling_small_checks_every_job_on_1_and_2_devices():
  records = _run("bench_scaling.py", "--small", "--steps=2", "--warmup=1", "--check", devices=2)
  assert sorted((r["job"], r["n"]) for r in records) == sorted((j, n) for j in JOBS for n in (1, 2))
  for r in records:
    assert r["global_rows"] == (2 if r["unit"] == "tok/s" else 512) * r["n"], r  # fixed work per device
    if r["job"].startswith("encode"):
      assert r["check_rel_err"] < 1e-4, r  # sharded fused phi == per-example brute force
    else:
      assert r["check_topk_exact"] is True, r  # sharded streaming top-k == NumPy argsort


def test_bench_retrieval_small():
  records = _run("bench_retrieval.py", "--small", "--steps=2")
  assert [(r["Q"], r["full_inv"]) for r in records] == [(8, False), (8, True)]
  assert all(r["step_ms"] > 0 and r["matmul_ms"] > 0 for r in records), records


def test_bench_encoder_small():
  records = _run(
    "bench_encoder.py",
    "--mode=all",
    "--model=tiny",
    "--dtype=float32",
    "--batch=2",
    "--seq=16",
    "--vocab=256",
    "--d=4",
    "--steps=2",
  )
  modes = {r["mode"]: r for r in records}
  assert set(modes) == {"train", "none", "adafactor", "adam_rank1", "adam"}, records
  assert "layer" in modes["adam"]["layer_modes"] and modes["none"]["layer_modes"] == ["fused"], records  # exact Adam


def test_bench_compact_small():
  records = _run("bench_compact.py", "--small")
  assert sorted((r["dtype"], r["source"]) for r in records) == sorted(
    (d, s) for d in ("bfloat16", "int8", "int4") for s in ("store", "memory")
  ), records
  size = {r["dtype"]: r["store_bytes"] for r in records}
  assert size["bfloat16"] > 1.8 * size["int8"] > 1.8 * 1.6 * size["int4"], size  # d = 256: 512 vs 260 vs 136 B/row
  assert all(r["rows_per_s"] > 0 and r["N"] == 512 for r in records), records


def test_bench_perf_small_prints_every_ratio():
  records = _run("bench_perf.py", "--small", "--repeat=1")
  sections = [r["section"] for r in records]
  assert sections == ["retrieval", "retrieval", "stream", "encode"], sections
  for r in records[:2]:
    assert r["bitwise_equal"] is True and r["rows_equal_inline_norms"] is True, r  # fused == reference selection
    assert r["kernel_bitwise_equal"] is True, r  # narrow_topk's kernel (its interpreter on CPU) == reference
    assert r["max_score_diff_inline_norms"] <= 1e-6, r
  assert set(records[2]["gbps"]) >= {
    "sequential_read", "h2d_pageable", "h2d_pinned", "retrieve_new", "feed_pinned", "store_read_direct",
    "store_read_tensorstore", "feed_tensorstore", "retrieve_new_tensorstore", "h2d_pieces", "retrieve_new_pieces",
    "feed_mapped", "feed_mapped_checked_first", "retrieve_new_buffered", "retrieve_new_first_scan", "retrieve_new_first_scan_warmed",
  }  # fmt: skip
  assert all(v > 0 for v in records[2]["gbps"].values()), records[2]
  assert records[2]["matmul_alone_s"] > 0 and records[2]["matmul_during_warm_s"] > 0, records[2]
  assert records[2]["warm_s"] is None  # CPU: no mapped windows, nothing to warm
  fixed = records[2]["fixed_s"]  # a scan's fixed costs, beside the scan they are part of
  assert set(fixed) == {"init_s", "result_s", "read_ids_s", "require_complete_s", "scan_s"} and all(
    v > 0 for v in fixed.values()
  ), fixed
  rates = records[3]["examples_per_s"]
  assert set(rates) == {
    "train",
    "kernel",
    "job_disk_pipelined",
    "job_disk_writes2",
    "job_disk_writes4",
    "job_disk_tensorstore",
    "job_disk_previous_loop",
    "job_disk_writes8",
    "job_disk_writes8_nosync",
    "job_memory_pipelined",
    "job_memory_previous_loop",
    "kernel_xla_layers",  # exact Adam's layers with einsums forced, beside the default (the Pallas kernel on a GPU)
    "job_disk_pipelined_xla_layers",
    "disk_write",  # the job's bytes written plainly to the same directory: the ceiling of a disk job
    "disk_write_nosync",
  }
  assert all(v > 0 for v in rates.values()), rates


def test_probes_small(tmp_path):
  """The one-off diagnostics BENCHMARKS.md quotes still run; every layout of the fused step is bitwise the default."""
  out = []
  _run("probes/probe_stream.py", str(tmp_path), "--small", stdout=out)
  probe = json.loads(out[-1].split("PROBE ", 1)[1].splitlines()[0])
  assert {"preadv threads=16", "device_put 256MiB pageable", "tensorstore iter_chunks rows=256 prefetch=4"} <= set(
    probe
  )
  assert all(v > 0 for v in probe.values()), probe
  _run("probes/probe_dma.py", str(tmp_path / "dma"), "--small", stdout=out)
  notes = json.loads(out[-1].split("NOTES ", 1)[1].splitlines()[0])
  probe = json.loads(out[-1].split("PROBE ", 1)[1].splitlines()[0])
  assert notes["dma_mapped_bytes_equal"] and not notes["dma_map"]  # the CPU client has no dma_map
  assert {"h2d dma_mapped numpy", "store read + h2d from mapped buffers", "memcpy 16 threads (bytes copied)"} <= set(
    probe
  )
  assert all(v > 0 for v in probe.values()), probe
  _run("probes/probe_selection.py", "groups", "--small", stdout=out)
  groups = [line for line in out[-1].splitlines() if line.startswith("GROUPS")]
  assert len(groups) == 8 and all(line.endswith("equal_to_default True") for line in groups), groups
  _run("probes/probe_selection.py", "kernels", "--small", stdout=out)  # narrow_topk's settings, in its interpreter
  kernels = [line for line in out[-1].splitlines() if line.startswith("KERNELS") and "matmul" not in line]
  assert len(kernels) == 5 and all(line.endswith("equal True equal_nan_inf_zero True") for line in kernels), kernels
  _run("probes/probe_layer_grad.py", "small", stdout=out)
  errors = [float(line.rsplit(" ", 1)[1]) for line in out[-1].splitlines() if line.startswith("VARIANT")]
  assert len(errors) == 8 and max(errors) < 1e-5, out[-1]  # float32 on CPU: every variant is the same phi
  parts = [line.split()[1] for line in out[-1].splitlines() if line.startswith("PART")]
  assert parts == ["g_matmul", "scale_project"], out[-1]
  _run("probes/probe_first_retrieve.py", "--small", stdout=out)
  first = json.loads([line for line in out[-1].splitlines() if line.startswith("{")][-1])
  assert first["brute_force_ok"] and first["first_events_s"]["/jax/core/compile/backend_compile_duration"] > 0


def test_trace_summary_counts_overlaps_once_and_ignores_host(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import trace_summary  # pylint: disable=g-import-not-at-top

  run = tmp_path / "plugins" / "profile" / "run1"
  run.mkdir(parents=True)
  events = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 1, "tid": 1, "name": "gemm", "ts": 0, "dur": 10},
    {"ph": "X", "pid": 1, "tid": 2, "name": "copy", "ts": 5, "dur": 10},  # overlaps gemm: busy counted once
    {"ph": "X", "pid": 1, "tid": 1, "name": "gemm", "ts": 20, "dur": 10},  # after a 5 us gap
    {"ph": "X", "pid": 2, "tid": 1, "name": "python", "ts": 0, "dur": 1000},  # host: not device time
  ]
  with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  got = trace_summary.summarize(str(tmp_path))
  assert got["device_processes"] == ["/device:GPU:0"] and got["events"] == 3
  assert got["span_ms"] == 0.030 and got["busy_ms"] == 0.025 and got["longest_gaps_ms"] == [0.005]
  assert abs(got["idle_share"] - 5 / 30) < 1e-12
  assert got["gaps"] == [{"at_ms": 0.015, "ms": 0.005, "after": "copy", "before": "gemm"}]  # copy ended last
  assert [(k["name"], k["count"]) for k in got["top_kernels"]] == [("gemm", 2), ("copy", 1)]
