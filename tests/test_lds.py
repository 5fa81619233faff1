"""LDS: the rank / Spearman / datamodel math against brute force, vmapped subset training against separate runs,
and the job end to end on the tiny synthetic world (M = 8 models)."""

import copy
import json
import math
import os

import jax
import numpy as np
import pytest

from trackstar_jax import lm_eval, training
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.evaluation import ablation, baselines, datamodels
from trackstar_jax.evaluation import lds as lds_lib


def _brute_ranks(x):
  """rank_i = 1 + #{x_j < x_i} + (#{x_j == x_i} - 1) / 2, straight from the definition."""
  x = np.asarray(x)
  return np.asarray([1 + np.sum(x < v) + (np.sum(x == v) - 1) / 2 for v in x], np.float64)


def _brute_spearman(a, b):
  ra, rb = _brute_ranks(a), _brute_ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  den = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
  return float(np.sum(ra * rb) / den) if den else math.nan


def test_rankdata_averages_ties_like_the_definition_on_every_axis():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, size=(6, 9)).astype(np.float32)  # many ties
  for axis in (0, 1, -1):
    want = np.apply_along_axis(_brute_ranks, axis, x)
    np.testing.assert_array_equal(lds_lib.rankdata(x, axis=axis), want)
  np.testing.assert_array_equal(lds_lib.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_spearman_matches_brute_force_and_scipy():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(20, 12))
  b = a + rng.normal(size=(20, 12))
  a[:5] = np.round(a[:5])  # ties on one side
  b[3:8] = np.round(b[3:8] * 2)  # and on the other
  got = lds_lib.spearman(a, b)
  want = [_brute_spearman(x, y) for x, y in zip(a, b)]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(lds_lib.spearman(a.T, b.T, axis=0), want, rtol=1e-12, atol=1e-12)
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  np.testing.assert_allclose(got, [stats.spearmanr(x, y).statistic for x, y in zip(a, b)], rtol=1e-12, atol=1e-12)


def test_spearman_of_a_constant_is_undefined():
  out = lds_lib.spearman([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
  assert math.isnan(out[0]) and out[1] == pytest.approx(-1.0)


def test_resampled_lds_equals_the_lds_of_repeated_columns():
  rng = np.random.default_rng(2)
  pred, losses = rng.normal(size=(15, 10)), rng.normal(size=(10, 15))
  pred[:4] = np.round(pred[:4])  # ties inside the data, besides the repeats
  cols = rng.integers(0, 10, size=(6, 10))
  counts = np.stack([np.bincount(c, minlength=10) for c in cols])
  want = np.stack([lds_lib.lds_per_query(pred[:, c], losses[c]) for c in cols])
  np.testing.assert_allclose(lds_lib.resampled_lds(pred, losses, counts), want, rtol=1e-10, atol=1e-10)


def test_predicted_effects_sum_the_scores_of_each_subset_in_any_blocks():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(7, 30))
  masks = lds_lib.subset_masks(num_examples=30, num_subsets=5, fraction=0.5, seed=4)
  want = np.asarray([[sum(scores[q, z] for z in range(30) if masks[j, z]) for j in range(5)] for q in range(7)])
  np.testing.assert_allclose(lds_lib.predicted_effects(scores, masks), want, rtol=1e-12)
  blocks = [(q0, z0, scores[q0 : q0 + 3, z0 : z0 + 8]) for q0 in (3, 0, 6) for z0 in (24, 0, 16, 8)]
  np.testing.assert_allclose(lds_lib.accumulate_effects(blocks, masks, num_queries=7), want, rtol=1e-12)


def test_subsets_have_the_fraction_and_depend_only_on_seed_and_index():
  m16 = lds_lib.subset_masks(num_examples=101, num_subsets=16, fraction=0.5, seed=7)
  assert m16.shape == (16, 101) and (m16.sum(axis=1) == 50).all()
  np.testing.assert_array_equal(lds_lib.subset_masks(num_examples=101, num_subsets=8, fraction=0.5, seed=7), m16[:8])
  assert len({row.tobytes() for row in m16}) == 16
  assert not np.array_equal(lds_lib.subset_masks(num_examples=101, num_subsets=1, fraction=0.5, seed=8)[0], m16[0])
  seeds = lds_lib.model_seeds(num_models=16, seed=7)
  assert len(set(seeds.tolist())) == 16
  np.testing.assert_array_equal(lds_lib.model_seeds(num_models=4, seed=7), seeds[:4])
  for bad in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match="fraction"):
      lds_lib.subset_masks(num_examples=10, num_subsets=2, fraction=bad, seed=0)


