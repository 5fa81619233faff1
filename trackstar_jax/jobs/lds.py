"""The LDS job: the linear datamodeling score of every ladder method on the trained fact LM.

  report = run(config, workdir)     # <workdir>/lds.json (config.lds.output), lds.md beside it

1. The full-data model and its encodings: the ladder pipeline's train,
   hessian and encode stages for the chosen methods (`jobs.pipeline`; each is
   skipped when its output is up to date).
2. M = `lds.num_models` subset models, model j trained on a random
   `lds.fraction` of the corpus (`evaluation.lds.subset_masks`, seed
   `lds.seed`) with the main run's recipe for `lds.num_steps` steps (-1:
   `train.num_steps`), `lds.models_per_step` of them at a time under one
   `jit(vmap(step))` (`evaluation.datamodels`); each query's target loss under
   each model (`lm_eval.query_losses`). Subsets, seeds and losses go to
   `<prefix>_models.npz` after every group: a restart (or a larger M with the
   same seed) trains only the models it lacks.
3. Per method, the full query x corpus score matrix of the full-data model
   (gradient rungs: the ladder's stores with R^{-1/2} from its Hessians; BM25
   scores; random: iid normal scores), streamed block by block into the
   predicted effects sum_{z in S_j} score(q, z) [Q, M].
4. The LDS per method: the Spearman correlation over the M models between the
   prediction and -loss (a high score means "helps": lowers the loss), mean
   over queries, with bootstrap intervals over queries and over subsets
   (`evaluation.lds`) -> `<prefix>.json`, `<prefix>.md`, per-query values in
   `<prefix>_per_query.npz`. The evaluate job adds the table to its report
   when `<workdir>/lds.json` exists.

Methods: `lds.methods` (names or kinds of `pipeline.ladder`); by default every
rung but the dense baseline (its full score matrix is not implemented).
One process (the subset models are small and independent: spread them over
a host's devices with `models_per_step` a multiple of the device count).
"""

from __future__ import annotations

from collections.abc import Iterator
import functools
import hashlib
import io
import json
import os
import time
from typing import Any
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax import api, checkpointing, fileio, lm_eval, training
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import store as store_lib
from trackstar_jax.evaluation import baselines, datamodels
from trackstar_jax.evaluation import lds as lds_lib
from trackstar_jax.jobs import evaluate as evaluate_job
from trackstar_jax.jobs import pipeline
from trackstar_jax.jobs import workdir as workdir_lib

to_markdown = lds_lib.to_markdown  # the report's table (for launch/lds.py)


def output_path(config, workdir: str) -> str:
  """config.lds.output, or <workdir>/lds.json."""
  return config.lds.output or os.path.join(os.path.abspath(workdir), "lds.json")


def _prefix(config, workdir: str) -> str:
  path = output_path(config, workdir)
  return path[: -len(".json")] if path.endswith(".json") else path


def methods(config) -> list[pipeline.Method]:
  """The ladder methods of `config.lds.methods` (default: all but dense)."""
  _, ladder = pipeline.ladder(config)
  chosen = pipeline.select_methods(ladder, tuple(config.lds.methods)) if config.lds.methods else ladder
  if config.lds.methods and any(m.kind == "dense" for m in chosen):
    raise ValueError(
      "lds.methods asks for the dense baseline, whose full score matrix LDS needs is not implemented; "
      f"choose among {[m.name for m in ladder if m.kind != 'dense']}."
    )
  return [m for m in chosen if m.kind != "dense"]


def num_steps(config) -> int:
  return int(config.train.num_steps) if int(config.lds.num_steps) < 0 else int(config.lds.num_steps)


# ----------------------------------------------------------------------------
# The subset models and their losses.


