"""Reads the report's inputs: results files and evaluation / ablation tables, with clear errors.

Results files are JSON lines in the published TrackStar schema (see
`trackstar_jax.results`), read leniently so that files this project did not
write render too: unknown extra fields are ignored, optional fields may be
missing, example ids may be strings. Only what the page cannot do without is
required: `example_id`, `inputs_plaintext`, `targets_plaintext` and the
proponents (texts or ids); every list that comes in parallel with another
must match its length. A problem is reported with the file and line number.

Evaluation and ablation tables are the JSON files written by
`trackstar_jax.evaluation.run.write` (`launch/evaluate.py`) and by the ladder
(`launch/pipeline.py`, `ablation.json`): `columns`, `rows`, `metrics`, and
optionally `model_accuracy`, `tail_patch`, `skipped`, `stage_seconds`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import os
from typing import Any

from trackstar_jax import fileio
from trackstar_jax import results as results_lib

# Optional per-query fields the page shows when a results line has them.
ANSWER_FIELDS = ("model_answer", "model_prediction", "prediction")
SUBJECT_FIELDS = ("subject", "sub_label")


class ReportInputError(ValueError):
  """An input file of the report is missing, empty or malformed (the message names file and line)."""


@dataclasses.dataclass
class Method:
  """One results file: a retrieval method's proponents and opponents per query.

  Attributes:
    name: the method's name on the page.
    path: where it was read from.
    records: one normalized dict per query (see `normalize_record`), file order.
    metadata: the results' metadata (`<path>.meta.json` or a header line), {} if none.
  """

  name: str
  path: str
  records: list[dict[str, Any]]
  metadata: dict[str, Any]


def parse_results_flag(values: str | Sequence[str]) -> list[tuple[str | None, str]]:
  """["name=path", "path", ...] -> [(name or None, path)] (None: name it from the file).

  A `=` counts as a separator only when what precedes it looks like a name, not a
  path ("gs://b/x=1.jsonl" is a path).
  """
  if isinstance(values, str):
    values = [values]
  out = []
  for v in values:
    name, sep, path = v.partition("=")
    if not sep or "/" in name or ":" in name or os.sep in name:
      name, path = None, v
    elif not name or not path:
      raise ReportInputError(f"--results entry {v!r} must be NAME=PATH or a PATH.")
    out.append((name, path))
  if not out:
    raise ReportInputError("No results file given: pass --results=RESULTS.jsonl (or NAME=PATH, repeated).")
  return out


def _read(path: str, what: str) -> str:
  try:
    return fileio.read_text(path)
  except FileNotFoundError as e:
    raise ReportInputError(f"{what} {path!r} does not exist.") from e
  except IsADirectoryError as e:
    raise ReportInputError(f"{what} {path!r} is a directory, not a file.") from e
  except UnicodeDecodeError as e:
    raise ReportInputError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start}).") from e


def _fail(path: str, lineno: int, msg: str) -> ReportInputError:
  return ReportInputError(f"{path}, line {lineno}: {msg}")


def _list(rec: Mapping, field: str, path: str, lineno: int) -> list | None:
  v = rec.get(field)
  if v is None:
    return None
  if not isinstance(v, list):
    raise _fail(path, lineno, f"{field!r} must be a list, got {type(v).__name__}.")
  return v


def _id(v: Any, field: str, path: str, lineno: int) -> int | str:
  if isinstance(v, bool) or not isinstance(v, (int, str)):
    raise _fail(path, lineno, f"{field!r} must hold ints or strings, got {v!r}.")
  return v


def _score(v: Any, field: str, path: str, lineno: int) -> float | None:
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise _fail(path, lineno, f"{field!r} must hold numbers, got {v!r}.")
  return float(v) if math.isfinite(v) else None


def _side(rec: Mapping, side: str, path: str, lineno: int, *, required: bool) -> list[dict[str, Any]]:
  """The proponents (side="proponent") or opponents of a record as [{id, text, score, correct}]."""
  texts = _list(rec, side + "s", path, lineno)
  ids = _list(rec, side + "_ids", path, lineno)
  scores = _list(rec, side + "_scores", path, lineno)
  correct = _list(rec, "proponent_correct", path, lineno) if side == "proponent" else None
  if texts is None and ids is None:
    if required:
      raise _fail(path, lineno, f"no {side}s: a results line needs '{side}s' (texts) or '{side}_ids'.")
    return []
  n = len(texts if texts is not None else ids)
  for field, v in (
    (side + "s", texts),
    (side + "_ids", ids),
    (side + "_scores", scores),
    ("proponent_correct", correct),
  ):
    if v is not None and len(v) != n:
      raise _fail(path, lineno, f"{field!r} has {len(v)} entries but there are {n} {side}s.")
  out = []
  for i in range(n):
    text = texts[i] if texts is not None else None
    if text is not None and not isinstance(text, str):
      raise _fail(path, lineno, f"{side}s[{i}] must be a string, got {type(text).__name__}.")
    c = correct[i] if correct is not None else None
    if c is not None and not isinstance(c, bool):
      raise _fail(path, lineno, f"proponent_correct[{i}] must be true or false, got {c!r}.")
    out.append(
      dict(
        id=_id(ids[i], side + "_ids", path, lineno) if ids is not None else None,
        text=text,
        score=_score(scores[i], side + "_scores", path, lineno) if scores is not None else None,
        correct=c,
      )
    )
  return out


def normalize_record(rec: Any, *, path: str, lineno: int) -> dict[str, Any]:
  """One results line as the dict the payload is built from.

  Keys: id, prompt, target, relation, fact_id, frequency, subject, answer,
  model_correct, proponents, opponents ([{id, text, score, correct}]); a field
  the line lacks is None ([] for opponents).

  Raises:
    ReportInputError: naming `path` and `lineno`, when a field the page needs is missing or malformed.
  """
  if not isinstance(rec, dict):
    raise _fail(path, lineno, f"a results line must be a JSON object, got {type(rec).__name__}.")
  missing = [f for f in ("example_id", "inputs_plaintext", "targets_plaintext") if f not in rec]
  if missing:
    raise _fail(path, lineno, f"missing fields {missing} (TrackStar results schema: see trackstar_jax/results.py).")
  out = dict(id=_id(rec["example_id"], "example_id", path, lineno))
  for key, field in (("prompt", "inputs_plaintext"), ("target", "targets_plaintext")):
    if not isinstance(rec[field], str):
      raise _fail(path, lineno, f"{field!r} must be a string, got {type(rec[field]).__name__}.")
    out[key] = rec[field]
  for key, field in (("relation", "relation"), ("fact_id", "fact_id")):
    v = rec.get(field)
    out[key] = None if v is None else str(v)
  freq = rec.get("frequency")
  if freq is not None and (
    isinstance(freq, bool) or not isinstance(freq, (int, float)) or not math.isfinite(freq) or freq != int(freq)
  ):
    raise _fail(path, lineno, f"'frequency' must be an integer, got {freq!r}.")
  out["frequency"] = None if freq is None else int(freq)
  out["subject"] = next((rec[f] for f in SUBJECT_FIELDS if isinstance(rec.get(f), str) and rec[f].strip()), None)
  out["answer"] = next((rec[f] for f in ANSWER_FIELDS if isinstance(rec.get(f), str)), None)
  mc = rec.get("model_correct")
  out["model_correct"] = mc if isinstance(mc, bool) else None
  out["proponents"] = _side(rec, "proponent", path, lineno, required=True)
  out["opponents"] = _side(rec, "opponent", path, lineno, required=False)
  return out


def load_method(path: str, *, name: str | None = None) -> Method:
  """Reads and normalizes one results file.

  Args:
    path: a local path, file:// or gs:// URL of a JSONL results file.
    name: the method's name; default: the metadata's `method`, else the file name.

  Raises:
    ReportInputError: the file is missing or empty, a line is not JSON or not a
      results record, or two lines have the same example_id.
  """
  try:
    lines, header = results_lib.read_lines(path)
  except FileNotFoundError as e:
    raise ReportInputError(f"Results file {path!r} does not exist.") from e
  except IsADirectoryError as e:
    raise ReportInputError(f"Results file {path!r} is a directory, not a file.") from e
  except UnicodeDecodeError as e:
    raise ReportInputError(f"Results file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}).") from e
  except ValueError as e:
    raise ReportInputError(str(e)) from e
  records, seen = [], {}
  for lineno, obj in lines:
    rec = normalize_record(obj, path=path, lineno=lineno)
    key = str(rec["id"])
    if key in seen:
      raise _fail(path, lineno, f"example_id {rec['id']!r} already appeared on line {seen[key]}.")
    seen[key] = lineno
    records.append(rec)
  if not records:
    raise ReportInputError(f"Results file {path!r} is empty: no results lines (one JSON object per query).")
  try:
    side = results_lib.read_metadata(path) or {}
  except json.JSONDecodeError as e:
    raise ReportInputError(f"{results_lib.meta_path(path)}, line {e.lineno}: not valid JSON ({e.msg}).") from e
  metadata = {**(side if isinstance(side, dict) else {}), **header}
  if name is None:
    meta_name = metadata.get("method")
    name = meta_name if isinstance(meta_name, str) and meta_name else _stem(path)
  return Method(name=name, path=path, records=records, metadata=metadata)


def _stem(path: str) -> str:
  base = path.rstrip("/").rsplit("/", 1)[-1]
  return base[: -len(".jsonl")] if base.endswith(".jsonl") else os.path.splitext(base)[0] or base


def load_methods(results: str | Sequence[str], *, compare: str | None = None) -> list[Method]:
  """The methods of `--results` (NAME=PATH or PATH, repeatable) and `--compare`, in that order.

  Raises:
    ReportInputError: a file cannot be read (see `load_method`), or two methods have the same name.
  """
  entries = parse_results_flag(results)
  if compare:
    entries += parse_results_flag(compare)
  methods = []
  for name, path in entries:
    m = load_method(path, name=name)
    taken = {x.name for x in methods}
    if m.name in taken:
      if name is not None:
        raise ReportInputError(f"Two results files are named {m.name!r}: name them, e.g. --results=NAME={path}.")
      i = 2
      while f"{m.name} ({i})" in taken:
        i += 1
      m.name = f"{m.name} ({i})"
    methods.append(m)
  return methods


def load_table(path: str, *, what: str) -> dict[str, Any]:
  """Reads an evaluation or ablation JSON table and checks its shape.

  Args:
    path: local path, file:// or gs:// URL.
    what: "Evaluation file" or "Ablation file" (for messages).

  Raises:
    ReportInputError: missing, empty, not JSON, or neither `rows` nor `metrics` there.
  """
  text = _read(path, what)
  if not text.strip():
    raise ReportInputError(f"{what} {path!r} is empty.")
  try:
    table = json.loads(text)
  except json.JSONDecodeError as e:
    raise ReportInputError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from e
  if not isinstance(table, dict) or not (isinstance(table.get("rows"), list) or isinstance(table.get("metrics"), dict)):
    raise ReportInputError(
      f"{what} {path!r} has neither 'rows' nor 'metrics': expected the JSON written by launch/evaluate.py "
      "(evaluation.json) or launch/pipeline.py (ablation.json)."
    )
  rows = table.get("rows", [])
  for i, row in enumerate(rows if isinstance(rows, list) else []):
    if not isinstance(row, dict) or not isinstance(row.get("method"), str):
      raise ReportInputError(f"{what} {path!r}: rows[{i}] must be an object with a 'method' name.")
  metrics = table.get("metrics", {})
  if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
    raise ReportInputError(f"{what} {path!r}: 'metrics' must map each method to an object.")
  return table


def model_correct_by_query(table: Mapping[str, Any] | None) -> dict[str, bool]:
  """example_id (as a string) -> does the model answer it, from an evaluation table, if it records that.

  Reads `model_correct_by_query` ({example_id: bool}); evaluation files that do
  not record per-query correctness give {}.
  """
  if not table:
    return {}
  per_query = table.get("model_correct_by_query")
  if not isinstance(per_query, dict):
    return {}
  return {str(k): bool(v) for k, v in per_query.items() if isinstance(v, bool)}
