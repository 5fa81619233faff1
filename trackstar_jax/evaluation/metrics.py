"""Fact-tracing retrieval metrics: MRR, recall@10 and precision@10.

Inputs are retrieval results in the TrackStar results schema (one dict per
query: `example_id`, `proponent_ids`, `proponent_scores`, ..., plus `fact_id`
and `relation`) and the ground truth, the query dicts of a `FactData` /
`FactDataset` (`query_id`, `fact_id`, `relation`, `gold_sentence_ids`,
`frequency`, and optionally `model_correct`).

For one query with retrieved proponents z_1..z_k (best first) and gold set G:

  reciprocal rank = 1 / min{i : z_i in G}, 0 if no z_i is gold (i <= k)
  recall@10       = 1 if some z_i in G for i <= 10, else 0
  precision@10    = |{z_1..z_10} ∩ G| / 10   (denominator 10 even if k < 10)

Each is averaged over queries: overall, by relation, by fact-frequency bucket,
and separately for the queries the model answers correctly / incorrectly.

A results file may carry metadata (dataset name, corpus fingerprint, corpus
size) either as a header line `{"metadata": {...}}` or in a side file
`<results>.meta.json`; when present it is checked against the dataset.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
import math
import os
from typing import Any

from trackstar_jax.results import load_results

# Upper-exclusive edges of the fact-frequency buckets: [1,2) [2,4) ... [32,inf).
DEFAULT_FREQUENCY_EDGES = (2, 4, 8, 16, 32)
METRIC_NAMES = ("mrr", "recall@10", "precision@10")


def as_records(results: str | Sequence[Mapping]) -> tuple[list[dict], dict]:
  """A results path or an in-memory list of records -> (records, metadata)."""
  if isinstance(results, (str, os.PathLike)):
    return load_results(os.fspath(results))
  return [dict(r) for r in results], {}


def _key(x) -> Any:
  """Normalizes an id that may have gone through JSON as a string."""
  if isinstance(x, str) and x.lstrip("-").isdigit():
    return int(x)
  return x


def frequency_bucket(frequency: int, edges: Sequence[int] = DEFAULT_FREQUENCY_EDGES) -> str:
  """Label of the bucket of `frequency`: '1', '2-3', ..., '>=32'."""
  lo = 1
  for hi in edges:
    if frequency < hi:
      return str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
    lo = hi
  return f">={lo}"


def check_results(
  records: Sequence[Mapping],
  *,
  metadata: Mapping | None = None,
  num_examples: int | None = None,
  corpus_ids: Iterable[int] | None = None,
  fingerprint: str | None = None,
  dataset_name: str | None = None,
  source: str = "results",
) -> None:
  """Raises ValueError when results do not belong to this dataset/corpus.

  Args:
    records: result dicts.
    metadata: the results' metadata (header or side file), may be empty.
    num_examples: corpus size N; proponent ids must lie in [0, N).
    corpus_ids: alternatively, the exact set of valid corpus ids.
    fingerprint: the dataset's corpus fingerprint (`FactDataset.fingerprint`).
    dataset_name: the dataset's name.
    source: what to call the results in messages (e.g. the file path).
  """
  metadata = metadata or {}
  if fingerprint and metadata.get("fingerprint") and metadata["fingerprint"] != fingerprint:
    raise ValueError(
      f"{source}: corpus fingerprint {metadata['fingerprint'][:12]}... does not "
      f"match the dataset's {fingerprint[:12]}...: these results were computed "
      "on a different corpus (check --config.dataset / --config.data_dir)."
    )
  if dataset_name and metadata.get("dataset") and metadata["dataset"] != dataset_name:
    raise ValueError(f"{source}: results are for dataset {metadata['dataset']!r}, not {dataset_name!r}.")
  if num_examples is None and metadata.get("num_examples") is not None and corpus_ids is None:
    num_examples = int(metadata["num_examples"])
  valid = set(corpus_ids) if corpus_ids is not None else None
  for rec in records:
    for field in ("proponent_ids", "opponent_ids"):
      for i in rec.get(field, ()):
        i = _key(i)
        bad = (valid is not None and i not in valid) or (
          num_examples is not None and not (isinstance(i, int) and 0 <= i < num_examples)
        )
        if bad:
          limit = f"[0, {num_examples})" if num_examples is not None else "the corpus ids"
          raise ValueError(
            f"{source}: query {rec['example_id']!r} has {field} entry {i!r} outside "
            f"{limit}: the results do not belong to this corpus."
          )


def match_queries(records, queries, source):
  by_id = {_key(q["query_id"]): q for q in queries}
  out = []
  for rec in records:
    qid = _key(rec["example_id"])
    q = by_id.get(qid)
    if q is None:
      raise ValueError(
        f"{source}: query example_id={rec['example_id']!r} has no ground truth in the "
        f"given query set ({len(by_id)} queries): wrong dataset or query split?"
      )
    if not q.get("gold_sentence_ids"):
      raise ValueError(f"{source}: query {qid} (fact {q.get('fact_id')!r}) has no gold_sentence_ids: cannot score it.")
    for field in ("fact_id", "relation"):
      if field in rec and rec[field] is not None and rec[field] != q.get(field):
        raise ValueError(
          f"{source}: query {qid} has {field}={rec[field]!r} in the results but "
          f"{q.get(field)!r} in the ground truth: results for a different query set."
        )
    out.append((rec, q))
  return out


def per_query_metrics(proponent_ids: Sequence, gold_ids: Iterable, *, k: int = 10) -> dict:
  """Reciprocal rank, recall@k and precision@k of one query."""
  gold = {_key(g) for g in gold_ids}
  ids = [_key(i) for i in proponent_ids]
  rr = 0.0
  for rank, i in enumerate(ids, 1):
    if i in gold:
      rr = 1.0 / rank
      break
  hits = sum(i in gold for i in ids[:k])
  return {"mrr": rr, f"recall@{k}": float(hits > 0), f"precision@{k}": hits / k}


def annotate_correct(records: Sequence[Mapping], queries: Sequence[Mapping]) -> list[dict]:
  """Copies of `records` with `proponent_correct` (per proponent, is it gold?)."""
  gold = {_key(q["query_id"]): {_key(g) for g in q["gold_sentence_ids"]} for q in queries}
  out = []
  for rec in records:
    g = gold.get(_key(rec["example_id"]), set())
    out.append({**rec, "proponent_correct": [_key(i) in g for i in rec["proponent_ids"]]})
  return out


def query_rows(
  records: Sequence[Mapping],
  queries: Sequence[Mapping],
  *,
  model_correct: Mapping[Any, bool] | None = None,
  frequency_edges: Sequence[int] = DEFAULT_FREQUENCY_EDGES,
  source: str = "results",
) -> list[dict]:
  """One dict per result record: `query_id`, `relation`, `bucket`, `correct` and the METRIC_NAMES values.

  The per-query values every mean of `compute_metrics` averages, and what a paired comparison of two
  methods resamples (`relation_split.paired_comparison`). `model_correct` overrides the queries' own field.
  """
  correct_map = {_key(k): bool(v) for k, v in (model_correct or {}).items()}
  rows = []
  for rec, q in match_queries(records, queries, source):
    m = per_query_metrics(rec["proponent_ids"], q["gold_sentence_ids"], k=10)
    qid = _key(q["query_id"])
    m["query_id"] = qid
    m["relation"] = q["relation"]
    m["bucket"] = frequency_bucket(int(q.get("frequency", 0)), frequency_edges)
    m["correct"] = correct_map.get(qid, q.get("model_correct"))
    rows.append(m)
  return rows


def _mean(rows: list[dict]) -> dict:
  out = {"n": len(rows)}
  for name in METRIC_NAMES:
    out[name] = sum(r[name] for r in rows) / len(rows) if rows else math.nan
  return out


def compute_metrics(
  results: str | Sequence[Mapping],
  queries: Sequence[Mapping],
  *,
  model_correct: Mapping[Any, bool] | None = None,
  num_examples: int | None = None,
  fingerprint: str | None = None,
  dataset_name: str | None = None,
  frequency_edges: Sequence[int] = DEFAULT_FREQUENCY_EDGES,
) -> dict:
  """Fact-tracing metrics of one method's results.

  Args:
    results: a results JSONL path or a list of result dicts.
    queries: ground-truth query dicts (`query_id`, `fact_id`, `relation`,
      `gold_sentence_ids`, `frequency`, optional `model_correct`).
    model_correct: query_id -> whether the model answers it; overrides the
      queries' own `model_correct` field.
    num_examples: corpus size, to check proponent ids (else taken from the
      results' metadata if there).
    fingerprint, dataset_name: checked against the results' metadata.
    frequency_edges: upper-exclusive bucket edges of fact frequency.

  Returns:
    {"overall": m, "by_relation": {rel: m}, "by_frequency": {bucket: m},
     "model_correct": m, "model_incorrect": m, "n_unknown_correctness": int}
    with m = {"n", "mrr", "recall@10", "precision@10"} (NaN for empty groups).
  """
  source = results if isinstance(results, str) else "results"
  records, meta = as_records(results)
  if not records:
    raise ValueError(f"{source}: no result records.")
  check_results(
    records, metadata=meta, num_examples=num_examples, fingerprint=fingerprint, dataset_name=dataset_name, source=source
  )
  rows = query_rows(records, queries, model_correct=model_correct, frequency_edges=frequency_edges, source=source)

  def group(key):
    groups = collections.defaultdict(list)
    for r in rows:
      groups[r[key]].append(r)
    return {g: _mean(v) for g, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}

  by_freq = group("bucket")
  order = [frequency_bucket(e, frequency_edges) for e in (1, *frequency_edges)]
  by_freq = {b: by_freq[b] for b in order if b in by_freq}
  return {
    "overall": _mean(rows),
    "by_relation": group("relation"),
    "by_frequency": by_freq,
    "model_correct": _mean([r for r in rows if r["correct"] is True]),
    "model_incorrect": _mean([r for r in rows if r["correct"] is False]),
    "n_unknown_correctness": sum(r["correct"] is None for r in rows),
  }
