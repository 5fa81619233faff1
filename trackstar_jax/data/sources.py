"""Rows of a user's files: JSONL, Parquet, array_record or a TFDS dataset, as python dicts.

  source = open_source("corpus.jsonl")                     # or .parquet, .array_record
  source = open_source("tfds:my_corpus/default:1.0.0", split="train", data_dir="/data/tfds")
  len(source)                                              # rows, from metadata where the format has it
  for row, record in source.rows(lo, hi): ...              # rows [lo, hi) in file order

A source is a sequence of records with a stable order (the file's), read by
row range: `host_rows(n, process_index=, process_count=)` gives each host one
contiguous range, so a host reads only its slice. Row numbers are global (the
row in the whole file), which is what errors name and what default document
ids are made of.

Formats:
  jsonl         one JSON object a line (blank lines are not rows); `len` counts lines once.
  parquet       pyarrow (optional: `pip install pyarrow`); only the requested columns are read.
  array_record  each record a UTF-8 JSON object (a TFDS build's records are
                serialized tf.train.Examples: read those with "tfds:").
  tfds:NAME     `tfds.data_source(NAME, split=, data_dir=)`: TFDS builds in the
                array_record format, read without TensorFlow; bytes become str.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import json
import os
from typing import Any

import numpy as np

TFDS_PREFIX = "tfds:"
FORMATS = ("jsonl", "parquet", "array_record", "tfds")
_READ_CHUNK = 1024  # records per batched read (array_record, TFDS, Parquet batches)


def host_rows(n: int, *, process_index: int = 0, process_count: int = 1) -> tuple[int, int]:
  """The contiguous row range [lo, hi) of host `process_index` of `process_count` over `n` rows.

  Contiguous (not strided) so that the examples of a host are a contiguous range
  of the global example numbering: the dense ids then need only each host's
  example count, not every document's.

  Example:
    >>> host_rows(5, process_index=1, process_count=2)
    (2, 5)
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  return n * process_index // process_count, n * (process_index + 1) // process_count


class Source:
  """Records of one file or dataset, by global row number. Subclasses implement `__len__` and `_read`."""

  format: str = ""

  def __init__(self, name: str):
    self.name = name  # what errors call it: a path, or tfds:NAME[split]

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, lo: int, hi: int, fields: Sequence[str] | None) -> Iterator[Any]:
    raise NotImplementedError

  def rows(self, lo: int = 0, hi: int | None = None, *, fields: Sequence[str] | None = None):
    """Yields (row, record dict) for rows [lo, hi) (default: all); `fields` may limit the columns read."""
    hi = len(self) if hi is None else hi
    for row, rec in zip(range(lo, hi), self._read(lo, hi, fields)):
      if not isinstance(rec, dict):
        raise ValueError(f"{self.name}, row {row}: a record must be a JSON object / mapping, got {type(rec).__name__}.")
      yield row, rec

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"


class JsonlSource(Source):
  """A JSON-lines file: row i is the i-th non-blank line."""

  format = "jsonl"

  def __init__(self, path: str):
    super().__init__(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"No JSONL file at {path}.")
    self._n: int | None = None

  def _lines(self) -> Iterator[tuple[int, str]]:
    with open(self.name, encoding="utf-8") as f:
      yield from enumerate(line for line in f if line.strip())

  def __len__(self) -> int:
    if self._n is None:
      self._n = sum(1 for _ in self._lines())
    return self._n

  def _read(self, lo, hi, fields):
    del fields
    for row, line in self._lines():
      if row >= hi:
        return
      if row >= lo:
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{self.name}, row {row}: not valid JSON ({e.msg} at column {e.colno}).") from e


def _pyarrow_parquet():
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
      "Reading Parquet needs pyarrow, an optional dependency: pip install pyarrow (or 'trackstar_jax[parquet]')."
    ) from None
  return pq