def _models_key(config, *, dataset, tokenizer_path: str) -> str:
  """What model j's loss depends on (not M or models_per_step: more models extend, never change, the first)."""
  lc = config.lds
  parts = dict(
    dataset=dataset.fingerprint,
    tokenizer=hashlib.sha256(fileio.read_bytes(tokenizer_path)).hexdigest(),
    model=checkpointing.config_to_dict(config.model),
    seq_len=int(config.seq_len),
    train=checkpointing.config_to_dict(config.train),
    steps=num_steps(config),
    fraction=float(lc.fraction),
    seed=int(lc.seed),
    shared_init=bool(lc.shared_init),
  )
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _load_models(path: str, key: str) -> dict[str, np.ndarray]:
  if not fileio.exists(path):
    return {}
  with np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False) as f:
    saved = {k: f[k] for k in f.files}
  if str(saved.get("key")) != key:
    logging.info("lds: %s was made with another config or corpus: training its models again.", path)
    return {}
  return saved


def _save_models(path: str, **arrays) -> None:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  fileio.write_bytes(path, buf.getvalue())


def subset_losses(config, workdir: str, *, rd, masks: np.ndarray, seeds: np.ndarray, init_seeds: np.ndarray):
  """[M, Q] target losses of the M subset models (trained here, or reused from `<prefix>_models.npz`)."""
  lc = config.lds
  m, q = masks.shape[0], len(rd.queries)
  path = _prefix(config, workdir) + "_models.npz"
  key = _models_key(config, dataset=rd.dataset, tokenizer_path=rd.tokenizer_path)
  saved = _load_models(path, key)
  losses = np.full((m, q), np.nan, np.float32)
  done = np.zeros((m,), bool)
  if saved:
    k = min(m, len(saved["done"]))
    losses[:k], done[:k] = saved["losses"][:k], saved["done"][:k]
    logging.info("lds: %d of %d subset models already trained (%s).", int(done.sum()), m, path)
  tc = config.train.copy_and_resolve_references()
  with tc.unlocked():
    tc.num_steps = num_steps(config)  # the schedule spans the models' steps
  optimizer = training.optimizer_for(tc)
  model = workdir_lib.build_model(config, rd.tokenizer)
  init_fn = lambda s: training.init_params(model, seq_len=int(config.seq_len), seed=s)
  g = max(1, int(lc.models_per_step))
  sharding = datamodels.models_sharding(mesh_lib.make_mesh(config.mesh), g)
  todo = np.flatnonzero(~done)
  t0 = time.perf_counter()
  for start in range(0, len(todo), g):
    group = todo[start : start + g]
    pad = np.concatenate([group, np.repeat(group[-1:], g - len(group))])  # one shape: one compilation
    params, metrics = datamodels.train_models(
      apply_fn=model.apply,
      init_fn=init_fn,
      optimizer=optimizer,
      examples=rd.corpus,
      subsets=[np.flatnonzero(masks[j]) for j in pad],
      seeds=seeds[pad],
      init_seeds=init_seeds[pad],
      num_steps=num_steps(config),
      batch_size=int(tc.batch_size),
      sharding=sharding,
      name=f"lds models {group[0]}-{group[-1]} of {m}",
    )
    # Rows per pass x models ~ eval_batch_size: the logits of G models at once stay as large as one model's.
    rows = max(8, int(tc.eval_batch_size) // g)
    group_losses = lm_eval.query_losses(model.apply, params, rd.queries, batch_size=rows, stacked=True)
    losses[group], done[group] = group_losses[: len(group)], True
    logging.info(
      "lds: models %d-%d trained (final train loss %.4f), %d of %d done, %.1fs",
      group[0],
      group[-1],
      float(np.mean(metrics["loss"][: len(group)])),
      int(done.sum()),
      m,
      time.perf_counter() - t0,
    )
    _save_models(path, key=np.asarray(key), losses=losses, done=done, masks=np.packbits(masks, axis=1), seeds=seeds)
  return losses, time.perf_counter() - t0


# ----------------------------------------------------------------------------
# Score matrices of the full-data model, block by block.

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames="normalize")
def _block_scores(e_q, phi, inv, *, normalize: bool):
  """e_q [Q, d] . e_z for a block of raw corpus phi [n, d] -> [Q, n] float32 (as `api.score`)."""
  return jnp.matmul(e_q, hessian_lib.transform(phi, inv, normalize_rows=normalize).T, precision=_HIGHEST)


