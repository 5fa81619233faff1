"""Whole-file reads and atomic writes on local disks and TensorStore kvstores.

  write_bytes("w/results.jsonl", data)          # temp file + fsync + rename
  write_bytes("gs://bucket/run/results.jsonl", data)   # one object write: atomic
  read_bytes("memory://test/x.json")

A path is a local path, `file://...`, or any kvstore URL TensorStore opens
(`gs://`, `s3://`, `memory://`); waits on remote ones are bounded (`remote`). A file that exists was written whole: readers
never see a partial file, so a job killed mid-write leaves the previous file
(or none) behind. Every module that writes a result, config, stamp or table
goes through `write_bytes` / `write_text` / `write_json`.
"""

from __future__ import annotations

import json
import os
from typing import Any
import uuid

import tensorstore as ts

from trackstar_jax import remote

# One TensorStore context for the process: `memory://` data lives in it (shared with `store.py`).
CONTEXT = ts.Context()


def split_url(path: str) -> tuple[str | None, str]:
  """(kvstore directory URL, key), or (None, local path) for local files."""
  if path.startswith("file://"):
    path = path[len("file://") :]
  if "://" not in path:
    return None, path
  head, _, key = path.rpartition("/")
  return head + "/", key


def is_local(path: str) -> bool:
  return split_url(path)[0] is None


def absolute(path: str) -> str:
  """A local path made absolute; a kvstore URL (gs://, s3://, memory://, file://) unchanged."""
  return os.path.abspath(path) if "://" not in path else path


def parent(path: str) -> str:
  """The folder of a local path or kvstore URL (`gs://b/run/x.npz` -> `gs://b/run`)."""
  return os.path.dirname(absolute(path)) if "://" not in path else path.rstrip("/").rpartition("/")[0]


def _kvstore(url: str) -> ts.KvStore:
  return remote.wait(ts.KvStore.open(remote.kvstore_spec(url), context=CONTEXT), url=url, what="Opening")


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path` atomically; creates parent directories; returns `path`."""
  kv_url, key = split_url(path)
  if kv_url is not None:
    remote.wait(_kvstore(kv_url).write(key, data), url=path, what="Writing", nbytes=len(data))  # one object: atomic
    return path
  directory = os.path.dirname(os.path.abspath(key))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(key)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, key)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_text(path: str, text: str) -> str:
  return write_bytes(path, text.encode())


def write_json(path: str, obj: Any, *, indent: int | None = 2) -> str:
  return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def read_bytes(path: str) -> bytes:
  """The whole file; FileNotFoundError names the path when there is none."""
  kv_url, key = split_url(path)
  if kv_url is None:
    if not os.path.exists(key):
      raise FileNotFoundError(f"No file at {path!r}.")
    with open(key, "rb") as f:
      return f.read()
  r = remote.wait(_kvstore(kv_url).read(key), url=path, what="Reading")
  if r.state != "value":
    raise FileNotFoundError(f"No file at {path!r}.")
  return bytes(r.value)


def read_text(path: str) -> str:
  return read_bytes(path).decode()


def read_json(path: str) -> Any:
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete it or re-run the job that wrote it.") from e


def exists(path: str) -> bool:
  kv_url, key = split_url(path)
  if kv_url is None:
    return os.path.exists(key)
  return remote.wait(_kvstore(kv_url).read(key), url=path, what="Reading").state == "value"
