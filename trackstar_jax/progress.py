"""Progress logging with rate and ETA for long-running jobs.

  progress = Progress(total=num_steps, start=step, unit="step", name="train")
  for step in ...:
    ...
    progress.update(step + 1, items=tokens_in_batch)   # items: e.g. tokens
    if progress.due(every_s=30): logging.info(progress.line())

Rates are measured over the time since the previous `mark()` (a window), so
compilation and restarts don't distort the steady-state rate; the ETA uses
the rate since `start`. Usable from any job (train, encode, retrieve).
"""

from __future__ import annotations

import time


def format_seconds(seconds: float) -> str:
  """1h02m03s / 4m05s / 6.1s."""
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = max(0.0, seconds)
  if seconds < 60:
    return f"{seconds:.1f}s"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Tracks done/total, window rates of steps and items, and an ETA."""

  def __init__(
    self,
    *,
    total: int,
    start: int = 0,
    unit: str = "step",
    item_unit: str = "tokens",
    name: str = "",
    clock=time.perf_counter,
  ):
    self.total = int(total)
    self.start = int(start)
    self.unit = unit
    self.item_unit = item_unit
    self.name = name
    self._clock = clock
    self._t0 = clock()
    self.done = self.start
    self.items = 0
    self._last_line = self._t0
    self.mark()

  def mark(self) -> None:
    """Starts a new measurement window (e.g. after the first, compiling step)."""
    self._window_t = self._clock()
    self._window_done = self.done
    self._window_items = self.items

  def update(self, done: int, *, items: int = 0) -> None:
    self.done = int(done)
    self.items += int(items)

  def elapsed(self) -> float:
    return self._clock() - self._t0

  def rates(self) -> tuple[float, float]:
    """(units/s, items/s) over the current window."""
    dt = max(self._clock() - self._window_t, 1e-9)
    return (self.done - self._window_done) / dt, (self.items - self._window_items) / dt

  def eta(self) -> float:
    """Seconds left, at the rate of the current window (or since start)."""
    rate, _ = self.rates()
    if rate <= 0:
      done = self.done - self.start
      rate = done / max(self.elapsed(), 1e-9)
    remaining = self.total - self.done
    return remaining / rate if rate > 0 else float("inf")

  def due(self, *, every_s: float) -> bool:
    """True at most once per `every_s` seconds (for time-based logging)."""
    now = self._clock()
    if now - self._last_line >= every_s:
      self._last_line = now
      return True
    return False

  def line(self) -> str:
    rate, item_rate = self.rates()
    pct = 100.0 * self.done / max(self.total, 1)
    parts = [
      f"{self.name + ' ' if self.name else ''}{self.unit} {self.done}/{self.total} ({pct:.1f}%)",
      f"{rate:.2f} {self.unit}/s",
    ]
    if self.items:
      parts.append(f"{item_rate:,.0f} {self.item_unit}/s")
    parts.append(f"elapsed {format_seconds(self.elapsed())}")
    parts.append(f"ETA {format_seconds(self.eta())}")
    return ", ".join(parts)
