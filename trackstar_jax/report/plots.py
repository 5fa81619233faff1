"""Inline SVG charts for the report page: horizontal bars per method, lines over buckets.

Plain SVG strings (no plotting library, no scripts), every label HTML-escaped;
missing values (None / NaN) are left out: no bar, a gap in the line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import html
import math

PALETTE = ("#3b6fd4", "#e8a33d", "#d9534f", "#4fb0a5", "#5aa454", "#c76bb8", "#8c6d4f", "#7f8c9a", "#2f9fd8", "#b5a33a")
_FONT = 'font-family="system-ui, sans-serif"'


def is_number(x) -> bool:
  """A finite int or float (not a bool)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def nice_ticks(lo: float, hi: float, *, n: int = 5) -> list[float]:
  """Round tick values covering [lo, hi] (about n of them)."""
  if hi <= lo:
    hi = lo + 1.0
  raw = (hi - lo) / n
  mag = 10 ** math.floor(math.log10(raw))
  step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
  start = math.floor(lo / step + 1e-9) * step
  ticks, t = [], start
  while t <= hi + step * 1e-6:
    ticks.append(round(t, 12))
    t += step
  if ticks[-1] < hi:
    ticks.append(round(t, 12))
  return ticks


def fmt(x) -> str:
  """A value for a label: 3 significant digits, scientific below 1e-3."""
  if not is_number(x):
    return "–"
  if x != 0 and abs(x) < 1e-3:
    return f"{x:.1e}"
  return f"{x:.3g}"


def _esc(s) -> str:
  return html.escape(str(s), quote=True)


def _short(label: str, limit: int) -> str:
  return label if len(label) <= limit else label[: limit - 1] + "…"


def _legend(names: Sequence[str], x: float, y: float, *, first: int = 0) -> list[str]:
  """Color swatches and names in a row; series `first + i` gets the i-th name."""
  out, cx = [], x
  for i, name in enumerate(names):
    color = PALETTE[(first + i) % len(PALETTE)]
    out.append(f'<rect x="{cx:.1f}" y="{y - 9:.1f}" width="10" height="10" rx="2" fill="{color}"/>')
    out.append(f'<text x="{cx + 14:.1f}" y="{y:.1f}" font-size="11" {_FONT}>{_esc(_short(name, 28))}</text>')
    cx += 24 + 6.5 * min(len(name), 28)
  return out


def bar_chart(
  *, title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], width: int = 640
) -> str:
  """Horizontal bars: one row per label (method), one bar per series in it.

  Args:
    title: the chart's heading (inside the SVG).
    labels: the rows, top to bottom.
    series: name -> one value per label (None / NaN: no bar).
    width: SVG width in px (it scales to its container).

  Returns:
    An `<svg>` element as a string.
  """
  names = list(series)
  values = [v for vs in series.values() for v in vs if is_number(v)]
  lo, hi = min([0.0, *values]), max([0.0, *values])
  ticks = nice_ticks(lo, hi if hi > lo else lo + 1.0)
  lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
  bar_h, gap, left, right, top = 12, 8, 220, 60, 46 if len(names) > 1 else 30
  row_h = bar_h * len(names) + gap
  height = top + row_h * len(labels) + 24
  x0, x1 = left, width - right

  def scale(v):
    return x0 + (v - lo) / (hi - lo) * (x1 - x0)

  out = [
    f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
    f'xmlns="http://www.w3.org/2000/svg"><title>{_esc(title)}</title>',
    f'<text x="0" y="16" font-size="13" font-weight="600" {_FONT}>{_esc(title)}</text>',
  ]
  if len(names) > 1:
    out += _legend(names, left, 36)
  for t in ticks:
    x = scale(t)
    out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 20}" stroke="#e3e6eb"/>')
    out.append(
      f'<text x="{x:.1f}" y="{height - 6}" font-size="10" text-anchor="middle" fill="#667" {_FONT}>{t:g}</text>'
    )
  for r, label in enumerate(labels):
    y = top + r * row_h
    out.append(
      f'<text x="{left - 8}" y="{y + row_h / 2 + 1:.1f}" font-size="11.5" text-anchor="end" '
      f'dominant-baseline="middle" {_FONT}><title>{_esc(label)}</title>{_esc(_short(label, 34))}</text>'
    )
    for s, name in enumerate(names):
      v = series[name][r] if r < len(series[name]) else None
      if not is_number(v):
        continue
      a, b = sorted((scale(0.0), scale(v)))
      by = y + gap / 2 + s * bar_h
      out.append(
        f'<rect x="{a:.1f}" y="{by:.1f}" width="{max(b - a, 0.5):.1f}" height="{bar_h - 2}" rx="2" '
        f'fill="{PALETTE[s % len(PALETTE)]}"><title>{_esc(f"{label}, {name}: {fmt(v)}")}</title></rect>'
      )
      out.append(
        f'<text x="{b + 4:.1f}" y="{by + bar_h / 2:.1f}" font-size="10" dominant-baseline="middle" '
        f'fill="#334" {_FONT}>{_esc(fmt(v))}</text>'
      )
  zero = scale(0.0)
  out.append(f'<line x1="{zero:.1f}" y1="{top - 4}" x2="{zero:.1f}" y2="{height - 20}" stroke="#99a"/>')
  out.append("</svg>")
  return "".join(out)


