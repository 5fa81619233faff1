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

Endpoints. Every kvstore the project opens is specified by `kvstore_spec(url)`,
which points the cloud drivers at another server when the environment says so
(a local emulator in tests, a private or S3-compatible endpoint):

  gs://   TENSORSTORE_GCS_HTTP_URL (TensorStore's own, e.g. http://127.0.0.1:9023),
          or STORAGE_EMULATOR_HOST (the Google Cloud client libraries' variable,
          `host:port` or a URL), copied to TENSORSTORE_GCS_HTTP_URL when this module
          is imported (so Orbax checkpoints on gs:// use it too).
  s3://   AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (the AWS SDKs' variables), put
          into the spec's `endpoint` (TensorStore's s3 driver does not read them).

Credentials are TensorStore's usual lookup (GOOGLE_APPLICATION_CREDENTIALS or
gcloud's application-default file, then the GCE metadata server; for S3 the
AWS_ACCESS_KEY_ID / profile chain). With none found, GCS requests go out
without credentials, as an emulator expects.
"""

from __future__ import annotations

import os
from typing import Any

import tensorstore as ts

TIMEOUT_S = float(os.environ.get("TRACKSTAR_REMOTE_TIMEOUT_S", "60"))
MIN_BYTES_PER_S = 1e6
_LOCAL_SCHEMES = ("file", "memory")


class RemoteTimeoutError(TimeoutError):
  """A remote storage operation did not finish within the time limit."""


def is_remote(url: str) -> bool:
  """True for URLs on a remote kvstore (gs://, http://, s3://...), False for paths, file:// and memory://."""
  return "://" in url and url.split("://", 1)[0] not in _LOCAL_SCHEMES


def gcs_endpoint() -> str | None:
  """The GCS server that replaces storage.googleapis.com, from the environment (None: Google's)."""
  url = os.environ.get("TENSORSTORE_GCS_HTTP_URL") or os.environ.get("STORAGE_EMULATOR_HOST")
  if not url:
    return None
  return url if "://" in url else f"http://{url}"


def s3_endpoint() -> str | None:
  """The S3 endpoint URL from the environment (None: AWS, by the bucket's region)."""
  return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def kvstore_spec(url: str) -> dict[str, Any]:
  """TensorStore's kvstore JSON spec of a kvstore URL, pointed at the endpoints the environment names.

  kvstore_spec("gs://bucket/run/")  # {"driver": "gcs", "bucket": "bucket", "path": "run/"}
  """
  spec = ts.KvStore.Spec(url).to_json()
  if spec.get("driver") == "s3" and s3_endpoint() and "endpoint" not in spec:
    spec["endpoint"] = s3_endpoint()
  return spec


def _use_emulator_host() -> None:
  """TensorStore reads TENSORSTORE_GCS_HTTP_URL whenever a gcs kvstore opens: mirror STORAGE_EMULATOR_HOST there."""
  if "TENSORSTORE_GCS_HTTP_URL" not in os.environ and gcs_endpoint():
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = gcs_endpoint()


_use_emulator_host()


def timeout_s(nbytes: int = 0) -> float:
  """The bound for an operation that transfers `nbytes`."""
  return TIMEOUT_S + nbytes / MIN_BYTES_PER_S


def timeout_message(url: str, what: str, timeout: float) -> str:
  """What timed out, where, and what to check."""
  hint = "the network (can this machine reach the storage endpoint?), the bucket name and your access to it"
  if url.startswith("gs://"):
    hint = (
      "credentials (GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`), "
      f"network access to {gcs_endpoint() or 'storage.googleapis.com'} (the endpoint: $TENSORSTORE_GCS_HTTP_URL "
      "or $STORAGE_EMULATOR_HOST), and that the bucket exists and this account may access it"
    )
  elif url.startswith("s3://"):
    hint = (
      "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile), network access to "
      f"{s3_endpoint() or 'the bucket region endpoint'} (the endpoint: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL), "
      "and that the bucket exists and this account may access it"
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
