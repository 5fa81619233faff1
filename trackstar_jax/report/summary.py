"""The report's metrics tab as static HTML: the evaluation summary, the ablation table, the charts.

Everything here is escaped text built in Python (`html.escape`); the page's
JavaScript does not touch it. Inputs are the tables of `data.load_table`
(evaluation.json / ablation.json) and the per-method statistics computed from
the results files' own `proponent_correct` (`payload.method_stats`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import html
import math
from typing import Any

from trackstar_jax.report import payload as payload_lib
from trackstar_jax.report import plots

DEFAULT_COLUMNS = (
  "mrr",
  "recall@10",
  "precision@10",
  "tail_patch@1",
  "tail_patch@10",
  "tail_patch_rel@1",
  "tail_patch_rel@10",
)


def _esc(x: Any) -> str:
  return html.escape(str(x), quote=True)


def fmt(x: Any) -> str:
  """A table cell: 4 decimals for floats, scientific below 1e-3, '–' for missing / NaN."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "–"
  if isinstance(x, bool):
    return str(x).lower()
  if isinstance(x, float):
    return f"{x:.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:.4f}"
  if isinstance(x, int):
    return f"{x:,}"
  return str(x)


def html_table(*, header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "metrics") -> str:
  """An escaped <table>; numeric cells right-aligned."""
  out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
  for row in rows:
    cells = []
    for i, v in enumerate(row):
      num = isinstance(v, (int, float)) and not isinstance(v, bool) or v is None
      cells.append(f'<td class="{"num" if num and i else "name"}">{_esc(fmt(v))}</td>')
    out.append("<tr>" + "".join(cells) + "</tr>")
  out.append("</tbody></table>")
  return "".join(out)


def _rows_table(table: Mapping[str, Any]) -> str:
  columns = [c for c in table.get("columns") or DEFAULT_COLUMNS if isinstance(c, str)]
  rows = []
  for r in table.get("rows", []):
    rows.append([r["method"], r.get("n"), *(r.get(c) for c in columns)])
  html_rows = html_table(header=["method", "n", *columns], rows=rows)
  notes = [
    f"<li>{_esc(r['method'])}: skipped ({_esc(r['skipped'])})</li>" for r in table.get("rows", []) if r.get("skipped")
  ]
  return html_rows + (f'<ul class="notes">{"".join(notes)}</ul>' if notes else "")


def _groups(metrics: Mapping[str, Any], key: str, order: Sequence[str] = ()) -> list[str]:
  seen = [g for g in order if any(g in (m.get(key) or {}) for m in metrics.values())]
  for m in metrics.values():
    seen += [g for g in (m.get(key) or {}) if g not in seen]
  return seen


def _breakdown(metrics: Mapping[str, Any], key: str, order: Sequence[str] = ()) -> str:
  """A methods x groups table of MRR, the groups' query counts in the header."""
  groups = _groups(metrics, key, order)
  if not groups:
    return ""
  first = next(iter(metrics.values())).get(key) or {}
  header = ["method"] + [
    f"{g} (n={first[g]['n']:,})" if isinstance(first.get(g, {}).get("n"), int) else g for g in groups
  ]
  rows = [[name] + [(m.get(key) or {}).get(g, {}).get("mrr") for g in groups] for name, m in metrics.items()]
  return html_table(header=header, rows=rows)


def _accuracy_line(table: Mapping[str, Any]) -> str:
  parts = []
  if table.get("dataset"):
    parts.append(f"dataset <b>{_esc(table['dataset'])}</b>")
  if table.get("step") is not None:
    parts.append(f"checkpoint step <b>{_esc(table['step'])}</b>")
  acc = table.get("model_accuracy") or {}
  if isinstance(acc.get("n"), int) and isinstance(acc.get("n_correct"), int) and acc["n"]:
    parts.append(
      f"the model answers <b>{acc['n_correct']:,}</b> of {acc['n']:,} queries "
      f"({100 * acc['n_correct'] / acc['n']:.1f}%)"
    )
  if table.get("subset"):
    parts.append(f"table rows: <b>{_esc(table['subset'])}</b> queries")
  return f'<p class="facts">{"; ".join(parts)}.</p>' if parts else ""


