"""The relation split and the accuracy job: variants chosen on dev relations, reported on test."""

import json
import os
import shutil

import numpy as np
import pytest

from trackstar_jax.evaluation import relation_split as rs
from trackstar_jax.jobs import accuracy


def test_relation_split_is_a_deterministic_partition_independent_of_order():
  rels = [f"P{i}" for i in range(20)]
  dev, test = rs.relation_split(rels, seed=3)
  assert (dev, test) == rs.relation_split(list(reversed(rels)) * 2, seed=3)
  assert sorted(dev + test) == sorted(rels) and not set(dev) & set(test)
  assert len(dev) == 10
  assert rs.relation_split(rels, seed=4) != (dev, test)  # the seed moves it
  assert len(rs.relation_split(rels, dev_fraction=0.2)[0]) == 4
  with pytest.raises(ValueError, match="2 distinct"):
    rs.relation_split(["P1", "P1"])
  with pytest.raises(ValueError, match="dev_fraction"):
    rs.relation_split(rels, dev_fraction=1.0)


def test_accuracy_by_split_matches_a_direct_count():
  rng = np.random.default_rng(0)
  queries = [dict(relation=f"P{rng.integers(4)}", frequency=int(rng.integers(1, 12))) for _ in range(300)]
  correct = rng.random(300) < 0.4
  t = rs.accuracy_by_split(correct, queries, dev=["P0", "P2"])
  for name, keep in (("dev", {"P0", "P2"}), ("test", {"P1", "P3"})):
    idx = [i for i, q in enumerate(queries) if q["relation"] in keep]
    assert t[name]["n"] == len(idx)
    assert t[name]["accuracy"] == pytest.approx(np.mean(correct[idx]))
    ge3 = [i for i in idx if queries[i]["frequency"] >= 3]
    assert t[name][">=3"] == pytest.approx(np.mean(correct[ge3])) and t[name]["n_>=3"] == len(ge3)
    ten = [i for i in idx if queries[i]["frequency"] >= 10]
    assert t[name]["10+"] == pytest.approx(np.mean(correct[ten]))
  assert t["by_relation"]["P1"]["n"] == sum(q["relation"] == "P1" for q in queries)
  with pytest.raises(ValueError, match="one per query"):
    rs.accuracy_by_split(correct[:-1], queries, dev=["P0"])


def test_select_variant_uses_dev_only():
  def table(dev, test):
    return {"dev": {">=3": dev, "accuracy": dev}, "test": {">=3": test, "accuracy": test, "n": 5}}

  tables = {"a": table(0.5, 0.9), "b": table(0.6, 0.1)}
  assert rs.select_variant(tables) == "b"  # the better test score of "a" must not leak into the choice
  assert "b (selected on dev)" in rs.markdown(tables, selected="b")
  with pytest.raises(ValueError, match="no dev queries"):
    rs.select_variant({"a": table(float("nan"), 0.1)})


def test_accuracy_job_and_compare(trained):
  table = accuracy.run(trained.config, trained.workdir)
  with open(os.path.join(trained.workdir, "metrics.jsonl")) as f:
    final = [json.loads(line) for line in f if "query_accuracy" in line][-1]
  # The same checkpoint and queries as training's own last evaluation.
  assert table["all"]["accuracy"] == pytest.approx(final["query_accuracy"])
  assert table["dev"]["n"] + table["test"]["n"] == table["all"]["n"] > 0
  assert set(table["dev_relations"]) < set(table["by_relation"])
  other = trained.workdir + "_copy"
  shutil.copytree(trained.workdir, other)
  best, md = accuracy.compare({"x": trained.workdir, "y": other})
  assert best == "x" and md.count("\n") == 3  # equal dev scores: the first wins
  os.remove(accuracy.output_path(other))
  with pytest.raises(FileNotFoundError, match="launch/accuracy.py"):
    accuracy.compare({"x": trained.workdir, "y": other})


def test_paired_comparison_against_a_direct_count():
  rng = np.random.default_rng(0)
  rels = ["P0", "P1", "P2", "P3"]
  rows_a, rows_b = [], []
  for i in range(400):
    rel = rels[i % 4]
    better = 0.3 if rel in ("P0", "P1") else 0.0  # a beats b on P0 and P1 only
    a = float(rng.random() < 0.3 + better)
    rows_a.append(dict(query_id=i, relation=rel, mrr=a, **{"recall@10": a}))
    rows_b.append(dict(query_id=i, relation=rel, mrr=float(rng.random() < 0.3), **{"recall@10": 0.0}))
  rows_b.reverse()  # paired by query id, not by position
  for dev, keep in ((["P0", "P1"], True), (["P2", "P3"], False)):
    c = rs.paired_comparison(rows_a, rows_b, dev=dev, samples=500)
    sel = [r["relation"] in dev for r in rows_a]
    a = np.array([r["mrr"] for r in rows_a])
    b = np.array([{r["query_id"]: r["mrr"] for r in rows_b}[r["query_id"]] for r in rows_a])
    assert c["dev"]["n"] == sum(sel) and c["test"]["n"] == 400 - sum(sel) and c["all"]["n"] == 400
    assert c["dev"]["mrr"]["a"] == pytest.approx(a[sel].mean()) and c["dev"]["mrr"]["b"] == pytest.approx(b[sel].mean())
    lo, hi = c["dev"]["mrr"]["ci"]
    assert c["dev"]["mrr"]["diff"] == pytest.approx((a - b)[sel].mean())
    assert lo < c["dev"]["mrr"]["diff"] < hi
    assert rs.keep_costlier(c) is keep  # decided by the dev relations alone, whatever test says
    assert ("keep a (x)" if keep else "take b (y)") in rs.comparison_markdown("x", "y", c)
  with pytest.raises(ValueError, match=r"only in a: \[0\]"):
    rs.paired_comparison(rows_a, rows_b[:-1], dev=["P0"])