def _gradient_blocks(config, workdir, method, *, rd, step: int, cache: dict, chunk_rows: int) -> Iterator:
  variants = {v.name: v for v in pipeline.ladder(config)[0]}
  c = pipeline.variant_config(config, workdir, variants[method.variant], hessian=method.hessian, method=method)
  store = store_lib.open_store(c.store.url)
  store.require_complete()
  if store.meta.step != step or store.num_rows != len(rd.corpus):
    raise ValueError(
      f"Store {c.store.url} holds {store.num_rows} rows of step {store.meta.step}; LDS scores the {len(rd.corpus)} "
      f"corpus examples with the checkpoint of step {step}: re-run the pipeline's encode stage."
    )
  if method.variant not in cache:  # the queries' raw phi, shared by the methods of one encoding
    encoder, _ = workdir_lib.load_encoder(c, workdir, rd.tokenizer)
    cache[method.variant] = api.encode(encoder, rd.queries, batch_size=int(config.encoder.batch_size))
  inv = hessian_lib.Hessian.load(c.hessian.path).inv_sqrt if method.hessian else None
  e_q = hessian_lib.transform(cache[method.variant], inv, normalize_rows=method.normalize)
  inv = None if inv is None else jnp.asarray(inv)
  ids = np.asarray(rd.corpus.ids)
  for chunk in store.iter_chunks(rows_per_chunk=chunk_rows):
    if not np.array_equal(chunk.ids, ids[chunk.start : chunk.start + len(chunk.ids)]):
      raise ValueError(f"Store {c.store.url} rows from {chunk.start} are not the corpus in order: re-encode.")
    phi = store.decode(chunk) if store.quantized else chunk.phi  # int8 / int4: codes + scales -> float32 rows
    yield 0, chunk.start, _block_scores(e_q, jnp.asarray(phi), inv, normalize=method.normalize)


def _random_blocks(rd, *, seed: int, chunk: int = 256) -> Iterator:
  """iid N(0, 1) scores; query q's row depends only on (seed, its id)."""
  ids, n = np.asarray(rd.queries.ids), len(rd.corpus)
  for q0 in range(0, len(ids), chunk):
    rows = [
      np.random.default_rng([seed, zlib.crc32(str(int(i)).encode())]).standard_normal(n) for i in ids[q0 : q0 + chunk]
    ]
    yield q0, 0, np.stack(rows).astype(np.float32)


def score_blocks(config, workdir: str, method: pipeline.Method, *, rd, step: int, cache: dict) -> Iterator:
  """(query row, corpus row, scores [q, n]) blocks tiling the method's [Q, N] score matrix."""
  if method.kind == "gradient":
    return _gradient_blocks(
      config, workdir, method, rd=rd, step=step, cache=cache, chunk_rows=int(config.retrieve.chunk_rows)
    )
  if method.kind == "bm25":
    return iter([(0, 0, baselines.bm25_scores(corpus=list(rd.dataset.corpus), queries=rd.query_records))])
  if method.kind == "random":
    return _random_blocks(rd, seed=int(config.lds.seed))
  raise ValueError(f"LDS has no score matrix for method {method.name!r} (kind {method.kind!r}).")


# ----------------------------------------------------------------------------


