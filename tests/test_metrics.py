"""Tests of trackstar_jax.evaluation.metrics and ablation against hand-computed values."""

import json
import math

import pytest

from trackstar_jax.evaluation import ablation, metrics

QUERIES = [
  dict(query_id=0, fact_id="f0", relation="r1", gold_sentence_ids=[3, 7], frequency=1, model_correct=True),
  dict(query_id=1, fact_id="f1", relation="r1", gold_sentence_ids=[5], frequency=5, model_correct=False),
  dict(query_id=2, fact_id="f2", relation="r2", gold_sentence_ids=[9], frequency=40, model_correct=True),
]
RESULTS = [
  dict(example_id=0, fact_id="f0", relation="r1", proponent_ids=[1, 3, 7, 2]),
  dict(
    example_id=1, fact_id="f1", relation="r1", proponent_ids=[0, 1, 2, 3, 4, 6, 8, 10, 11, 12, 5]
  ),  # gold at rank 11
  dict(example_id=2, fact_id="f2", relation="r2", proponent_ids=[9]),
]


def test_per_query_hand_values():
  assert metrics.per_query_metrics([1, 3, 7, 2], [3, 7]) == {"mrr": 0.5, "recall@10": 1.0, "precision@10": 0.2}
  m = metrics.per_query_metrics(RESULTS[1]["proponent_ids"], [5])
  assert m == {"mrr": 1 / 11, "recall@10": 0.0, "precision@10": 0.0}
  assert metrics.per_query_metrics([], [5]) == {"mrr": 0.0, "recall@10": 0.0, "precision@10": 0.0}


def test_overall_relation_bucket_correctness():
  m = metrics.compute_metrics(RESULTS, QUERIES, num_examples=13)
  o = m["overall"]
  assert o["n"] == 3
  assert o["mrr"] == pytest.approx((0.5 + 1 / 11 + 1.0) / 3)
  assert o["recall@10"] == pytest.approx(2 / 3)
  assert o["precision@10"] == pytest.approx(0.1)
  assert m["by_relation"]["r1"]["mrr"] == pytest.approx((0.5 + 1 / 11) / 2)
  assert m["by_relation"]["r1"]["recall@10"] == pytest.approx(0.5)
  assert m["by_relation"]["r2"] == {"n": 1, "mrr": 1.0, "recall@10": 1.0, "precision@10": 0.1}
  assert list(m["by_frequency"]) == ["1", "4-7", ">=32"]
  assert m["by_frequency"]["4-7"]["mrr"] == pytest.approx(1 / 11)
  assert m["model_correct"]["n"] == 2
  assert m["model_correct"]["mrr"] == pytest.approx(0.75)
  assert m["model_correct"]["precision@10"] == pytest.approx(0.15)
  assert m["model_incorrect"]["n"] == 1
  assert m["model_incorrect"]["recall@10"] == 0.0
  assert m["n_unknown_correctness"] == 0
  # An explicit model_correct map overrides the queries' field.
  m2 = metrics.compute_metrics(RESULTS, QUERIES, model_correct={0: False, 1: False, 2: False})
  assert m2["model_correct"]["n"] == 0 and math.isnan(m2["model_correct"]["mrr"])
  assert m2["model_incorrect"]["mrr"] == pytest.approx(o["mrr"])


def test_frequency_bucket_labels():
  assert [metrics.frequency_bucket(f) for f in (1, 2, 3, 4, 7, 8, 31, 32, 1000)] == [
    "1",
    "2-3",
    "2-3",
    "4-7",
    "4-7",
    "8-15",
    "16-31",
    ">=32",
    ">=32",
  ]
  assert metrics.frequency_bucket(5, edges=(10,)) == "1-9"


def test_file_roundtrip_with_header_and_string_ids(tmp_path):
  p = tmp_path / "r.jsonl"
  with open(p, "w") as f:
    f.write(json.dumps({"metadata": {"fingerprint": "abc123", "num_examples": 13}}) + "\n")
    for r in RESULTS:
      f.write(json.dumps({**r, "example_id": str(r["example_id"])}) + "\n")
  m = metrics.compute_metrics(str(p), QUERIES, fingerprint="abc123")
  assert m["overall"]["mrr"] == pytest.approx((0.5 + 1 / 11 + 1.0) / 3)
  with pytest.raises(ValueError, match="fingerprint"):
    metrics.compute_metrics(str(p), QUERIES, fingerprint="def456")


def test_side_metadata_bounds_ids(tmp_path):
  p = tmp_path / "r.jsonl"
  p.write_text("\n".join(json.dumps(r) for r in RESULTS))
  (tmp_path / "r.jsonl.meta.json").write_text(json.dumps({"num_examples": 10}))
  with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
    metrics.compute_metrics(str(p), QUERIES)


def test_errors():
  with pytest.raises(ValueError, match="no ground truth"):
    metrics.compute_metrics([dict(example_id=99, proponent_ids=[1])], QUERIES)
  with pytest.raises(ValueError, match="fact_id"):
    metrics.compute_metrics([dict(example_id=0, fact_id="zzz", proponent_ids=[1])], QUERIES)
  with pytest.raises(ValueError, match=r"proponent_ids entry 13 outside \[0, 13\)"):
    metrics.compute_metrics([dict(example_id=0, proponent_ids=[13])], QUERIES, num_examples=13)
  with pytest.raises(ValueError, match="no gold_sentence_ids"):
    metrics.compute_metrics([dict(example_id=0, proponent_ids=[1])], [dict(QUERIES[0], gold_sentence_ids=[])])
  with pytest.raises(ValueError, match="no result records"):
    metrics.compute_metrics([], QUERIES)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    metrics.compute_metrics("/nonexistent/nope.jsonl", QUERIES)


def test_annotate_correct():
  out = metrics.annotate_correct(RESULTS[:1], QUERIES)
  assert out[0]["proponent_correct"] == [False, True, True, False]


def test_ablation_table(tmp_path):
  perfect = [dict(example_id=q["query_id"], proponent_ids=list(q["gold_sentence_ids"])) for q in QUERIES]
  tp = {"trackstar": {"tail_patch@1": 0.01, "tail_patch@10": 0.005, "tail_patch_rel@1": 0.2, "tail_patch_rel@10": 0.1}}
  t = ablation.ablation_table(
    methods={"trackstar": perfect, "other": RESULTS}, queries=QUERIES, tail_patch=tp, subset="model_correct"
  )
  assert [r["method"] for r in t["rows"]] == ["trackstar", "other"]
  assert t["rows"][0]["mrr"] == 1.0 and t["rows"][0]["n"] == 2
  assert t["rows"][1]["mrr"] == pytest.approx(0.75)
  assert math.isnan(t["rows"][1]["tail_patch@1"])
  md, js = ablation.write_table(t, str(tmp_path / "ablation"))
  text = open(md).read()
  assert "| trackstar | 2 | 1.0000 | 1.0000 |" in text and "| other |" in text
  loaded = json.load(open(js))
  assert loaded["rows"][1]["tail_patch@1"] is None
  assert loaded["rows"][0]["tail_patch_rel@1"] == 0.2
  with pytest.raises(ValueError, match="subset"):
    ablation.ablation_table(methods={"a": perfect}, queries=QUERIES, subset="bogus")
  with pytest.raises(ValueError, match="not in `methods`"):
    ablation.ablation_table(methods={"a": perfect}, queries=QUERIES, tail_patch={"b": {}})
