"""Host work off the accelerator's critical path: an iterator run ahead on a thread, and a write queue.

  for batch in ahead(make_batches(), depth=2): ...     # batches built while the devices work
  with BackgroundCalls(writer.submit) as calls:        # writes handed off, never waited on in the loop
    calls.put(start=a, ids=ids, phi=phi)

`ahead` is the one implementation of "produce the next items while the caller
works on this one" (encode's padded batches, retrieval's device copies).
Errors raised by the producer or the calls are re-raised in the caller's
thread, at the next item / call (or on close), so nothing fails silently. A
consumer that stops early (break, exception) stops the thread as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import queue
import threading
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class _Failed(NamedTuple):
  error: BaseException


_END = object()


def _offer(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
  """q.put(item) unless `stop` is set first (then False)."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.05)
      return True
    except queue.Full:
      continue
  return False


def ahead(items: Iterable[T], *, depth: int = 2, name: str = "prefetch") -> Iterator[T]:
  """Yields `items` in order, produced on a background thread up to `depth` items ahead of the caller."""
  q: queue.Queue = queue.Queue(maxsize=max(1, depth))
  stop = threading.Event()

  def work():
    try:
      for item in items:
        if not _offer(q, item, stop):
          return
      _offer(q, _END, stop)
    except BaseException as e:  # pylint: disable=broad-except
      _offer(q, _Failed(e), stop)

  thread = threading.Thread(target=work, name=name, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, _Failed):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()


class BackgroundCalls:
  """Runs `fn(**kwargs)` for each `put(**kwargs)` on one background thread, in order, `depth` queued at most.

  `put` returns at once unless `depth` calls are already queued (back-pressure:
  the producer never runs unboundedly ahead of, say, the disk). `close()` (or
  leaving the `with` block) waits for every call and re-raises the first error;
  after an error, `put` raises it too and the remaining calls are dropped.
  """

  def __init__(self, fn: Callable[..., Any], *, depth: int = 2, name: str = "background-calls"):
    self._fn, self._q = fn, queue.Queue(maxsize=max(1, depth))
    self._error: BaseException | None = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, name=name, daemon=True)
    self._thread.start()

  def _work(self) -> None:
    while True:
      kwargs = self._q.get()
      if kwargs is _END:
        return
      if self._error is None:
        try:
          self._fn(**kwargs)
        except BaseException as e:  # pylint: disable=broad-except
          self._error = e

  def put(self, **kwargs) -> None:
    if self._error is not None:
      raise self._error
    if not _offer(self._q, kwargs, self._stop):
      raise RuntimeError("BackgroundCalls.put after close().")

  def close(self) -> None:
    """Waits for every queued call; re-raises the first error."""
    if self._thread.is_alive():
      self._q.put(_END)
      self._thread.join()
    if self._error is not None:
      raise self._error

  def __enter__(self) -> BackgroundCalls:
    return self

  def __exit__(self, exc_type, *unused) -> None:
    if exc_type is None:
      self.close()
    else:  # the caller failed: finish what is queued (a write is committed or not: resume redoes it), keep its error
      self._q.put(_END)
      self._thread.join()