def test_lds_is_positive_when_high_scores_lower_the_loss():
  """The sign convention: a method whose high-scoring examples lower the loss gets LDS +1, the reverse -1."""
  rng = np.random.default_rng(5)
  scores = rng.normal(size=(12, 40))
  masks = lds_lib.subset_masks(num_examples=40, num_subsets=20, fraction=0.5, seed=0)
  pred = lds_lib.predicted_effects(scores, masks)  # [Q, M]
  helps = lds_lib.summarize(predictions=pred, losses=5.0 - pred.T, bootstrap_samples=50, seed=0)
  hurts = lds_lib.summarize(predictions=pred, losses=5.0 + pred.T, bootstrap_samples=50, seed=0)
  assert helps["lds"] == pytest.approx(1.0) and hurts["lds"] == pytest.approx(-1.0)
  noisy = lds_lib.summarize(
    predictions=pred, losses=-pred.T + 3 * rng.normal(size=pred.T.shape), bootstrap_samples=200, seed=0
  )
  assert 0.1 < noisy["lds"] < 0.95
  lo, hi = noisy["interval_queries"]
  assert lo < noisy["lds"] < hi and hi - lo < 0.5
  lo, hi = noisy["interval_subsets"]
  assert lo < noisy["lds"] < hi
  assert noisy["n_queries"] == 12 and noisy["n_undefined"] == 0 and noisy["num_models"] == 20


def test_random_scores_have_lds_near_zero_and_undefined_queries_are_counted():
  rng = np.random.default_rng(6)
  m, q = 16, 400
  pred, losses = rng.normal(size=(q, m)), rng.normal(size=(m, q))
  pred[0] = 0.0  # a query no example scores: undefined
  res = lds_lib.summarize(predictions=pred, losses=losses, bootstrap_samples=300, seed=1)
  assert res["n_undefined"] == 1 and res["n_queries"] == q - 1 and math.isnan(res["per_query"][0])
  sd = 1 / math.sqrt((m - 1) * (q - 1))  # the null standard deviation of a mean of q Spearmans over m points
  assert abs(res["lds"]) < 4 * sd
  lo, hi = res["interval_queries"]
  assert lo < res["lds"] < hi and 2 * sd < hi - lo < 8 * sd  # about +-1.96 sd


def test_bm25_scores_are_the_scores_bm25_retrieve_ranks_by():
  corpus = [dict(sentence_id=10 + i, text=t) for i, t in enumerate(["Paris is in France", "cats sit", "France: Lyon"])]
  queries = [dict(query_id=0, prompt="Paris is in", target=" France"), dict(query_id=1, prompt="zzz", target=" qq")]
  s = baselines.bm25_scores(corpus=corpus, queries=queries)
  assert s.shape == (2, 3) and (s[1] == 0).all() and s[0, 0] > s[0, 2] > 0 == s[0, 1]
  top = baselines.bm25_retrieve(corpus=corpus, queries=queries[:1], k=3)[0]
  np.testing.assert_allclose(top["proponent_scores"], s[0, np.asarray(top["proponent_ids"]) - 10], rtol=1e-6)


# ----------------------------------------------------------------------------
# Training several models at once.


