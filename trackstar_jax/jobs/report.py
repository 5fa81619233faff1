"""The report job: results files (+ evaluation / ablation tables) -> one self-contained HTML page.

  from trackstar_jax.jobs import report
  report.run(results=["trackstar=w/results.jsonl", "bm25=w/bm25.jsonl"], output="w/report.html",
             evaluation="w/evaluation.json", ablation="w/ablation.json")

Every input is read and checked before anything is written, and the page is
written atomically (temporary file + rename; one object write on gs://): a
bad input leaves no partial page behind, and an existing page stays as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import time
from typing import Any

from absl import logging

from trackstar_jax import fileio
from trackstar_jax.report import data as data_lib
from trackstar_jax.report import page as page_lib
from trackstar_jax.report import payload as payload_lib
from trackstar_jax.report import summary

ReportInputError = data_lib.ReportInputError


def _dataset_name(methods: Sequence[data_lib.Method], tables: Sequence[dict | None]) -> str | None:
  for source in [*(t or {} for t in tables), *(m.metadata for m in methods)]:
    name = source.get("dataset")
    if isinstance(name, str) and name:
      return name
  return None


def run(
  *,
  results: str | Sequence[str],
  output: str,
  evaluation: str | None = None,
  ablation: str | None = None,
  compare: str | None = None,
  title: str | None = None,
  page_size: int = page_lib.DEFAULT_PAGE_SIZE,
) -> dict[str, Any]:
  """Builds the page and writes it to `output`.

  Args:
    results: results file(s), each PATH or NAME=PATH (local, file:// or gs://); the first is the method shown first.
    output: where to write the HTML page.
    evaluation: optional evaluation.json (launch/evaluate.py): metrics summary and charts.
    ablation: optional ablation.json (launch/pipeline.py): the ladder table and its charts.
    compare: optional second results file (PATH or NAME=PATH) to compare with, side by side.
    title: the page title (default "TrackStar results"; the dataset's name goes under it).
    page_size: queries per page of the viewer.

  Returns:
    {"output", "queries", "methods", "passages", "bytes"}.

  Raises:
    data.ReportInputError: an input file is missing, empty or malformed (the message names it and the line).
  """
  start = time.time()
  if os.path.isdir(output):
    raise ReportInputError(
      f"--output {output!r} is a directory: give the page's file name, e.g. {os.path.join(output, 'report.html')}."
    )
  methods = data_lib.load_methods(results, compare=compare)
  eval_table = data_lib.load_table(evaluation, what="Evaluation file") if evaluation else None
  ablation_table = data_lib.load_table(ablation, what="Ablation file") if ablation else None
  payload = payload_lib.build_payload(
    methods=methods,
    evaluation=eval_table,
    title=title or "TrackStar results",
    dataset=_dataset_name(methods, [eval_table, ablation_table]),
  )
  stats = [{"name": m.name, **payload_lib.method_stats(m.records)} for m in methods]
  metrics_html = summary.metrics_tab_html(evaluation=eval_table, ablation=ablation_table, stats=stats)
  text = page_lib.render_page(payload=payload, metrics_html=metrics_html, page_size=page_size)
  fileio.write_text(output, text)
  out = {
    "output": output,
    "queries": len(payload["queries"]),
    "methods": [m.name for m in methods],
    "passages": len(payload["passages"]),
    "bytes": len(text.encode("utf-8")),
  }
  logging.info(
    "report: wrote %s (%.1f MB): %d queries, %d distinct passages, methods %s, in %.1f s",
    output,
    out["bytes"] / 1e6,
    out["queries"],
    out["passages"],
    ", ".join(out["methods"]),
    time.time() - start,
  )
  return out
