"""The results viewer: one self-contained HTML page of proponents, opponents, metrics and charts.

  from trackstar_jax import report
  methods = report.load_methods(["trackstar=results.jsonl", "bm25=bm25.jsonl"])
  html = report.render_page(payload=report.build_payload(methods=methods))

Modules:
  data       reads results files (published TrackStar schema, leniently) and evaluation / ablation JSON
  highlight  target / subject spans in passages; subjects inferred from the relation templates
  payload    the page's compact JSON: queries joined across methods on example_id
  plots      inline SVG bar and line charts
  summary    the metrics tab (evaluation summary, ablation table, charts) as escaped HTML
  page       the HTML document; assets holds its CSS and JS

The job that writes the file is `trackstar_jax.jobs.report` (`launch/report.py`).
"""

from trackstar_jax.report.data import ReportInputError, load_method, load_methods, load_table
from trackstar_jax.report.page import render_page
from trackstar_jax.report.payload import build_payload

__all__ = ["ReportInputError", "build_payload", "load_method", "load_methods", "load_table", "render_page"]