def test_vmapped_models_equal_separately_trained_ones(trained):
  """jit(vmap(step)) over 2 models, one per device, == each trained alone by the train job's step (params, losses)."""
  from trackstar_jax.jobs import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = trained.config
  rd = workdir_lib.load_data(config, trained.workdir)
  model = workdir_lib.build_model(config, rd.tokenizer)
  optimizer = training.optimizer_for(config.train)
  init_fn = lambda s: training.init_params(model, seq_len=config.seq_len, seed=s)
  subsets = [np.arange(0, 40), np.arange(30, 90)]
  seeds, init_seeds, steps, bs = [3, 4], [5, 6], 3, 8
  sharding = datamodels.models_sharding(mesh_lib.make_mesh((("data", 2),), devices=jax.devices()[:2]), 2)
  assert sharding is not None  # one model per device
  params, metrics = datamodels.train_models(
    apply_fn=model.apply,
    init_fn=init_fn,
    optimizer=optimizer,
    examples=rd.corpus,
    subsets=subsets,
    seeds=seeds,
    init_seeds=init_seeds,
    num_steps=steps,
    batch_size=bs,
    sharding=sharding,
  )
  assert jax.tree.leaves(params)[0].sharding == sharding
  stacked = lm_eval.query_losses(model.apply, params, rd.queries, batch_size=32, stacked=True)
  assert stacked.shape == (2, len(rd.queries)) and metrics["loss"].shape == (2,)
  mesh = mesh_lib.make_mesh((("data", 1),), devices=jax.devices()[:1])
  step = training.make_train_step(model.apply, optimizer, mesh)
  for g in range(2):
    p = init_fn(init_seeds[g])
    o = training.init_opt_state(optimizer, p)
    batches = training.train_batches(rd.corpus.select(subsets[g]), batch_size=bs, seed=seeds[g], start_step=0)
    for _ in range(steps):
      p, o, _ = step(p, o, mesh_lib.shard_batch({k: v for k, v in next(batches).items() if k != "ids"}, mesh))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[g], b, rtol=2e-4, atol=2e-6), params, p)
    alone = lm_eval.query_losses(model.apply, p, rd.queries, batch_size=32)
    np.testing.assert_allclose(stacked[g], alone, rtol=1e-4)
  assert not np.allclose(stacked[0], stacked[1])  # different subsets, seeds and inits: different models


# ----------------------------------------------------------------------------
# The job.

METHODS = ("gradient dot product", "+ unit norm (cosine)", "bm25", "random")


def _lds_config(trained, **lds_fields):
  config = copy.deepcopy(trained.config)
  with config.unlocked():
    config.lds.methods = METHODS
    config.lds.num_steps = 16  # > the 4 steps of the shared workdir: models that learned something
    for k, v in lds_fields.items():
      config.lds[k] = v
  return config


