"""The whole ablation ladder (launch/pipeline.py) on the synthetic fact world.

train -> fit_hessian / encode per encoding variant -> retrieve per method ->
evaluate, then a rerun that must skip every stage. Runs on configs/synthetic.py
with a smaller world and fewer steps so that it fits a 2-core CI machine
(the default world's 1500 steps alone take minutes on CPU); the model still
learns about 40% of the facts (90% of those stated >= 10 times).
"""

import json
import os

import pytest

from configs import synthetic
from trackstar_jax import results as results_lib
from trackstar_jax.evaluation import ladder


def small_config():
  c = synthetic.get_config()
  with c.unlocked():
    c.world.n_entities = 120
    c.world.n_facts = 120
    c.world.max_frequency = 30
    c.world.n_distractors = 300
    c.tokenizer.vocab_size = 384
    c.train.num_steps = 400
    c.train.warmup_steps = 40
    c.train.batch_size = 32
    c.train.eval_every = 0
    c.train.checkpoint_every = 400
    c.hessian.train_sample = 512
  return c


def test_ablation_ladder_end_to_end(tmp_path, monkeypatch):
  config = small_config()
  # The dense baseline (torch MiniLM) alone takes ~1 min on 2 CPU cores: here it is the skipped row that a
  # machine without the optional extra gets (tests/test_baselines.py covers dense retrieval itself).
  monkeypatch.setattr(ladder.baselines, "dense_available", lambda: False)
  workdir = str(tmp_path / "w")
  table = ladder.run_ladder(config, workdir)

  _, methods = ladder.ladder(config)
  rows = {r["method"]: r for r in table["rows"]}
  ran = [n for n in rows if not rows[n].get("skipped")]
  assert ran == [m.name for m in methods if m.name in ran]  # ladder order; skipped rows come last
  assert set(rows) == {m.name for m in methods}  # every rung; dense as a skipped row
  assert rows["dense (MiniLM)"]["skipped"] and table["skipped"]
  for path in table["results"].values():
    assert results_lib.validate_results_file(path) == 120
  for name in ("ablation.md", "ablation.json"):
    assert os.path.exists(os.path.join(workdir, name))
  saved = json.load(open(os.path.join(workdir, "ablation.json")))
  assert [r["method"] for r in saved["rows"]] == list(rows)
  assert table["subset"] == "model_correct" and rows["random"]["n"] >= 20  # the model learned something

  ts, rnd = rows["+ R_mixed = TrackStar"], rows["random"]
  assert ts["mrr"] > rnd["mrr"] + 0.05, (ts, rnd)  # seen: 0.12 vs 0.014
  assert ts["tail_patch@10"] > rnd["tail_patch@10"], (ts, rnd)
  assert rows["BM25"]["mrr"] > rnd["mrr"]

  # A rerun finds every output up to date: nothing is recomputed.
  again = ladder.run_ladder(config, workdir)
  assert set(again["stage_seconds"]) == {"evaluate"}
  assert [r["mrr"] for r in again["rows"]] == [r["mrr"] for r in table["rows"]]
