"""The report page: one self-contained HTML file (inline CSS and JS, the data as embedded JSON).

  html = page.render_page(payload=payload.build_payload(methods=...), metrics_html=summary.metrics_tab_html(...))

No network access, no CDN: the file opens from file://. The payload goes into
`<script id="report-data" type="application/json">` with every "<" written as
"\\u003c", so no passage text can close the script element; the page's script
builds the query view from it with DOM text nodes (never `innerHTML`).
"""

from __future__ import annotations

from collections.abc import Mapping
import html
import json
from typing import Any

from trackstar_jax.report import assets

DEFAULT_PAGE_SIZE = 50


def embed_json(payload: Mapping[str, Any]) -> str:
  """Compact JSON that is safe inside a <script> element (no "<", so no "</script>" or "<!--")."""
  text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
  return text.replace("<", "\\u003c")


def _subtitle(payload: Mapping[str, Any]) -> str:
  methods = payload["methods"]
  n = len(payload["queries"])
  names = ": " + ", ".join(m["name"] for m in methods) if len(methods) <= 3 else ""
  out = f"{n:,} queries · {len(methods)} method{'s' if len(methods) > 1 else ''}{names}"
  return f"{payload['dataset']} · {out}" if payload.get("dataset") else out


def render_page(*, payload: Mapping[str, Any], metrics_html: str = "", page_size: int = DEFAULT_PAGE_SIZE) -> str:
  """The whole HTML document.

  Args:
    payload: `payload.build_payload(...)`.
    metrics_html: the metrics tab (`summary.metrics_tab_html`), trusted HTML; "" hides the tab.
    page_size: queries per page.

  Returns:
    The HTML text.
  """
  if page_size < 1:
    raise ValueError(f"page_size={page_size}; it must be >= 1.")
  title = html.escape(payload.get("title") or "TrackStar results")
  metrics_tab, nav = "", ""
  if metrics_html:  # two tabs; with one there is nothing to switch to
    metrics_tab = f'<div id="tab-metrics">{metrics_html}</div>'
    nav = (
      '<nav class="tabs"><button type="button" data-tab="queries">Queries</button>'
      '<button type="button" data-tab="metrics">Metrics</button></nav>'
    )
  has = payload.get("has", {})
  legend = '<p class="legend">In each passage: <mark class="hl-target">target</mark>'
  if has.get("subj"):
    legend += ' <mark class="hl-subject">subject</mark>'
  if has.get("correct"):
    legend += "; ✓ the passage states the query's fact, ✗ it does not (<code>proponent_correct</code>)"
  legend += ".</p>"
  return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{assets.CSS}</style>
</head>
<body data-page-size="{int(page_size)}">
<header><h1>{title}</h1><span class="sub">{html.escape(_subtitle(payload))}</span>
{nav}</header>
<main>
<div id="tab-queries">
<div class="controls" id="controls"></div>
<div class="status"><span class="count" id="count"></span>
<span class="pager"><button type="button" id="prev">‹ Prev</button><span id="page-info"></span>
<button type="button" id="next">Next ›</button></span></div>
{legend}
<div id="query-list"><noscript>This page needs JavaScript to show the queries.</noscript></div>
</div>
{metrics_tab}
</main>
<script id="report-data" type="application/json">{embed_json(payload)}</script>
<script>{assets.JS}</script>
</body>
</html>
"""