def test_lds_job_end_to_end(trained, monkeypatch):
  from trackstar_jax import results as results_lib  # pylint: disable=g-import-not-at-top
  from trackstar_jax.jobs import evaluate as evaluate_job  # pylint: disable=g-import-not-at-top
  from trackstar_jax.jobs import lds  # pylint: disable=g-import-not-at-top

  config = _lds_config(trained)
  assert config.lds.num_models == 8 and config.lds.models_per_step == 4  # runlocal: two groups under vmap
  report = lds.run(config, trained.workdir)
  w = trained.workdir
  saved = json.load(open(os.path.join(w, "lds.json")))
  assert set(saved["methods"]) == {"gradient dot product", "+ unit norm (cosine)", "BM25", "random"}
  assert saved["num_models"] == 8 and saved["fraction"] == 0.5 and saved["num_steps"] == 16
  assert len(saved["model_seeds"]) == 8 and saved["subset_size"] == round(saved["num_examples"] / 2)
  models = np.load(os.path.join(w, "lds_models.npz"))
  assert models["done"].all() and np.isfinite(models["losses"]).all() and models["losses"].shape[0] == 8
  masks = np.unpackbits(models["masks"], axis=1)[:, : saved["num_examples"]].astype(bool)
  np.testing.assert_array_equal(
    masks, lds_lib.subset_masks(num_examples=saved["num_examples"], num_subsets=8, fraction=0.5, seed=0)
  )
  per_query = np.load(os.path.join(w, "lds_per_query.npz"))
  assert per_query["random"].shape == (saved["num_queries"],)

  rand, cos = report["methods"]["random"], report["methods"]["+ unit norm (cosine)"]
  # Random scores: each query's Spearman over 8 models has null sd 1/sqrt(7), so their mean over the
  # queries has sd 1/sqrt(7 Q); 4 sd is a bound random stays inside with probability 1 - 6e-5.
  assert abs(rand["lds"]) < 4 / math.sqrt(7 * rand["n_queries"]), rand
  assert cos["lds"] > rand["lds"] and cos["interval_queries"][0] > 0, (cos, rand)
  for m in report["methods"].values():
    lo, hi = m["interval_queries"]
    assert lo <= m["lds"] <= hi and m["n_queries"] > 0.9 * saved["num_queries"]
  table = lds.to_markdown(report)
  assert "| + unit norm (cosine) |" in table and "8 models" in table
  assert open(os.path.join(w, "lds.md")).read() == table

  # Rerun: the trained models are reused (training them again would fail here).
  monkeypatch.setattr(datamodels, "train_models", lambda **kw: pytest.fail("retrained a finished model"))
  again = lds.run(config, w)
  assert again["methods"]["random"]["lds"] == rand["lds"]

  # The evaluate job's report carries the LDS table.
  rd_queries = [dict(q) for q in _dataset(config, w).queries]
  corpus = list(_dataset(config, w).corpus)
  path = os.path.join(w, "random.jsonl")
  results_lib.write_results(
    path,
    baselines.random_retrieve(corpus=corpus, queries=rd_queries, k=3),
    metadata=dict(
      dataset=_dataset(config, w).name, fingerprint=_dataset(config, w).fingerprint, num_examples=len(corpus), k=3
    ),
  )
  table = evaluate_job.run(config, w, results={"random": path}, tail_patch=False)
  assert table["lds"]["methods"]["random"]["lds"] == pytest.approx(rand["lds"])
  md = open(os.path.join(w, "evaluation.md")).read()
  assert "LDS: 8 models" in md and "| + unit norm (cosine) |" in md
  assert "LDS: 8 models" in ablation.report_markdown(table)


def _dataset(config, workdir):
  from trackstar_jax import data  # pylint: disable=g-import-not-at-top
  from trackstar_jax.jobs import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  return data.load_dataset(config, data_dir=workdir_lib.data_dir(config, workdir))


def test_lds_job_refuses_bad_settings_before_training(trained):
  from trackstar_jax.jobs import lds  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="dense"):
    lds.run(_lds_config(trained, methods=("dense",)), trained.workdir)
  with pytest.raises(ValueError, match="at least 3"):
    lds.run(_lds_config(trained, num_models=2), trained.workdir)
  with pytest.raises(ValueError, match="match no ladder method"):
    lds.run(_lds_config(trained, methods=("cosinus",)), trained.workdir)


@pytest.mark.slow
def test_lds_job_every_method_runlocal(tmp_path):
  """The whole ladder, runlocal config as shipped (20-step full model; ~8 min on 2 loaded cores)."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from trackstar_jax.jobs import lds  # pylint: disable=g-import-not-at-top

  report = lds.run(synthetic.get_config("runlocal=True"), str(tmp_path / "w"))
  names = [m.name for m in lds.methods(synthetic.get_config("runlocal=True"))]
  assert list(report["methods"]) == names and len(names) == 9
  rand = report["methods"]["random"]
  assert abs(rand["lds"]) < 4 / math.sqrt(7 * rand["n_queries"])
  assert report["methods"]["+ unit norm (cosine)"]["lds"] > rand["lds"]
