"""Tests for trackstar_jax.results: schema, proponent_correct, atomic writes, validation errors."""

import json
import os
import uuid

import numpy as np
import pytest

from trackstar_jax import results
from trackstar_jax.retrieval import RetrievalResult

QUERIES = [
    dict(query_id=0, fact_id="f0", relation="capital", prompt="The capital of A is", target=" B",
         answers=[" B"], gold_sentence_ids=[11, 13], frequency=2),
    dict(query_id=1, fact_id="f1", relation="born_in", prompt="C was born in", target=" D",
         answers=[" D"], gold_sentence_ids=[12], frequency=1),
]  # fmt: skip
TEXTS = {10: "x y", 11: "The capital of A is B.", 12: "C was born in D.", 13: "A's capital: B.", 14: "z"}


def _result():
  return RetrievalResult(
    top_ids=np.array([[11, 10, 13], [12, 14, -1]]),
    top_scores=np.array([[0.9, 0.5, 0.5], [0.8, 0.1, np.nan]], np.float32),
    top_rows=np.array([[1, 0, 3], [2, 4, -1]]),
    bottom_ids=np.array([[14, 12, 10], [10, 11, -1]]),
    bottom_scores=np.array([[-0.7, -0.2, 0.0], [-0.3, 0.05, np.nan]], np.float32),
    bottom_rows=np.array([[4, 2, 0], [0, 1, -1]]),
  )


def test_build_write_read_validate(tmp_path):
  lines = results.build_results(queries=QUERIES, result=_result(), text_of=TEXTS)
  assert lines[0]["proponent_ids"] == [11, 10, 13]
  assert lines[0]["proponents"] == [TEXTS[11], TEXTS[10], TEXTS[13]]
  assert lines[0]["proponent_correct"] == [True, False, True]
  assert lines[1]["proponent_ids"] == [12, 14]  # the missing (-1) entry is dropped
  assert lines[1]["proponent_correct"] == [True, False]
  assert lines[0]["opponent_scores"] == pytest.approx([-0.7, -0.2, 0.0])
  assert lines[0]["inputs_plaintext"] + lines[0]["targets_plaintext"] == "The capital of A is B"
  assert (lines[0]["fact_id"], lines[0]["relation"], lines[0]["frequency"]) == ("f0", "capital", 2)
  sources = {"proponent_sources", "opponent_sources"}  # only for corpora of windowed documents (below)
  assert set(lines[0]) == set(results.REQUIRED_FIELDS) | set(results.OPTIONAL_FIELDS) - sources
  named = results.build_results(queries=QUERIES, result=_result(), text_of=TEXTS, source_of=lambda i: f"doc{i}#0")
  assert named[0]["proponent_sources"] == [f"doc{i}#0" for i in named[0]["proponent_ids"]]
  assert named[1]["opponent_sources"] == [f"doc{i}#0" for i in named[1]["opponent_ids"]]
  with pytest.raises(ValueError, match="proponent_sources"):
    results.validate_results_line({**named[0], "proponent_sources": named[0]["proponent_sources"][:-1]})
  path = str(tmp_path / "out" / "results.jsonl")
  meta = dict(dataset="synthetic_facts", fingerprint="ab12", num_examples=5, method="trackstar")
  results.write_results(path, lines, metadata=meta)
  # no temporary file left behind
  assert sorted(os.listdir(tmp_path / "out")) == ["results.jsonl", "results.jsonl.meta.json"]
  assert results.read_metadata(path) == meta
  assert results.validate_results_file(path) == 2
  header = tmp_path / "with_header.jsonl"  # the header-line variant the metrics reader accepts
  header.write_text(json.dumps({"metadata": meta}) + "\n" + open(path).read())
  assert results.validate_results_file(str(header)) == 2
  assert results.read_results(path) == json.loads(json.dumps(lines))
  url = f"memory://res_{uuid.uuid4().hex}/results.jsonl"  # the kvstore path that gs:// takes
  results.write_results(url, lines)
  assert results.read_results(url) == results.read_results(path)


def test_callable_text_and_minimal_line():
  line = results.make_results_line(
      example_id="q7", inputs_plaintext="p", targets_plaintext=" t",
      proponent_ids=[], proponent_scores=[], proponents=[],
      opponent_ids=["a"], opponent_scores=[-1.0], opponents=["text a"],
  )  # fmt: skip
  assert "proponent_correct" not in line and "fact_id" not in line
  lines = results.build_results(queries=QUERIES[:1], result=_one(), text_of=lambda i: f"s{i}")
  assert lines[0]["proponents"] == ["s11"]


def _one():
  r = _result()
  return RetrievalResult(*(getattr(r, f)[:1, :1] for f in r.__dataclass_fields__))


@pytest.mark.parametrize(
  "mutate,match",
  [
    (lambda l: l.pop("proponent_scores"), "missing fields"),
    (lambda l: l.update(extra=1), "unknown fields"),
    (lambda l: l.update(proponent_scores=[0.1, 0.5, 0.4]), "non-increasing"),
    (lambda l: l.update(opponent_scores=[0.0, -0.2, -0.7]), "non-decreasing"),
    (lambda l: l.update(proponents=["a"]), "as long as"),
    (lambda l: l.update(proponent_correct=[True]), "proponent_correct"),
    (lambda l: l.update(proponent_scores=[float("nan"), 0.5, 0.5]), "finite"),
    (lambda l: l.update(proponent_ids=[11, 11, 13]), "duplicates"),
    (lambda l: l.update(example_id=None), "example_id"),
    (lambda l: l.update(inputs_plaintext=3), "inputs_plaintext"),
  ],
)
def test_validator_rejects(mutate, match):
  line = results.build_results(queries=QUERIES, result=_result(), text_of=TEXTS)[0]
  results.validate_results_line(line)
  mutate(line)
  with pytest.raises(ValueError, match=match):
    results.validate_results_line(line)


def test_validate_file_reports_line_and_write_refuses_bad(tmp_path):
  lines = results.build_results(queries=QUERIES, result=_result(), text_of=TEXTS)
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
  with pytest.raises(ValueError, match="line 2: duplicate example_id"):
    results.validate_results_file(str(path))
  bad = dict(lines[1], proponent_scores=[0.0, 1.0])
  with pytest.raises(ValueError, match=r"line 1 \(example_id=1\)"):
    results.write_results(str(tmp_path / "new.jsonl"), [lines[0], bad])
  assert not os.path.exists(tmp_path / "new.jsonl")
