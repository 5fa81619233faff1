"""How long a first `retrieve` takes at LAMA's shapes, and how much of it is compiling.

  python benchmarks/probes/probe_first_retrieve.py                     # GPU host: Q 15,652, N 64,919, d 2^16
  XLA_FLAGS=--xla_gpu_autotune_level=0 python benchmarks/probes/probe_first_retrieve.py   # a variant
  python benchmarks/probes/probe_first_retrieve.py --small             # CPU smoke test

A one-off diagnostic (BENCHMARKS.md, "Encode job", run P1's note: a first LAMA retrieval took 42.8 s for
one chunk, a second 0.1 s). One process, no persistent compilation cache: a random bf16 corpus in memory
(`InMemoryEncodings`), unit float32 queries, `retrieval.retrieve` called twice. Prints one JSON line: each
call's wall time, the seconds jax's monitoring events attribute to tracing, lowering and the backend
compile, a digest of the top ids (equal digests: the same proponents, e.g. across XLA flag variants) and
whether a brute force over the first queries agrees.
"""

import collections
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402

from trackstar_jax import retrieval  # noqa: E402

small = "--small" in sys.argv
Q, N, D = (16, 300, 64) if small else (15652, 64919, 65536)

durations: dict[str, float] = collections.defaultdict(float)
jax.monitoring.register_event_duration_secs_listener(
  lambda event, secs, **_: durations.__setitem__(event, durations[event] + secs)
)

rng = np.random.default_rng(0)
block = rng.standard_normal((min(4096, N), D), dtype=np.float32).astype(jax.numpy.bfloat16)
corpus = np.empty((N, D), dtype=block.dtype)
for i, s in enumerate(range(0, N, len(block))):  # one random block, rolled per piece: 8.5 GB in seconds
  corpus[s : s + len(block)] = np.roll(block, 7 * i, axis=1)[: N - s]
queries = rng.standard_normal((Q, D), dtype=np.float32)
queries /= np.linalg.norm(queries, axis=1, keepdims=True)
store = retrieval.InMemoryEncodings(corpus)


def _norms(x):
  return np.concatenate([np.linalg.norm(x[s : s + 4096].astype(np.float32), axis=1) for s in range(0, len(x), 4096)])


record = dict(device=str(jax.devices()[0]), queries=Q, rows=N, dim=D, xla_flags=os.environ.get("XLA_FLAGS", ""))
for call in ("first", "second"):
  before = dict(durations)
  t = time.perf_counter()
  res = retrieval.retrieve(store, queries, k=10)
  record[f"{call}_s"] = round(time.perf_counter() - t, 3)
  spent = {e: round(v - before.get(e, 0.0), 3) for e, v in durations.items() if v - before.get(e, 0.0) > 0.01}
  record[f"{call}_events_s"] = spent
record["top_ids_digest"] = hashlib.sha256(np.ascontiguousarray(res.top_ids).tobytes()).hexdigest()[:16]
# Brute force for a few queries (cosine: unit queries, rows normalized by retrieve): the returned scores are
# those rows' scores and nothing outside the top k scores higher (bf16 rounding allowed for).
few = min(Q, 4)
scores = np.concatenate([queries[:few] @ corpus[s : s + 4096].astype(np.float32).T for s in range(0, N, 4096)], 1)
scores /= _norms(corpus)[None]
tol = 2e-2
got = np.take_along_axis(scores, res.top_rows[:few], 1)
record["brute_force_ok"] = bool(
  np.allclose(got, res.top_scores[:few], atol=tol)
  and (np.sort(scores, 1)[:, -10] <= res.top_scores[:few, -1] + tol).all()
)
print(json.dumps(record), flush=True)
