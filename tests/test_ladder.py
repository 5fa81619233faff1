"""The ladder's method filter and its text baselines, which need no checkpoint.

A text baseline (BM25 / dense / random) depends on the corpus and queries
alone, so its results can be made on one machine (say, one with the dense
model's packages) and reused by the full run on another: the stage stamp keys
on the corpus, not on the workdir or a checkpoint.
"""

import os
import shutil

import pytest

from configs import synthetic
from trackstar_jax import data
from trackstar_jax import results as results_lib
from trackstar_jax.jobs import pipeline as ladder
from trackstar_jax.jobs import workdir as workdir_lib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = synthetic.get_config("runlocal=True")
  workdir = str(tmp_path_factory.mktemp("ladder") / "w")
  dataset = data.load_dataset(config, data_dir=workdir_lib.data_dir(config, workdir))
  return config, workdir, dataset


def test_select_methods_by_name_and_kind(setup):
  config = setup[0]
  _, methods = ladder.ladder(config)
  assert ladder.select_methods(methods, []) == methods
  assert [m.kind for m in ladder.select_methods(methods, ["bm25", "random"])] == ["bm25", "random"]
  grad = ladder.select_methods(methods, ["gradient"])
  assert len(grad) >= 5 and all(m.kind == "gradient" for m in grad)
  assert [m.name for m in ladder.select_methods(methods, ["BM25", "+ R_train"])] == ["+ R_train", "BM25"]
  with pytest.raises(ValueError, match=r"bm26.*match no ladder method"):
    ladder.select_methods(methods, ["bm26"])
  # A name with a comma is one method; anything else is a comma-separated list (absl's multi-string flag).
  pair = ladder.select_methods(methods, ["+ R_mixed = TrackStar", "TrackStar, Adam rank-1"])
  assert [m.variant for m in pair] == ["adam", "adam_rank1"]
  assert ladder.comparisons(pair) == [("+ R_mixed = TrackStar", "TrackStar, Adam rank-1")]
  assert [m.kind for m in ladder.select_methods(methods, ["bm25,random"])] == ["bm25", "random"]
  assert ladder.comparisons(ladder.select_methods(methods, ["bm25"])) == []


def test_a_rank1_ladder_keeps_exact_adam_beside_it(setup):
  config = setup[0].copy_and_resolve_references()
  config.encoder.correction = "adam_rank1"
  variants, methods = ladder.ladder(config)
  assert {v.correction for v in variants} == {"none", "adam_rank1", "adam"}
  assert ladder.comparisons(methods) == [("TrackStar, exact Adam", "+ R_mixed = TrackStar")]


def test_baselines_run_without_a_checkpoint_and_are_reused_elsewhere(setup, tmp_path):
  config, workdir, dataset = setup
  ladder.run(config, workdir, stages=("retrieve",), dataset=dataset, only=("bm25", "random"))
  files = {
    m: ladder.results_file(workdir, m) for m in ladder.select_methods(ladder.ladder(config)[1], ["bm25", "random"])
  }
  for path in files.values():
    assert results_lib.validate_results_file(path) == len(dataset.queries)
  mtimes = {m.name: os.path.getmtime(p) for m, p in files.items()}

  # The results folder copied into another workdir is current there: nothing is recomputed.
  other = str(tmp_path / "other")
  shutil.copytree(os.path.join(workdir, "ladder", "results"), os.path.join(other, "ladder", "results"))
  ladder.run(config, other, stages=("retrieve",), dataset=dataset, only=("bm25", "random"))
  for m in files:
    assert os.path.getmtime(ladder.results_file(other, m)) == mtimes[m.name]

  # Another k is another result: recomputed.
  with config.unlocked():
    config.retrieve.k = 3
  ladder.run(config, other, stages=("retrieve",), dataset=dataset, only=("random",))
  path = ladder.results_file(other, ladder.select_methods(ladder.ladder(config)[1], ["random"])[0])
  assert os.path.getmtime(path) != mtimes["random"]
  assert len(results_lib.read_results(path)[0]["proponent_ids"]) == 3


def test_gradient_methods_still_need_the_checkpoint(setup, tmp_path):
  config, _, dataset = setup
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    ladder.run(config, str(tmp_path / "empty"), stages=("retrieve",), dataset=dataset, only=("gradient",))


def test_precomputed_dense_results_are_used_without_its_packages(setup, tmp_path, monkeypatch):
  """A dense results folder made elsewhere is evaluated even where sentence-transformers is missing."""
  config, _, dataset = setup
  (dense,) = ladder.select_methods(ladder.ladder(config)[1], ["dense"])
  fake = ladder.baselines.random_retrieve(corpus=list(dataset.corpus), queries=list(dataset.queries), k=10)
  monkeypatch.setattr(ladder.baselines, "dense_retrieve", lambda **kw: fake)
  monkeypatch.setattr(ladder.baselines, "dense_available", lambda: True)
  made = str(tmp_path / "made")
  ladder.run(config, made, stages=("retrieve",), dataset=dataset, only=("dense",))

  monkeypatch.setattr(ladder.baselines, "dense_available", lambda: False)
  monkeypatch.setattr(ladder.baselines, "dense_retrieve", lambda **kw: pytest.fail("recomputed"))
  other = str(tmp_path / "other")
  assert not os.path.exists(ladder.results_file(other, dense))
  ladder.run(config, other, stages=("retrieve",), dataset=dataset, only=("dense",))
  assert not os.path.exists(ladder.results_file(other, dense))  # no results, no packages: skipped
  shutil.copytree(os.path.join(made, "ladder", "results"), os.path.join(other, "ladder", "results"), dirs_exist_ok=True)
  ladder.run(config, other, stages=("retrieve",), dataset=dataset, only=("dense",))
  assert results_lib.validate_results_file(ladder.results_file(other, dense)) == len(dataset.queries)
