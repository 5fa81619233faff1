"""Retrieval results as JSON lines in the published TrackStar schema.

One line per query:

  example_id          query id (int or str)
  inputs_plaintext    the prompt
  targets_plaintext   the target (begins with a space: prompt + target is the sentence)
  proponents          texts of the top-k training examples, best first
  proponent_ids       their example ids
  proponent_scores    their scores, non-increasing
  opponents, opponent_ids, opponent_scores   the bottom-k, most negative first

and where known: `fact_id`, `relation`, `proponent_correct` (per proponent:
does it state the query's fact, from the gold sentence ids), `frequency`
(how often the fact occurs in the corpus), `proponent_sources` /
`opponent_sources` (per example, "doc_id#window": the document and window
of a user's corpus it comes from, `data.corpus.Corpus.id_of`).

Files are written atomically (temporary file + rename on local disks, a single
object write on gs://), so a results file that exists is complete. Run
metadata (dataset, corpus fingerprint, N, method) goes to `<path>.meta.json`,
written first; `read_results` also skips a `{"metadata": ...}` header line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import json
import math
from typing import Any

import numpy as np

from trackstar_jax import fileio

REQUIRED_FIELDS = (
    "example_id", "inputs_plaintext", "targets_plaintext",
    "proponents", "proponent_ids", "proponent_scores",
    "opponents", "opponent_ids", "opponent_scores",
)  # fmt: skip
OPTIONAL_FIELDS = ("fact_id", "relation", "proponent_correct", "frequency", "proponent_sources", "opponent_sources")


def make_results_line(
  *,
  example_id: int | str,
  inputs_plaintext: str,
  targets_plaintext: str,
  proponent_ids: Sequence[int | str],
  proponent_scores: Sequence[float],
  proponents: Sequence[str],
  opponent_ids: Sequence[int | str],
  opponent_scores: Sequence[float],
  opponents: Sequence[str],
  fact_id: str | None = None,
  relation: str | None = None,
  gold_ids: Iterable[int | str] | None = None,
  frequency: int | None = None,
) -> dict[str, Any]:
  """One results record; `proponent_correct` is computed from `gold_ids` when given."""
  line = {
    "example_id": _py(example_id),
    "inputs_plaintext": inputs_plaintext,
    "targets_plaintext": targets_plaintext,
    "proponents": list(proponents),
    "proponent_ids": [_py(i) for i in proponent_ids],
    "proponent_scores": [float(s) for s in proponent_scores],
    "opponents": list(opponents),
    "opponent_ids": [_py(i) for i in opponent_ids],
    "opponent_scores": [float(s) for s in opponent_scores],
  }
  if fact_id is not None:
    line["fact_id"] = fact_id
  if relation is not None:
    line["relation"] = relation
  if gold_ids is not None:
    gold = {_py(g) for g in gold_ids}
    line["proponent_correct"] = [i in gold for i in line["proponent_ids"]]
  if frequency is not None:
    line["frequency"] = int(frequency)
  validate_results_line(line)
  return line


def _py(x):
  return x.item() if isinstance(x, np.generic) else x


def build_results(
  *,
  queries: Sequence[Mapping[str, Any]],
  result,
  text_of: Mapping[int, str] | Callable[[int], str],
  source_of: Callable[[int], str | None] | None = None,
) -> list[dict[str, Any]]:
  """Results lines from query records (the data module's query dicts) and a `RetrievalResult`.

  Args:
    queries: dicts with query_id, prompt, target and optionally fact_id,
      relation, gold_sentence_ids, frequency; in the order of the query encodings.
    result: `retrieval.RetrievalResult` with [Q, k] arrays.
    text_of: training example id -> text (a dict or a function).
    source_of: training example id -> "doc_id#window" (or None): adds
      `proponent_sources` / `opponent_sources`.
  """
  get = text_of.__getitem__ if isinstance(text_of, Mapping) else text_of
  if len(queries) != result.top_ids.shape[0]:
    raise ValueError(f"{len(queries)} query records but {result.top_ids.shape[0]} retrieval results.")
  lines = []
  for i, q in enumerate(queries):
    top = [(int(d), float(s)) for d, s in zip(result.top_ids[i], result.top_scores[i]) if d >= 0]
    bot = [(int(d), float(s)) for d, s in zip(result.bottom_ids[i], result.bottom_scores[i]) if d >= 0]
    lines.append(
      make_results_line(
        example_id=q["query_id"],
        inputs_plaintext=q["prompt"],
        targets_plaintext=q["target"],
        proponent_ids=[d for d, _ in top],
        proponent_scores=[s for _, s in top],
        proponents=[get(d) for d, _ in top],
        opponent_ids=[d for d, _ in bot],
        opponent_scores=[s for _, s in bot],
        opponents=[get(d) for d, _ in bot],
        fact_id=q.get("fact_id"),
        relation=q.get("relation"),
        gold_ids=q.get("gold_sentence_ids"),
        frequency=q.get("frequency"),
      )
    )
    sources = [[source_of(d) for d, _ in side] for side in (top, bot)] if source_of is not None else None
    if sources is not None and all(x is not None for side in sources for x in side):
      lines[-1]["proponent_sources"], lines[-1]["opponent_sources"] = sources
      validate_results_line(lines[-1])
  return lines


def validate_results_line(obj: Any) -> None:
  """Raises ValueError naming the field when `obj` is not a valid results record."""
  if not isinstance(obj, dict):
    raise ValueError(f"A results line must be a JSON object, got {type(obj).__name__}.")
  missing = [f for f in REQUIRED_FIELDS if f not in obj]
  if missing:
    raise ValueError(f"Results line is missing fields {missing}.")
  unknown = sorted(set(obj) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
  if unknown:
    raise ValueError(f"Results line has unknown fields {unknown}; allowed: {REQUIRED_FIELDS + OPTIONAL_FIELDS}.")
  _check(
    isinstance(obj["example_id"], (int, str)) and not isinstance(obj["example_id"], bool), "example_id", "an int or str"
  )
  for f in ("inputs_plaintext", "targets_plaintext"):
    _check(isinstance(obj[f], str), f, "a string")
  for side, order in (("proponent", -1), ("opponent", 1)):
    texts, ids, scores = obj[side + "s"], obj[side + "_ids"], obj[side + "_scores"]
    for f, v in ((side + "s", texts), (side + "_ids", ids), (side + "_scores", scores)):
      _check(isinstance(v, list), f, "a list")
    _check(
      len(texts) == len(ids) == len(scores),
      side + "s",
      f"as long as {side}_ids and {side}_scores ({len(texts)}, {len(ids)}, {len(scores)})",
    )
    _check(all(isinstance(t, str) for t in texts), side + "s", "a list of strings")
    _check(
      all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids),
      side + "_ids",
      "a list of ints or strings",
    )
    _check(
      all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores),
      side + "_scores",
      "a list of finite numbers",
    )
    _check(len(set(ids)) == len(ids), side + "_ids", "free of duplicates")
    _check(
      all(order * (b - a) >= 0 for a, b in zip(scores, scores[1:])),
      side + "_scores",
      "non-increasing" if order < 0 else "non-decreasing",
    )
  if "proponent_correct" in obj:
    pc = obj["proponent_correct"]
    _check(
      isinstance(pc, list) and all(isinstance(b, bool) for b in pc) and len(pc) == len(obj["proponent_ids"]),
      "proponent_correct",
      "a list of bools, one per proponent",
    )
  for f in ("fact_id", "relation"):
    if f in obj:
      _check(isinstance(obj[f], str), f, "a string")
  if "frequency" in obj:
    _check(isinstance(obj["frequency"], int) and not isinstance(obj["frequency"], bool), "frequency", "an int")
  for side in ("proponent", "opponent"):
    if f"{side}_sources" in obj:
      src = obj[f"{side}_sources"]
      _check(
        isinstance(src, list) and all(isinstance(x, str) for x in src) and len(src) == len(obj[f"{side}_ids"]),
        f"{side}_sources",
        f"a list of strings, one per {side}",
      )


def _check(ok: bool, field: str, what: str) -> None:
  if not ok:
    raise ValueError(f"Results field {field!r} must be {what}.")


def meta_path(path: str) -> str:
  """The side file with the results' metadata: `<path>.meta.json`."""
  return path + ".meta.json"


def write_results(path: str, lines: Sequence[Mapping[str, Any]], *, metadata: Mapping[str, Any] | None = None) -> None:
  """Validates and writes `lines` as JSON lines to `path` atomically (local path, file:// or gs://).

  `metadata` (e.g. dataset name, corpus fingerprint, num_examples, method) goes
  to `meta_path(path)`, written before the results file, so a results file
  that exists always has its metadata next to it.
  """
  for i, line in enumerate(lines):
    try:
      validate_results_line(line)
    except ValueError as e:
      raise ValueError(f"Results line {i} (example_id={line.get('example_id')!r}): {e}") from e
  if metadata is not None:
    fileio.write_bytes(meta_path(path), json.dumps(dict(metadata), indent=1, sort_keys=True).encode())
  fileio.write_bytes(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode())


def read_metadata(path: str) -> dict[str, Any] | None:
  """The metadata written with `path` (`<path>.meta.json`), or None."""
  try:
    return json.loads(fileio.read_bytes(meta_path(path)))
  except FileNotFoundError:
    return None


def read_lines(path: str) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any]]:
  """([(line number, record)], header metadata) of a results file, parsed but not validated.

  The one reader of results files (local path, file://, gs://, memory://);
  `load_results` and the HTML report are built on it.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: a line that is not JSON, or an object that is neither a record
      nor a `{"metadata": ...}` header (file and line number in the message).
  """
  try:
    text = fileio.read_text(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"Results file {path!r} does not exist.") from None
  records, header = [], {}
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}).") from e
    if not isinstance(obj, dict):
      raise ValueError(f"{path}, line {lineno}: a results line must be a JSON object, got {type(obj).__name__}.")
    if _is_header(obj):
      header.update(obj["metadata"] if isinstance(obj["metadata"], dict) else {})
    elif "example_id" in obj:
      records.append((lineno, obj))
    else:
      raise ValueError(
        f"{path}, line {lineno}: record has no 'example_id' (TrackStar results schema) and is not "
        "a {'metadata': ...} header."
      )
  return records, header


def load_results(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """(records, metadata) of a results file: metadata from a header line and from `<path>.meta.json`."""
  records, header = read_lines(path)
  return [r for _, r in records], {**(read_metadata(path) or {}), **header}


def _is_header(obj: Any) -> bool:
  return isinstance(obj, dict) and "metadata" in obj and "example_id" not in obj


def read_results(path: str) -> list[dict[str, Any]]:
  """The records of a results file (see `load_results`)."""
  return load_results(path)[0]


def validate_results_file(path: str) -> int:
  """Validates every line of a results file; returns the number of lines."""
  lines = read_results(path)
  seen = set()
  for i, line in enumerate(lines):
    try:
      validate_results_line(line)
    except ValueError as e:
      raise ValueError(f"{path}, line {i + 1}: {e}") from e
    if line["example_id"] in seen:
      raise ValueError(f"{path}, line {i + 1}: duplicate example_id {line['example_id']!r}.")
    seen.add(line["example_id"])
  return len(lines)