def run(config, workdir: str, *, dataset=None) -> dict[str, Any]:
  """Trains the subset models, scores every method, writes the LDS report; returns it (the JSON's content).

  Raises:
    ValueError: a bad `lds` field (fraction outside (0, 1), no models), a
      method LDS cannot score, or several processes.
  """
  lc = config.lds
  if jax.process_count() > 1:
    raise ValueError(f"The LDS job runs in one process (found {jax.process_count()}): run it on one host.")
  m = int(lc.num_models)
  if m < 3:
    raise ValueError(f"lds.num_models={m}: a rank correlation over models needs at least 3 (LDS papers use 50+).")
  workdir = os.path.abspath(workdir)
  chosen = methods(config)
  if dataset is None:
    from trackstar_jax import data  # pylint: disable=g-import-not-at-top

    dataset = data.load_dataset(config, data_dir=workdir_lib.data_dir(config, workdir))
  t_start = time.perf_counter()
  pipeline.run(config, workdir, stages=("train", "hessian", "encode"), dataset=dataset, only=[x.name for x in chosen])
  t_pipeline = time.perf_counter() - t_start
  rd = workdir_lib.load_data(config, workdir, dataset=dataset)
  step = workdir_lib.checkpoint_step(config, workdir)
  n = len(rd.corpus)
  masks = lds_lib.subset_masks(num_examples=n, num_subsets=m, fraction=float(lc.fraction), seed=int(lc.seed))
  seeds = lds_lib.model_seeds(num_models=m, seed=int(lc.seed))
  init_seeds = np.full((m,), int(config.train.seed), np.int64) if lc.shared_init else seeds
  losses, t_models = subset_losses(config, workdir, rd=rd, masks=masks, seeds=seeds, init_seeds=init_seeds)
  full_params = checkpointing.restore_params(workdir, step=step)
  model = workdir_lib.build_model(config, rd.tokenizer)
  full_loss = lm_eval.query_losses(model.apply, full_params, rd.queries, batch_size=int(config.train.eval_batch_size))

  prefix = _prefix(config, workdir)
  report: dict[str, Any] = dict(
    dataset=rd.dataset.name,
    fingerprint=rd.dataset.fingerprint,
    step=step,
    num_examples=n,
    num_queries=len(rd.queries),
    num_models=m,
    fraction=float(lc.fraction),
    subset_size=int(masks[0].sum()),
    num_steps=num_steps(config),
    batch_size=int(config.train.batch_size),
    models_per_step=int(lc.models_per_step),
    seed=int(lc.seed),
    shared_init=bool(lc.shared_init),
    model_seeds=seeds.tolist(),
    init_seeds=init_seeds.tolist(),
    subsets=dict(
      rule="subset j = np.random.default_rng([seed, j]).permutation(num_examples)[:subset_size]",
      sha256=hashlib.sha256(np.packbits(masks, axis=1).tobytes()).hexdigest(),
      file=prefix + "_models.npz",
    ),
    mean_query_loss=dict(subset_models=float(np.mean(losses)), full_model=float(np.mean(full_loss))),
    level=0.95,
    bootstrap_samples=int(lc.bootstrap_samples),
    methods={},
    seconds=dict(pipeline=round(t_pipeline, 1), subset_models=round(t_models, 1)),
  )
  per_query, cache = {}, {}
  for method in chosen:
    t = time.perf_counter()
    blocks = score_blocks(config, workdir, method, rd=rd, step=step, cache=cache)
    pred = lds_lib.accumulate_effects(blocks, masks, num_queries=len(rd.queries))
    res = lds_lib.summarize(
      predictions=pred, losses=losses, bootstrap_samples=int(lc.bootstrap_samples), seed=int(lc.seed)
    )
    per_query[method.name] = res.pop("per_query")
    report["methods"][method.name] = dict(kind=method.kind, **res, seconds=round(time.perf_counter() - t, 2))
    logging.info("lds: %s: LDS %.4f over %d queries", method.name, res["lds"], res["n_queries"])
  report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
  fileio.write_text(prefix + ".json", json.dumps(_clean(report), indent=2))
  fileio.write_text(prefix + ".md", lds_lib.to_markdown(report))
  buf = io.BytesIO()
  np.savez(buf, query_ids=np.asarray(rd.queries.ids), **{evaluate_job.file_slug(k): v for k, v in per_query.items()})
  fileio.write_bytes(prefix + "_per_query.npz", buf.getvalue())
  logging.info("lds: wrote %s.{json,md}", prefix)
  return report


def _clean(x):
  """JSON-safe: NaN -> None."""
  if isinstance(x, float) and x != x:
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x