def line_chart(
  *,
  title: str,
  x_labels: Sequence[str],
  series: Mapping[str, Sequence[float | None]],
  x_title: str = "",
  width: int = 640,
  height: int = 300,
) -> str:
  """Lines over categorical x positions (e.g. fact-frequency buckets), one per series (method).

  Args:
    title: heading inside the SVG.
    x_labels: the x categories, left to right.
    series: name -> one value per x label (None / NaN: a gap).
    x_title: axis title under the labels.
    width, height: SVG size in px.

  Returns:
    An `<svg>` element as a string.
  """
  names = list(series)
  values = [v for vs in series.values() for v in vs if is_number(v)]
  ticks = nice_ticks(min([0.0, *values]), max([0.0, *values]) or 1.0)
  lo, hi = ticks[0], ticks[-1]
  legend_rows = math.ceil(len(names) / 3)
  left, right, top, bottom = 48, 16, 28 + 16 * legend_rows, 44
  x0, x1, y0, y1 = left, width - right, height - bottom, top
  n = max(len(x_labels), 1)
  xs = [x0 + (x1 - x0) * (i + 0.5) / n for i in range(n)]

  def sy(v):
    return y0 - (v - lo) / (hi - lo) * (y0 - y1)

  out = [
    f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
    f'xmlns="http://www.w3.org/2000/svg"><title>{_esc(title)}</title>',
    f'<text x="0" y="16" font-size="13" font-weight="600" {_FONT}>{_esc(title)}</text>',
  ]
  for row in range(legend_rows):
    out += _legend(names[row * 3 : row * 3 + 3], left, 36 + 16 * row, first=row * 3)
  for t in ticks:
    y = sy(t)
    out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e3e6eb"/>')
    out.append(
      f'<text x="{x0 - 6}" y="{y:.1f}" font-size="10" text-anchor="end" dominant-baseline="middle" '
      f'fill="#667" {_FONT}>{t:g}</text>'
    )
  for x, label in zip(xs, x_labels):
    out.append(f'<text x="{x:.1f}" y="{y0 + 16}" font-size="11" text-anchor="middle" {_FONT}>{_esc(label)}</text>')
  if x_title:
    out.append(
      f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#556" '
      f"{_FONT}>{_esc(x_title)}</text>"
    )
  for s, name in enumerate(names):
    color = PALETTE[s % len(PALETTE)]
    vals = list(series[name])
    segment: list[str] = []
    for i, x in enumerate(xs):
      v = vals[i] if i < len(vals) else None
      if is_number(v):
        segment.append(f"{x:.1f},{sy(v):.1f}")
      if (not is_number(v) or i == len(xs) - 1) and segment:
        out.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{color}" stroke-width="2"/>')
        segment = []
    for i, x in enumerate(xs):
      v = vals[i] if i < len(vals) else None
      if is_number(v):
        out.append(
          f'<circle cx="{x:.1f}" cy="{sy(v):.1f}" r="3" fill="{color}">'
          f"<title>{_esc(f'{name}, {x_labels[i]}: {fmt(v)}')}</title></circle>"
        )
  out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#99a"/>')
  out.append("</svg>")
  return "".join(out)