def evaluation_html(table: Mapping[str, Any]) -> str:
  """Summary of an evaluation table: headline rows, MRR by correctness, frequency and relation."""
  metrics = {k: v for k, v in (table.get("metrics") or {}).items() if isinstance(v, dict)}
  out = [_accuracy_line(table)]
  if table.get("rows"):
    out.append(_rows_table(table))
  if any("model_correct" in m for m in metrics.values()):
    rows = [
      [
        name,
        (m.get("model_correct") or {}).get("mrr"),
        (m.get("model_correct") or {}).get("n"),
        (m.get("model_incorrect") or {}).get("mrr"),
        (m.get("model_incorrect") or {}).get("n"),
      ]
      for name, m in metrics.items()
    ]
    out.append("<h3>MRR: queries the model answers correctly vs not</h3>")
    out.append(html_table(header=["method", "MRR correct", "n", "MRR incorrect", "n"], rows=rows))
  freq = _breakdown(metrics, "by_frequency", payload_lib.BUCKETS)
  if freq:
    out.append("<h3>MRR by fact frequency (all queries)</h3>" + freq)
  rel = _breakdown(metrics, "by_relation")
  if rel:
    out.append(f"<details><summary>MRR by relation (all queries)</summary>{rel}</details>")
  return "".join(out)


def stats_html(methods: Sequence[Mapping[str, Any]]) -> str:
  """MRR / recall@10 from the results files' own proponent_correct ({name, n, mrr, recall@10} per method)."""
  rows = [[m["name"], m["n"], m.get("mrr"), m.get("recall@10")] for m in methods if m.get("n")]
  if not rows:
    return ""
  return (
    '<p class="facts">From the results files\' <code>proponent_correct</code> (correct proponents within '
    "the retrieved top-k):</p>" + html_table(header=["method", "n", "MRR", "recall@10"], rows=rows)
  )


def charts_html(*, ladder: Mapping[str, Any] | None, frequency: Mapping[str, Any] | None) -> str:
  """MRR and tail-patch per method (bars, from `ladder`'s rows) and MRR by fact frequency (lines)."""
  out = []
  rows = [r for r in (ladder or {}).get("rows", []) if not r.get("skipped")]
  if rows:
    labels = [r["method"] for r in rows]
    if any(plots.is_number(r.get("mrr")) for r in rows):
      out.append(plots.bar_chart(title="MRR per method", labels=labels, series={"MRR": [r.get("mrr") for r in rows]}))
    tp = {f"tail-patch@{k}": [r.get(f"tail_patch@{k}") for r in rows] for k in (1, 10)}
    tp = {k: v for k, v in tp.items() if any(plots.is_number(x) for x in v)}
    if tp:
      out.append(plots.bar_chart(title="Tail-patch: mean Δp of the target per proponent", labels=labels, series=tp))
  metrics = {k: v for k, v in ((frequency or {}).get("metrics") or {}).items() if isinstance(v, dict)}
  buckets = _groups(metrics, "by_frequency", payload_lib.BUCKETS)
  if buckets:
    series = {
      name: [(m.get("by_frequency") or {}).get(b, {}).get("mrr") for b in buckets] for name, m in metrics.items()
    }
    out.append(
      plots.line_chart(
        title="MRR by fact frequency",
        x_labels=buckets,
        series=series,
        x_title="sentences stating the fact (all queries)",
      )
    )
  return "".join(f'<div class="chart-box">{svg}</div>' for svg in out)


def metrics_tab_html(
  *, evaluation: Mapping[str, Any] | None, ablation: Mapping[str, Any] | None, stats: Sequence[Mapping[str, Any]]
) -> str:
  """The whole metrics tab ("" when there is nothing to show)."""
  parts = []
  charts = charts_html(ladder=ablation or evaluation, frequency=evaluation or ablation)
  if charts:
    parts.append(f'<section><h2>Charts</h2><div class="charts">{charts}</div></section>')
  if evaluation:
    parts.append(f"<section><h2>Evaluation</h2>{evaluation_html(evaluation)}</section>")
  if ablation:
    body = _accuracy_line(ablation) + _rows_table(ablation)
    secs = ablation.get("stage_seconds")
    if isinstance(secs, dict) and secs:
      body += (
        "<details><summary>Stage wall times</summary>"
        + html_table(
          header=["stage", "seconds"], rows=[[k, float(v)] for k, v in secs.items() if isinstance(v, (int, float))]
        )
        + "</details>"
      )
    if not evaluation:
      body += evaluation_html({"metrics": ablation.get("metrics") or {}})
    parts.append(f"<section><h2>Ablation ladder</h2>{body}</section>")
  stats_part = stats_html(stats)
  if stats_part:
    parts.append(f"<section><h2>Results files</h2>{stats_part}</section>")
  return "".join(parts)