class ParquetSource(Source):
  """A Parquet file (pyarrow), read batch by batch; only the requested columns."""

  format = "parquet"

  def __init__(self, path: str):
    super().__init__(path)
    pq = _pyarrow_parquet()
    if not os.path.exists(path):
      raise FileNotFoundError(f"No Parquet file at {path}.")
    self._file = pq.ParquetFile(path)

  def __len__(self) -> int:
    return int(self._file.metadata.num_rows)

  def _read(self, lo, hi, fields):
    names = self._file.schema_arrow.names
    columns = None if fields is None else [f for f in fields if f in names]
    start = 0
    for group in range(self._file.num_row_groups):
      n = self._file.metadata.row_group(group).num_rows
      if start + n > lo and start < hi:  # row groups outside [lo, hi) are not read
        table = self._file.read_row_group(group, columns=columns)
        for batch in table.to_batches(max_chunksize=_READ_CHUNK):
          for rec in batch.to_pylist():
            if lo <= start < hi:
              yield rec
            start += 1
      else:
        start += n
      if start >= hi:
        return


class ArrayRecordSource(Source):
  """An array_record file whose records are UTF-8 JSON objects."""

  format = "array_record"

  def __init__(self, path: str):
    super().__init__(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"No array_record file at {path}.")
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    self._reader = array_record_module.ArrayRecordReader(path)

  def __len__(self) -> int:
    return int(self._reader.num_records())

  def _read(self, lo, hi, fields):
    del fields
    for a in range(lo, hi, _READ_CHUNK):
      b = min(a + _READ_CHUNK, hi)
      for row, raw in zip(range(a, b), self._reader.read(a, b)):
        try:
          yield json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          raise ValueError(
            f"{self.name}, row {row}: not a UTF-8 JSON record ({e}). Records of a TFDS build are "
            f"serialized tf.train.Examples: read the dataset with '{TFDS_PREFIX}NAME' instead."
          ) from e


def _python(v):
  """A TFDS data-source value as plain python: bytes -> str, numpy -> lists and scalars."""
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray):
    if v.dtype.kind in "SO":
      return [_python(x) for x in v.tolist()]
    return v.tolist()
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, dict):
    return {k: _python(x) for k, x in v.items()}
  return v


class TfdsSource(Source):
  """One split of a TFDS dataset through `tfds.data_source` (array_record builds; no TensorFlow)."""

  format = "tfds"

  def __init__(self, name: str, *, split: str, data_dir: str | None = None):
    super().__init__(f"{TFDS_PREFIX}{name}[{split}]")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:
      raise ValueError(
        f"Cannot open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r}: {e}. It must be prepared "
        "in the array_record format (builder(file_format='array_record').download_and_prepare())."
      ) from e

  def __len__(self) -> int:
    return len(self._source)

  def _read(self, lo, hi, fields):
    for a in range(lo, hi, _READ_CHUNK):
      for ex in self._source.__getitems__(list(range(a, min(a + _READ_CHUNK, hi)))):
        yield {k: _python(v) for k, v in ex.items() if fields is None or k in fields}


def open_source(path: str, *, format: str | None = None, split: str | None = None, data_dir: str | None = None):
  """A `Source` for `path`: a file (format from its extension unless given) or "tfds:NAME".

  Args:
    path: a .jsonl / .json, .parquet or .array_record file, or "tfds:NAME"
      (e.g. "tfds:my_corpus/default:1.0.0", as `tfds.data_source` names it).
    format: one of `FORMATS`, overriding the extension.
    split: the TFDS split (required for "tfds:"; default "train").
    data_dir: the TFDS data directory (default: TFDS's own, $TFDS_DATA_DIR).

  Example:
    >>> source = open_source("/data/corpus.parquet")
    >>> next(source.rows(fields=["text"]))
    (0, {'text': 'The cat sat.'})
  """
  path = str(path)
  if format is None:
    if path.startswith(TFDS_PREFIX):
      format = "tfds"
    else:
      ext = os.path.splitext(path)[1].lower()
      format = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".array_record": "array_record"}.get(ext)
      if format is None and "array_record" in os.path.basename(path):  # TFDS-style names: x.array_record-00000-of-00001
        format = "array_record"
      if format is None:
        raise ValueError(f"Cannot tell the format of {path} from its name: pass format= (one of {FORMATS}).")
  if format == "tfds":
    return TfdsSource(path.removeprefix(TFDS_PREFIX), split=split or "train", data_dir=data_dir)
  if split is not None:
    raise ValueError(f"split={split!r} is for TFDS datasets ('{TFDS_PREFIX}NAME'), not a {format} file ({path}).")
  classes = {"jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource}
  if format not in classes:
    raise ValueError(f"Unknown format {format!r}; known: {FORMATS}.")
  return classes[format](path)
