"""A fixed split of relations into a tuning half and a reporting half, and query accuracy over it.

Hyperparameters (training variants, encoder settings) are chosen on the "dev"
relations and reported on the "test" relations, never per relation: the split
depends only on the relation ids and a seed, not on any result.

  dev, test = relation_split(["P19", "P20", ...], seed=0)     # halves, by a hash of (seed, id)
  table = accuracy_by_split(correct, queries, dev=dev)         # {"dev": {...}, "test": {...}, "all": {...}}
  best = select_variant({"a": table_a, "b": table_b}, metric=">=3")   # the name with the best dev accuracy
  cmp = paired_comparison(rows_a, rows_b, dev=dev)              # method a - method b, per split, paired bootstrap
  keep_costlier(cmp)                                            # True only if a beats b on dev beyond chance
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import hashlib
from typing import Any

import numpy as np

from trackstar_jax.lm_eval import FREQUENCY_BUCKETS

SPLITS = ("dev", "test", "all")


def _key(seed: int, relation: str) -> str:
  return hashlib.sha256(f"{seed}:{relation}".encode()).hexdigest()


def relation_split(relations: Sequence[str], *, dev_fraction: float = 0.5, seed: int = 0) -> tuple[list, list]:
  """(dev, test): the distinct `relations` ordered by a hash of (seed, id); the first round(fraction * n) are dev.

  Example:
    >>> dev, test = relation_split(["P19", "P20", "P27", "P36"])
    >>> len(dev), len(test), sorted(dev + test)
    (2, 2, ['P19', 'P20', 'P27', 'P36'])
  """
  if not 0.0 < dev_fraction < 1.0:
    raise ValueError(f"dev_fraction={dev_fraction} must be in (0, 1).")
  distinct = sorted(set(map(str, relations)))
  if len(distinct) < 2:
    raise ValueError(f"A relation split needs >= 2 distinct relations, got {distinct}.")
  order = sorted(distinct, key=lambda r: _key(seed, r))
  n_dev = min(max(1, round(dev_fraction * len(order))), len(order) - 1)
  return sorted(order[:n_dev]), sorted(order[n_dev:])


def _accuracy(correct: np.ndarray, freq: np.ndarray) -> dict[str, Any]:
  out = dict(n=int(correct.size), accuracy=float(correct.mean()) if correct.size else float("nan"))
  for name, lo, hi in FREQUENCY_BUCKETS:
    sel = (freq >= lo) & (freq <= (hi if hi is not None else np.inf))
    out[f"n_{name}"] = int(sel.sum())
    out[name] = float(correct[sel].mean()) if sel.any() else float("nan")
  return out


def accuracy_by_split(correct: Sequence[bool], queries: Sequence[Mapping[str, Any]], *, dev: Sequence[str]) -> dict:
  """Accuracy overall and by frequency bucket on the dev relations, the others ("test"), and all queries.

  Args:
    correct: [Q] per-query correctness (`lm_eval.query_accuracy(...)["correct"]`), in query order.
    queries: the Q query records (`relation`, `frequency`).
    dev: the dev relations (`relation_split`); every other relation is test.
  """
  correct = np.asarray(correct, bool)
  if correct.shape != (len(queries),):
    raise ValueError(f"correct has shape {correct.shape}; expected one per query ({len(queries)},).")
  rel = np.asarray([str(q["relation"]) for q in queries])
  freq = np.asarray([int(q["frequency"]) for q in queries])
  is_dev = np.isin(rel, list(dev))
  out = {name: _accuracy(correct[sel], freq[sel]) for name, sel in (("dev", is_dev), ("test", ~is_dev))}
  out["all"] = _accuracy(correct, freq)
  out["by_relation"] = {r: _accuracy(correct[rel == r], freq[rel == r]) for r in sorted(set(rel))}
  out["dev_relations"] = sorted(set(dev))
  return out


def select_variant(tables: Mapping[str, Mapping[str, Any]], *, metric: str = ">=3") -> str:
  """The variant whose dev-relation `metric` ("accuracy" or a frequency bucket) is highest (first on ties)."""
  if not tables:
    raise ValueError("select_variant needs at least one variant.")
  scores = {name: t["dev"][metric] for name, t in tables.items()}
  bad = [n for n, s in scores.items() if not np.isfinite(s)]
  if bad:
    raise ValueError(f"Variants {bad} have no dev queries in bucket {metric!r}.")
  return max(scores, key=lambda n: (scores[n], -list(scores).index(n)))


def markdown(tables: Mapping[str, Mapping[str, Any]], *, selected: str | None = None, metric: str = ">=3") -> str:
  """One row per variant: dev and test accuracy (all held-out queries, and `metric`), the selected one marked."""
  head = f"| variant | dev all | dev {metric} | test all | test {metric} | test n |"
  rows = [head, "|---|---|---|---|---|---|"]
  for name, t in tables.items():
    mark = " (selected on dev)" if name == selected else ""
    d, s = t["dev"], t["test"]
    rows.append(
      f"| {name}{mark} | {d['accuracy']:.1%} | {d[metric]:.1%} | {s['accuracy']:.1%} | {s[metric]:.1%} | {s['n']} |"
    )
  return "\n".join(rows)


def paired_comparison(
  rows_a: Sequence[Mapping[str, Any]],
  rows_b: Sequence[Mapping[str, Any]],
  *,
  dev: Sequence[str],
  metrics: Sequence[str] = ("mrr", "recall@10"),
  samples: int = 2000,
  seed: int = 0,
  level: float = 0.95,
) -> dict:
  """Method a minus method b, query by query, on the dev relations, the others ("test") and all.

  Args:
    rows_a, rows_b: per-query rows of the two methods (`metrics.query_rows`: `query_id`, `relation` and the
      metric values) over the same queries, e.g. both restricted to the model-correct ones.
    dev: the dev relations (`relation_split`).
    metrics: the per-query values compared.
    samples, seed, level: the paired bootstrap over queries (`lds.bootstrap_queries` of the differences).

  Returns:
    {split: {"n", metric: {"a", "b", "diff", "ci"}}} for split in SPLITS, plus "dev_relations".
  """
  from trackstar_jax.evaluation import lds  # pylint: disable=g-import-not-at-top

  by_id = {r["query_id"]: r for r in rows_b}
  ids_a = [r["query_id"] for r in rows_a]
  if len(set(ids_a)) != len(ids_a) or set(ids_a) != set(by_id) or len(by_id) != len(rows_b):
    only_a, only_b = sorted(set(ids_a) - set(by_id), key=str), sorted(set(by_id) - set(ids_a), key=str)
    raise ValueError(
      f"A paired comparison needs each query once in both methods; only in a: {only_a[:5]} ({len(only_a)}), "
      f"only in b: {only_b[:5]} ({len(only_b)}), or a query repeated."
    )
  rel = np.asarray([str(r["relation"]) for r in rows_a])
  is_dev = np.isin(rel, list(dev))
  values = {  # name -> (a, b) per query, in rows_a's order
    name: (
      np.asarray([float(r[name]) for r in rows_a]),
      np.asarray([float(by_id[r["query_id"]][name]) for r in rows_a]),
    )
    for name in metrics
  }
  nan = float("nan")
  out: dict[str, Any] = {"dev_relations": sorted(set(dev))}
  for split, sel in (("dev", is_dev), ("test", ~is_dev), ("all", np.ones_like(is_dev))):
    entry: dict[str, Any] = {"n": int(sel.sum())}
    for name, (a_all, b_all) in values.items():
      a, b = a_all[sel], b_all[sel]
      entry[name] = dict(
        a=float(a.mean()) if a.size else nan,
        b=float(b.mean()) if b.size else nan,
        diff=float((a - b).mean()) if a.size else nan,
        ci=list(lds.bootstrap_queries(a - b, samples=samples, seed=seed, level=level)),
      )
    out[split] = entry
  return out


def keep_costlier(comparison: Mapping[str, Any], *, metric: str = "mrr") -> bool:
  """Whether method a (the costlier, e.g. exact Adam) should be kept over b (the cheaper approximation).

  The cheaper method is the default; a is kept only when it beats b on the dev relations with the whole
  bootstrap interval of the difference above zero. Decided on dev alone; test is what gets reported.
  """
  lo = comparison["dev"][metric]["ci"][0]
  if not np.isfinite(lo):
    raise ValueError(f"No dev queries to decide on ({comparison['dev']['n']}).")
  return bool(lo > 0)


def comparison_markdown(name_a: str, name_b: str, comparison: Mapping[str, Any]) -> str:
  """Means, difference and interval per split and metric; the dev decision in the last line."""
  metrics = [k for k in comparison["all"] if k != "n"]
  rows = [
    "| split | n | " + " | ".join(f"{m}: a / b / a - b [95% CI]" for m in metrics) + " |",
    "|---|---|" + "---|" * len(metrics),
  ]
  for split in SPLITS:
    e = comparison[split]
    cells = [
      f"{e[m]['a']:.4f} / {e[m]['b']:.4f} / {e[m]['diff']:+.4f} [{e[m]['ci'][0]:+.4f}, {e[m]['ci'][1]:+.4f}]"
      for m in metrics
    ]
    rows.append(f"| {split} | {e['n']} | " + " | ".join(cells) + " |")
  keep = keep_costlier(comparison) if comparison["dev"]["n"] else None
  verdict = {True: f"keep a ({name_a})", False: f"take b ({name_b})", None: "no dev queries"}[keep]
  head = f"a = {name_a}, b = {name_b}; dev relations: {', '.join(comparison['dev_relations'])}"
  return "\n".join([head, "", *rows, "", f"Decided on dev MRR: {verdict}."])
