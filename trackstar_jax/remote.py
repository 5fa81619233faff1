"""Bounded waits on remote storage (gs:// and any non-local TensorStore kvstore).

TensorStore retries a GCS request for a long time, and waits forever for a
credentials or metadata server that never answers: a `gs://` URL without
credentials or network would hang a job. Every blocking TensorStore call of
the store and results modules goes through `wait`, which bounds it when the
URL is remote:

  kv = remote.wait(ts.KvStore.open(spec, context=ctx), url=url, what="Opening")

The bound is `TIMEOUT_S` (default 60 s; environment TRACKSTAR_REMOTE_TIMEOUT_S,
or set the module attribute) plus the transfer time at `MIN_BYTES_PER_S`, so
large chunk writes on slow links still finish. Local paths, file:// and
memory:// are never bounded.
"""

from __future__ import annotations

import os
from typing import Any

TIMEOUT_S = float(os.environ.get("TRACKSTAR_REMOTE_TIMEOUT_S", "60"))
MIN_BYTES_PER_S = 1e6
_LOCAL_SCHEMES = ("file", "memory")


class RemoteTimeoutError(TimeoutError):
  """A remote storage operation did not finish within the time limit."""


def is_remote(url: str) -> bool:
  """True for URLs on a remote kvstore (gs://, http://, s3://...), False for paths, file:// and memory://."""
  return "://" in url and url.split("://", 1)[0] not in _LOCAL_SCHEMES


def timeout_s(nbytes: int = 0) -> float:
  """The bound for an operation that transfers `nbytes`."""
  return TIMEOUT_S + nbytes / MIN_BYTES_PER_S


def timeout_message(url: str, what: str, timeout: float) -> str:
  """What timed out, where, and what to check."""
  hint = "the network (can this machine reach the storage endpoint?), the bucket name and your access to it"
  if url.startswith("gs://"):
    hint = (
      "credentials (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`), "
      "network access to storage.googleapis.com (or $TENSORSTORE_GCS_HTTP_URL), and that the bucket exists "
      "and this account may access it"
    )
  return (
    f"{what} {url} did not finish within {timeout:.0f} s. Likely cause: check {hint}. The limit is "
    "trackstar_jax.remote.TIMEOUT_S (environment: TRACKSTAR_REMOTE_TIMEOUT_S)."
  )


def wait(future: Any, *, url: str, what: str, nbytes: int = 0) -> Any:
  """`future.result()`, bounded in time when `url` is remote.

  Args:
    future: a TensorStore Future or WriteFutures.
    url: the URL the operation is on (decides the bound; named in the message).
    what: what is being done, e.g. "Opening the encoding store" (for the message).
    nbytes: bytes transferred; they extend the bound by nbytes / MIN_BYTES_PER_S.

  Returns:
    The future's result.

  Raises:
    RemoteTimeoutError: past the bound; the operation is cancelled.
  """
  if not is_remote(url):
    return future.result()
  timeout = timeout_s(nbytes)
  try:
    return future.result(timeout=timeout)
  except TimeoutError:
    future.cancel()
    raise RemoteTimeoutError(timeout_message(url, what, timeout)) from None
