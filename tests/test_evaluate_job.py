"""The evaluate job (trackstar_jax/jobs/evaluate.py): outputs, and clear errors on inputs that don't belong together.

One tiny checkpoint (runlocal world, 4 training steps) serves every test; the
results files are written directly (oracle / random / doctored), so no encoding
is needed.
"""

import json
import os

import numpy as np
import pytest

from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib
from trackstar_jax.evaluation import baselines
from trackstar_jax.jobs import evaluate as run
from trackstar_jax.jobs import workdir as workdir_lib


@pytest.fixture(scope="module")
def evaluated(trained):
  config = trained.config
  config.evaluate.subset = "overall"  # 4 steps: the model answers nothing yet
  config.evaluate.tail_patch_k = 2
  dataset = workdir_lib.load_data(config, trained.workdir).dataset
  return config, trained.workdir, dataset


def _meta(ds, **kw):
  return dict(dict(dataset=ds.name, fingerprint=ds.fingerprint, num_examples=len(ds.corpus), method="x"), **kw)


def _oracle(dataset):
  """Gold sentences first: MRR 1."""
  texts = {c["sentence_id"]: c["text"] for c in dataset.corpus}
  out = []
  for q in dataset.queries:
    ids = list(q["gold_sentence_ids"])[:3]
    out.append(
      results_lib.make_results_line(
        example_id=q["query_id"],
        inputs_plaintext=q["prompt"],
        targets_plaintext=q["target"],
        proponent_ids=ids,
        proponent_scores=[1.0] * len(ids),
        proponents=[texts[i] for i in ids],
        opponent_ids=[],
        opponent_scores=[],
        opponents=[],
        fact_id=q["fact_id"],
        relation=q["relation"],
      )
    )
  return out


def _write(path, lines, meta):
  results_lib.write_results(str(path), lines, metadata=meta)
  return str(path)


def _oracle_and_random(dataset, directory):
  """Results files of the two ends: gold first (MRR 1) and random proponents."""
  rand = baselines.random_retrieve(corpus=list(dataset.corpus), queries=list(dataset.queries), k=10)
  return {
    "oracle": _write(directory / "oracle.jsonl", _oracle(dataset), _meta(dataset)),
    "random": _write(directory / "random.jsonl", rand, _meta(dataset)),
  }


def test_evaluate_writes_table_and_caches_tail_patch(evaluated, tmp_path):
  config, workdir, dataset = evaluated
  files = _oracle_and_random(dataset, tmp_path)
  prefix = str(tmp_path / "out" / "evaluation")
  table = run.run(
    config, workdir, results=files, output_prefix=prefix, dataset=dataset, skipped={"dense": "not installed"}
  )
  rows = {r["method"]: r for r in table["rows"]}
  assert list(rows) == ["oracle", "random", "dense"]
  assert rows["oracle"]["mrr"] == 1.0 and rows["oracle"]["recall@10"] == 1.0
  assert rows["random"]["mrr"] < 0.5
  assert rows["oracle"]["n"] == len(dataset.queries)
  assert np.isfinite(rows["oracle"]["tail_patch@1"]) and np.isfinite(rows["random"]["tail_patch_rel@1"])
  assert np.isnan(rows["oracle"]["tail_patch@10"])  # tail_patch_k=2: no @10
  assert np.isnan(rows["dense"]["mrr"]) and rows["dense"]["skipped"]
  assert set(table["metrics"]["oracle"]["by_relation"]) == {q["relation"] for q in dataset.queries}
  md = open(prefix + ".md").read()
  assert "| oracle |" in md and "dense: skipped" in md and "MRR by relation" in md
  saved = json.load(open(prefix + ".json"))
  assert saved["rows"][0]["mrr"] == 1.0 and saved["model_accuracy"]["n"] == len(dataset.queries)
  assert len(saved["model_correct_by_query"]) == len(dataset.queries)  # per query, for the report
  # Rerun: tail-patch comes from the cache (same numbers); a changed results file is patched again.
  cache = os.path.join(prefix + "_cache", "oracle.tail_patch.json")
  assert run.file_slug("TrackStar, d=64/block") == "TrackStar_d_64_block"
  mtime = os.path.getmtime(cache)
  again = run.run(config, workdir, results=files, output_prefix=prefix, dataset=dataset)
  assert os.path.getmtime(cache) == mtime
  assert again["tail_patch"]["oracle"] == table["tail_patch"]["oracle"]


