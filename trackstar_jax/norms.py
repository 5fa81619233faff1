"""Per-chunk inverse norms 1 / ||R^{-1/2} phi_z|| of a corpus, cached per Hessian.

Cosine retrieval scales every score column by 1 / ||R^{-1/2} phi_z||. With a full
[d, d] R^{-1/2} that norm costs C x d^2 FLOP per chunk of C rows, several times
the score matmul itself; without R it still costs a pass over the chunk. The
norms depend only on the corpus, the Hessian and the matmul dtype, not on the
queries, so a `NormCache` keeps them from the first scan for every later one:

  cache = NormCache.for_source(store, inv_sqrt=h.inv_sqrt, matmul_dtype="bfloat16", layout="c65536x1")
  norms = cache.get(start, stop)        # np.ndarray [stop - start] float32, or None: compute it
  cache.put(start, stop, norms)         # after the step computed them
  cache.save()                          # EncodingStore: <store>/norms/<key>/<start>-<stop>.npy

In memory the cache lives as long as its source object (several query batches
over one store in one process); for an `EncodingStore` it is also written
beside the store, one small file per chunk, so a later process skips the
transform too. The key is a sha256 of the store's meta (what produced its
values, not where it lives) and dtype (int8 / int4 rows are dequantized
ones), the Hessian's bytes, the matmul dtype and the device layout (chunk
rows per device and device count: the step computes the norms per device
shard, so that a cached norm is bitwise the one the step would compute). Writing beside a read-only store fails with a warning only.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any
import weakref

from absl import logging
import numpy as np

from trackstar_jax import fileio

# source object -> key -> {(start, stop): inverse norms}. Weak: the norms go when the source does.
_MEMORY: weakref.WeakKeyDictionary[Any, dict[str, dict[tuple[int, int], np.ndarray]]] = weakref.WeakKeyDictionary()


def hessian_fingerprint(inv_sqrt: Any) -> str:
  """sha256 of R^{-1/2} as float32 bytes with its shape ("none" without a Hessian)."""
  if inv_sqrt is None:
    return "none"
  a = np.ascontiguousarray(np.asarray(inv_sqrt, np.float32))
  h = hashlib.sha256(repr(a.shape).encode())
  h.update(memoryview(a).cast("B"))
  return h.hexdigest()


class NormCache:
  """Inverse norms of one source (store or in-memory encodings) under one Hessian, dtype and layout."""

  def __init__(self, source: Any, key: str, *, directory: str | None):
    self.source, self.key, self.directory = source, key, directory
    self._mem = _MEMORY.setdefault(source, {}).setdefault(key, {})
    self._unsaved: list[tuple[int, int]] = []
    self.hits = self.misses = 0

  @classmethod
  def for_source(cls, source: Any, *, inv_sqrt: Any, matmul_dtype: str, layout: str) -> NormCache:
    """The cache of `source` (an `EncodingStore` is also persisted beside it) for this Hessian and layout."""
    meta = getattr(source, "meta", None)
    what = dict(
      source=meta.to_json() if meta is not None else f"memory:{id(source)}",
      store_dtype=str(getattr(source, "dtype", "")),  # in the meta too; explicit: int8 / int4 rows differ
      hessian=hessian_fingerprint(inv_sqrt),
      matmul_dtype=str(matmul_dtype),
      layout=str(layout),
    )
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    directory = f"{source.url.rstrip('/')}/norms/{key}" if meta is not None else None
    return cls(source, key, directory=directory)

  def _path(self, start: int, stop: int) -> str:
    return f"{self.directory}/{start:012d}-{stop:012d}.npy"

  def get(self, start: int, stop: int) -> np.ndarray | None:
    """The inverse norms of rows [start, stop), or None when neither memory nor storage has them."""
    got = self._mem.get((start, stop))
    if got is None and self.directory is not None:
      try:
        got = np.load(io.BytesIO(fileio.read_bytes(self._path(start, stop))), allow_pickle=False)
      except FileNotFoundError:
        got = None
      except (OSError, ValueError) as e:  # unreadable: recompute (and rewrite) rather than fail the scan
        logging.warning("Ignoring unreadable norm cache file %s: %s", self._path(start, stop), e)
        got = None
      if got is not None and (got.shape != (stop - start,) or got.dtype != np.float32):
        logging.warning("Ignoring norm cache file %s of shape %s %s.", self._path(start, stop), got.shape, got.dtype)
        got = None
      if got is not None:
        self._mem[(start, stop)] = got
    if got is None:
      self.misses += 1
    else:
      self.hits += 1
    return got

  def put(self, start: int, stop: int, inv_norms: np.ndarray) -> None:
    inv_norms = np.asarray(inv_norms, np.float32)
    if inv_norms.shape != (stop - start,):
      raise ValueError(f"Norms of rows [{start}, {stop}) must have shape ({stop - start},), got {inv_norms.shape}.")
    self._mem[(start, stop)] = inv_norms
    self._unsaved.append((start, stop))

  def save(self) -> int:
    """Writes the norms computed since the last save beside the store; returns how many chunks it wrote."""
    todo, self._unsaved = self._unsaved, []
    if self.directory is None:
      return 0
    written = 0
    for start, stop in todo:
      buf = io.BytesIO()
      np.save(buf, self._mem[(start, stop)], allow_pickle=False)
      try:
        fileio.write_bytes(self._path(start, stop), buf.getvalue())
        written += 1
      except Exception as e:  # pylint: disable=broad-except
        # A read-only store still retrieves; later scans recompute the norms.
        logging.warning("Could not write the norm cache %s (%s): later scans recompute these norms.", self.directory, e)
        return written
    return written
