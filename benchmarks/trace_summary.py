"""What a `jax.profiler` trace says the accelerator did: busy fraction, idle gaps, top kernels.

  with trace_summary.traced(log_dir):     # jax.profiler.trace(..., create_perfetto_trace=True)
    run_the_loop()
  print(json.dumps(trace_summary.summarize(log_dir)))

  python benchmarks/trace_summary.py LOG_DIR        # a trace written earlier

Reads the newest `perfetto_trace.json.gz` under LOG_DIR. Device events are
those of processes whose name holds "GPU" or "TPU" (XLA's per-device streams);
the summary gives the span from the first to the last device event, the union
of their busy intervals (so overlapping streams count once), the idle share of
the span (time the device waited on the host: input, copies, dispatch), the
longest idle gaps (where they fall, and the events on each side), and the
kernels with the most total time. A job whose idle share is large is
host-bound; one with none is as fast as its kernels.
"""

import argparse
import contextlib
import glob
import gzip
import json
import os


@contextlib.contextmanager
def traced(log_dir: str):
  import jax  # pylint: disable=g-import-not-at-top

  os.makedirs(log_dir, exist_ok=True)
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    yield


def _events(log_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"No perfetto_trace.json.gz under {log_dir}: trace with create_perfetto_trace=True.")
  with gzip.open(paths[-1], "rt") as f:
    obj = json.load(f)
  return obj["traceEvents"] if isinstance(obj, dict) else obj


def summarize(log_dir: str, *, top: int = 12) -> dict:
  events = _events(log_dir)
  names = {
    e["pid"]: e.get("args", {}).get("name", "")
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  device = {pid for pid, n in names.items() if ("GPU" in n or "TPU" in n) and "host" not in n.lower()}
  spans = sorted(
    (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", ""))
    for e in events
    if e.get("ph") == "X" and e.get("pid") in device and float(e.get("dur", 0)) > 0
  )
  if not spans:
    return {"device_processes": sorted(names[p] for p in device), "events": 0}
  busy, gaps, end, last = 0.0, [], spans[0][0], ""
  for a, b, n in spans:
    if a > end:
      gaps.append((a - end, end - spans[0][0], last, n))
    busy += max(0.0, b - max(a, end))
    if b >= end:
      end, last = b, n
  span = end - spans[0][0]
  longest = sorted(gaps, reverse=True)[:top]
  by_name: dict[str, list[float]] = {}
  for a, b, n in spans:
    t = by_name.setdefault(n, [0.0, 0])
    t[0] += b - a
    t[1] += 1
  kernels = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
  return {
    "device_processes": sorted(names[p] for p in device),
    "events": len(spans),
    "span_ms": span / 1e3,
    "busy_ms": busy / 1e3,
    "idle_share": 1 - busy / span if span else 0.0,
    "longest_gaps_ms": [g[0] / 1e3 for g in longest[:5]],
    # Where they fall (ms from the first device event, in time order) and what ran on each side:
    # a gap after the last copy of a scan and before the next one's first is host set-up, not feeding.
    "gaps": [
      {"at_ms": at / 1e3, "ms": g / 1e3, "after": prev[:60], "before": nxt[:60]}
      for g, at, prev, nxt in sorted(longest, key=lambda g: g[1])
    ],
    "top_kernels": [
      {"name": n[:120], "total_ms": t / 1e3, "count": c, "share_of_busy": t / busy} for n, (t, c) in kernels
    ],
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("log_dir")
  p.add_argument("--top", type=int, default=12)
  a = p.parse_args()
  print(json.dumps(summarize(a.log_dir, top=a.top), indent=1))


if __name__ == "__main__":
  main()
