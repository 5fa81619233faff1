"""The ablation table: retrieval metrics and tail-patch per method.

Rows are methods in the order given, typically the paper's ladder

  gradient dot → + unit norm → + optimizer correction → + R_train →
  + R_mixed (TrackStar), Adam exact vs rank-1, projection dims, BM25, dense, random

and columns MRR, recall@10, precision@10, tail-patch@1/@10 (absolute and
relative). Rendered as markdown (for READMEs/logs) and JSON (for tooling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import math
from typing import Any

from trackstar_jax import fileio
from trackstar_jax.evaluation import lds as lds_lib
from trackstar_jax.evaluation import metrics as metrics_lib
from trackstar_jax.evaluation import relation_split

COLUMNS = ("mrr", "recall@10", "precision@10", "tail_patch@1", "tail_patch@10", "tail_patch_rel@1", "tail_patch_rel@10")
# Which query subset the metrics columns come from: the paper evaluates on the
# queries the model answers correctly.
SUBSETS = ("overall", "model_correct", "model_incorrect")


def ablation_table(
  *,
  methods: Mapping[str, Any],
  queries: Sequence[Mapping],
  tail_patch: Mapping[str, Mapping[str, float]] | None = None,
  subset: str = "overall",
  **metric_kwargs,
) -> dict:
  """Builds the table.

  Args:
    methods: name -> results (a JSONL path or a list of result dicts), in row
      order.
    queries: ground-truth query dicts.
    tail_patch: name -> `tail_patch.summarize(...)` output (optional per method).
    subset: one of SUBSETS: which queries the metric columns average over.
    **metric_kwargs: passed to `metrics.compute_metrics` (num_examples,
      fingerprint, model_correct, ...).

  Returns:
    {"subset": subset, "columns": [...], "rows": [{"method": name, col: value,
     "n": #queries}], "metrics": {name: full compute_metrics output}}.
  """
  if subset not in SUBSETS:
    raise ValueError(f"subset={subset!r}; expected one of {SUBSETS}.")
  tail_patch = tail_patch or {}
  unknown = set(tail_patch) - set(methods)
  if unknown:
    raise ValueError(f"tail_patch has methods {sorted(unknown)} that are not in `methods`.")
  rows, full = [], {}
  for name, results in methods.items():
    m = metrics_lib.compute_metrics(results, queries, **metric_kwargs)
    full[name] = m
    row = {"method": name, "n": m[subset]["n"]}
    for col in metrics_lib.METRIC_NAMES:
      row[col] = m[subset][col]
    for col in COLUMNS[3:]:
      row[col] = tail_patch.get(name, {}).get(col, math.nan)
    rows.append(row)
  return {"subset": subset, "columns": list(COLUMNS), "rows": rows, "metrics": full}


def _fmt(x) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  if isinstance(x, float) and x != 0 and abs(x) < 1e-3:
    return f"{x:.2e}"
  return f"{x:.4f}" if isinstance(x, float) else str(x)


def to_markdown(table: Mapping) -> str:
  """A markdown table: one row per method."""
  cols = ["method", "n", *table["columns"]]
  lines = [f"Queries: {table['subset']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for row in table["rows"]:
    lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
  return "\n".join(lines) + "\n"


def to_json(table: Mapping) -> str:
  """JSON text (NaN written as null)."""

  def clean(x):
    if isinstance(x, float) and math.isnan(x):
      return None
    if isinstance(x, Mapping):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x

  return json.dumps(clean(table), indent=2, sort_keys=False)


def _breakdown(table: Mapping, key: str, title: str) -> list[str]:
  """A methods x groups MRR table (groups of `metrics[...][key]`)."""
  groups = []
  for m in table["metrics"].values():
    groups += [g for g in m[key] if g not in groups]
  if not groups:
    return []
  lines = [f"MRR by {title} (all queries; n per group in the header)", ""]
  first = next(iter(table["metrics"].values()))[key]
  head = [f"{g} (n={first[g]['n']})" if g in first else g for g in groups]
  lines += ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(groups)]
  for name, m in table["metrics"].items():
    lines.append(f"| {name} | " + " | ".join(_fmt(m[key].get(g, {}).get("mrr")) for g in groups) + " |")
  return lines + [""]


def report_markdown(table: Mapping) -> str:
  """The headline table, then MRR by model correctness, fact frequency and relation."""
  acc = table.get("model_accuracy", {})
  out = [f"# Fact tracing: {table.get('dataset', '')}, checkpoint step {table.get('step', '?')}", ""]
  if acc:
    out += [f"Model answers {acc['n_correct']} of {acc['n']} queries correctly ({acc['accuracy']:.3f}).", ""]
  out += [to_markdown(table)]
  for name, reason in table.get("skipped", {}).items():
    out.append(f"- {name}: skipped ({reason})")
  if table.get("skipped"):
    out.append("")
  if all("model_correct" in m for m in table["metrics"].values()):
    rows = ["MRR: model-correct vs model-incorrect queries", "", "| method | correct | incorrect |", "|---|---|---|"]
    for name, m in table["metrics"].items():
      rows.append(
        f"| {name} | {_fmt(m['model_correct']['mrr'])} (n={m['model_correct']['n']}) | "
        f"{_fmt(m['model_incorrect']['mrr'])} (n={m['model_incorrect']['n']}) |"
      )
    out += rows + [""]
  out += _breakdown(table, "by_frequency", "fact frequency")
  out += _breakdown(table, "by_relation", "relation")
  for c in table.get("comparisons", {}).values():  # jobs/evaluate.py's paired comparisons on the relation split
    out += [
      f"Paired comparison ({table['subset']} queries)",
      "",
      relation_split.comparison_markdown(c["a"], c["b"], c),
      "",
    ]
  if table.get("lds"):  # jobs/lds.py's report
    out += [lds_lib.to_markdown(table["lds"])]
  return "\n".join(out)


def write_table(table: Mapping, path_prefix: str) -> tuple[str, str]:
  """Writes <prefix>.md (`report_markdown`) and <prefix>.json atomically (local or kvstore); returns both paths."""
  md, js = path_prefix + ".md", path_prefix + ".json"
  fileio.write_text(md, report_markdown(table))
  fileio.write_text(js, to_json(table))
  return md, js
