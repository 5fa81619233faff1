"""The report page's data: one compact JSON object built from the methods' results.

Layout (short keys: the page embeds this for ~16k queries x 20 passages x several methods):

  v          payload format version (1); title, dataset (or null): the page's heading
  methods    [{name, n, correct: has proponent_correct, k}], in the order given
  passages   [[training example id, text or null]], each distinct passage once
  queries    [{id, prompt, target, rel, fact, freq, b: frequency bucket, subj, ans, mc: model correct,
               r: [per method: null (not in that file) or {p: proponents, o: opponents, rr}]}]
             a proponent / opponent is [passage index, score (4 significant digits) or null,
             correct (1 / 0 / -1 unknown), [start, end, kind, ...] highlight spans (UTF-16;
             kind 0 = target, 1 = subject)]; rr is the rank of the first correct proponent
             (0: none), present when the markers of the ranks up to it are known. Correctness
             comes from any method's proponent_correct for the same (query, passage id).
             Absent optional fields are left out.
  relations  [[relation, #queries]]; buckets: frequency bucket labels in order
  has        {relation, freq, mc, ans, subj, correct}: which filters / fields the page shows

Queries are joined across methods on `example_id` compared as strings (one file
may write 17 and another "17"); a query's prompt and other fields come from the
first method that has them.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from trackstar_jax.evaluation import metrics as metrics_lib
from trackstar_jax.report import data as data_lib
from trackstar_jax.report import highlight

VERSION = 1
BUCKETS = tuple(metrics_lib.frequency_bucket(e) for e in (1, *metrics_lib.DEFAULT_FREQUENCY_EDGES))
_KIND_CODE = {k: i for i, k in enumerate(highlight.KINDS)}


def _round(x: float | None) -> float | int | None:
  if x is None:
    return None
  r = float(f"{x:.4g}")
  return int(r) if r.is_integer() and abs(r) < 1e15 else r


def _flat_spans(spans: Sequence[tuple[int, int, str]]) -> list[int]:
  return [v for a, b, k in spans for v in (a, b, _KIND_CODE[k])]


class _Passages:
  """Interns (training example id, text) pairs: each distinct passage is stored once."""

  def __init__(self):
    self.index: dict[tuple[str, str | None], int] = {}
    self.rows: list[list[Any]] = []

  def __call__(self, pid, text) -> int:
    key = (str(pid), text)
    i = self.index.get(key)
    if i is None:
      i = self.index[key] = len(self.rows)
      self.rows.append([pid, text])
    return i


def _merge_query(q: dict[str, Any], rec: Mapping[str, Any], name: str, mismatches: collections.Counter) -> None:
  for key in ("relation", "fact_id", "frequency", "subject", "answer", "model_correct"):
    if q.get(key) is None and rec.get(key) is not None:
      q[key] = rec[key]
  if rec["prompt"] != q["prompt"] or rec["target"] != q["target"]:
    mismatches[name] += 1


def join_queries(methods: Sequence[data_lib.Method]) -> tuple[list[dict[str, Any]], list[dict[str, dict]]]:
  """Queries of every method joined on str(example_id).

  Returns:
    (queries, per_method): queries in the first method's order, then queries only
    the later methods have; per_method[j] maps str(example_id) -> method j's record.
  """
  queries: dict[str, dict[str, Any]] = {}
  per_method = []
  mismatches: collections.Counter = collections.Counter()
  for m in methods:
    by_id = {}
    for rec in m.records:
      key = str(rec["id"])
      by_id[key] = rec
      if key in queries:
        _merge_query(queries[key], rec, m.name, mismatches)
      else:
        queries[key] = {k: v for k, v in rec.items() if k not in ("proponents", "opponents")}
    per_method.append(by_id)
  for name, n in mismatches.items():
    logging.warning(
      "report: %d queries of %r have another prompt or target than the first method's with the "
      "same example_id: are these results for the same query set?",
      n,
      name,
    )
  return list(queries.values()), per_method


def known_correct(records: Sequence[Mapping[str, Any] | None]) -> dict[str, bool]:
  """str(training example id) -> does it state the query's fact, from every method's proponent_correct.

  The gold sentences are a property of the query, not of the method: a passage
  that one method's file marks correct is correct in every method's list (same
  corpus ids), so a file without `proponent_correct` (e.g. a baseline's) gets
  markers for the passages another method retrieved too.
  """
  known: dict[str, bool] = {}
  for rec in records:
    for p in (rec or {}).get("proponents", ()):
      if p["correct"] is not None and p["id"] is not None:
        known[str(p["id"])] = known.get(str(p["id"]), False) or p["correct"]
  return known


def _refs(items, *, spans_of: highlight.Highlighter, passages: _Passages, known: Mapping[str, bool]) -> list[list[Any]]:
  out = []
  for it in items:
    correct = it["correct"] if it["correct"] is not None else known.get(str(it["id"]))
    c = -1 if correct is None else int(correct)
    ref = [passages(it["id"] if it["id"] is not None else "", it["text"]), _round(it["score"]), c]
    if it["text"]:
      spans = spans_of(it["text"])
      if spans:
        ref.append(_flat_spans(spans))
    out.append(ref)
  return out


def first_correct_rank(proponents: Sequence[Mapping[str, Any]]) -> int:
  """1-based rank of the first proponent marked correct; 0 when none is."""
  return next((i for i, p in enumerate(proponents, 1) if p["correct"]), 0)


def _rank_from_codes(codes: Sequence[int]) -> int | None:
  """First rank with code 1 (correct); 0 if all are 0; None when an unknown (-1) comes first."""
  for i, c in enumerate(codes, 1):
    if c == 1:
      return i
    if c == -1:
      return None
  return 0


def method_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """MRR and recall@10 over a method's queries that have `proponent_correct` (within the retrieved top-k).

  The same definitions as `evaluation.metrics`: a query whose top-k holds no
  correct proponent counts 1/rank = 0. Returns {"n": 0} when no query has
  `proponent_correct`.
  """
  known = [r for r in records if r["proponents"] and all(p["correct"] is not None for p in r["proponents"])]
  if not known:
    return {"n": 0}
  ranks = [first_correct_rank(r["proponents"]) for r in known]
  return {
    "n": len(known),
    "mrr": sum(1.0 / k for k in ranks if k) / len(known),
    "recall@10": sum(1 for k in ranks if 0 < k <= 10) / len(known),
  }


def build_payload(
  *,
  methods: Sequence[data_lib.Method],
  evaluation: Mapping[str, Any] | None = None,
  title: str = "TrackStar results",
  dataset: str | None = None,
) -> dict[str, Any]:
  """The page's JSON payload (see the module docstring for its layout).

  Args:
    methods: the results files, first = the method shown by default.
    evaluation: an evaluation table (`data.load_table`); its per-query model
      correctness, when it records it, fills queries that have no `model_correct`.
    title: the page title.
    dataset: the dataset's name, shown under the title (optional).
  """
  if not methods:
    raise ValueError("build_payload needs at least one method.")
  queries, per_method = join_queries(methods)
  correct_of = data_lib.model_correct_by_query(evaluation)
  by_rel = collections.defaultdict(list)
  for q in queries:
    if q["relation"] is not None and q["subject"] is None:
      by_rel[q["relation"]].append(q["prompt"])
  inferred = highlight.infer_subjects(by_rel)
  passages = _Passages()
  out_queries = []
  for q in queries:
    key = str(q["id"])
    subject = q["subject"] or (inferred.get(q["prompt"]) if q["relation"] is not None else None)
    mc = q["model_correct"] if q["model_correct"] is not None else correct_of.get(key)
    row: dict[str, Any] = {"id": q["id"], "prompt": q["prompt"], "target": q["target"]}
    optional = dict(rel=q["relation"], fact=q["fact_id"], freq=q["frequency"], subj=subject, ans=q["answer"], mc=mc)
    if q["frequency"] is not None:
      optional["b"] = BUCKETS.index(metrics_lib.frequency_bucket(max(1, q["frequency"])))
    row.update({k: v for k, v in optional.items() if v is not None})
    results = []
    known = known_correct([by_id.get(key) for by_id in per_method])
    spans_of = highlight.Highlighter(target=q["target"], subject=subject)
    for by_id in per_method:
      rec = by_id.get(key)
      if rec is None:
        results.append(None)
        continue
      refs = dict(spans_of=spans_of, passages=passages, known=known)
      r = {"p": _refs(rec["proponents"], **refs), "o": _refs(rec["opponents"], **refs)}
      rr = _rank_from_codes([ref[2] for ref in r["p"]]) if r["p"] else None
      if rr is not None:
        r["rr"] = rr
      results.append(r)
    row["r"] = results
    out_queries.append(row)
  rel_counts = collections.Counter(q["relation"] for q in queries if q["relation"] is not None)
  has = {
    "relation": bool(rel_counts),
    "freq": any("b" in q for q in out_queries),
    "mc": any("mc" in q for q in out_queries),
    "ans": any("ans" in q for q in out_queries),
    "subj": any("subj" in q for q in out_queries),
    "correct": any(p["correct"] is not None for m in methods for r in m.records for p in r["proponents"]),
  }
  return {
    "v": VERSION,
    "title": title,
    "dataset": dataset,
    "methods": [
      {
        "name": m.name,
        "n": len(m.records),
        "correct": any(p["correct"] is not None for r in m.records for p in r["proponents"]),
        "k": max((len(r["proponents"]) for r in m.records), default=0),
      }
      for m in methods
    ],
    "passages": passages.rows,
    "queries": out_queries,
    "relations": [[r, n] for r, n in sorted(rel_counts.items())],
    "buckets": list(BUCKETS),
    "has": has,
  }