def test_results_for_a_query_without_ground_truth(evaluated, tmp_path):
  config, workdir, dataset = evaluated
  lines = _oracle(dataset)
  lines[0] = dict(lines[0], example_id=10_000)
  path = _write(tmp_path / "r.jsonl", lines, _meta(dataset))
  with pytest.raises(run.EvaluationInputError, match="example_id=10000 has no ground truth"):
    run.run(config, workdir, results={"bad": path}, dataset=dataset, tail_patch=False)


def test_results_from_another_corpus(evaluated, tmp_path):
  config, workdir, dataset = evaluated
  path = _write(tmp_path / "r.jsonl", _oracle(dataset), _meta(dataset, fingerprint="f" * 64))
  with pytest.raises(run.EvaluationInputError, match="fingerprint .* does not match"):
    run.run(config, workdir, results={"other": path}, dataset=dataset, tail_patch=False)
  path = _write(tmp_path / "r2.jsonl", _oracle(dataset), _meta(dataset, dataset="lama_trex/all/1.0.0"))
  with pytest.raises(run.EvaluationInputError, match="results are for dataset 'lama_trex"):
    run.run(config, workdir, results={"other": path}, dataset=dataset, tail_patch=False)


def test_results_from_another_checkpoint_or_store(evaluated, tmp_path):
  config, workdir, dataset = evaluated
  # The results' own step differs from the evaluated checkpoint's.
  path = _write(tmp_path / "r.jsonl", _oracle(dataset), _meta(dataset, step=999))
  with pytest.raises(run.EvaluationInputError, match="step 999.*--config.encoder.step"):
    run.run(config, workdir, results={"old": path}, dataset=dataset, tail_patch=False)
  # The results' store was encoded from another checkpoint.
  url = str(tmp_path / "enc.zarr")
  store_lib.open_store(
    url,
    create=True,
    expected_meta=store_lib.StoreMeta(
      num_rows=len(dataset.corpus),
      dim=4,
      dtype="float32",
      chunk_rows=64,
      checkpoint="/elsewhere/run",
      step=4,
      corpus_fingerprint=dataset.fingerprint,
    ),
  )
  path = _write(tmp_path / "r2.jsonl", _oracle(dataset), _meta(dataset, step=4, store=url))
  with pytest.raises(
    run.EvaluationInputError, match="store checkpoint '/elsewhere/run' != evaluated checkpoint 'params-sha256:"
  ):
    run.run(config, workdir, results={"s": path}, dataset=dataset, tail_patch=False)


def test_checkpoint_trained_on_another_corpus(evaluated):
  _, workdir, dataset = evaluated
  meta = {"step": 4, "dataset": {"name": dataset.name, "fingerprint": "0" * 64}}
  with pytest.raises(run.EvaluationInputError, match="was trained on corpus 000000000000"):
    run.check_checkpoint(ckpt_meta=meta, dataset=dataset, workdir=workdir)


def test_parse_results_flag():
  assert run.parse_results_flag(["a=/x/a.jsonl", "/y/bm25.jsonl"]) == {"a": "/x/a.jsonl", "bm25": "/y/bm25.jsonl"}
  with pytest.raises(ValueError, match="names 'a' twice"):
    run.parse_results_flag(["a=1", "a=2"])
  with pytest.raises(ValueError, match="at least one"):
    run.parse_results_flag([])


def test_evaluate_compares_two_methods_on_the_relation_split(evaluated, tmp_path):
  config, workdir, dataset = evaluated
  files = _oracle_and_random(dataset, tmp_path)
  prefix = str(tmp_path / "evaluation")
  table = run.run(
    config, workdir, results=files, output_prefix=prefix, dataset=dataset, tail_patch=False,
    compare=[("oracle", "random")],
  )  # fmt: skip
  c = table["comparisons"]["oracle vs random"]
  rows = {r["method"]: r for r in table["rows"]}
  assert c["all"]["n"] == len(dataset.queries) == c["dev"]["n"] + c["test"]["n"]
  assert c["all"]["mrr"]["a"] == rows["oracle"]["mrr"] and c["all"]["mrr"]["b"] == pytest.approx(rows["random"]["mrr"])
  assert c["dev"]["mrr"]["ci"][0] > 0  # the oracle beats random on dev beyond chance: it is kept
  assert "Decided on dev MRR: keep a (oracle)" in open(prefix + ".md").read()
  assert run.parse_compare_flag(["oracle, random"]) == [("oracle", "random")]
  with pytest.raises(ValueError, match="two different results names"):
    run.parse_compare_flag(["oracle"])
  with pytest.raises(ValueError, match=r"compare names \['bm25'\]"):
    run.run(config, workdir, results=files, dataset=dataset, tail_patch=False, compare=[("oracle", "bm25")])
