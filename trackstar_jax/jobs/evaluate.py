"""The evaluate job: fact-tracing metrics and tail-patch of named results files.

  table = run(config, workdir, results={"trackstar": "w/results.jsonl",
                                                 "bm25": "w/bm25.jsonl"})

For the checkpoint of `workdir` (step `config.encoder.step`, -1 = latest) and
the dataset of `config`, it

  1. checks every results file against the dataset (corpus fingerprint,
     dataset name, proponent ids inside the corpus, every query has ground
     truth) and against the checkpoint (the results' step and, when the
     results name their encoding store, the store's checkpoint/step/corpus),
  2. computes which queries the model answers correctly
     (`lm_eval.query_accuracy`),
  3. computes MRR / recall@10 / precision@10 overall, by relation, by fact
     frequency and for model-correct / -incorrect queries
     (`metrics.compute_metrics`),
  4. tail-patches each method's top-k proponents on the queries of
     `config.evaluate.subset` with the checkpoint's params and restored
     optimizer state and `optim.make_optimizer(config.train,
     learning_rate=optim.final_learning_rate(config.train))`,
  5. compares named pairs of methods query by query on the dev / test split
     of relations (`relation_split.paired_comparison`, on the same query
     subset as the table): how a cheaper variant is chosen on dev and
     reported on test,
  6. writes `<prefix>.json` (everything) and `<prefix>.md` (the table plus
     MRR by frequency / relation / correctness), prefix default
     `<workdir>/evaluation`.

The markdown report is `evaluation.ablation.report_markdown`. Tail-patch scores are cached per method in `<prefix>_cache/` keyed by the
results file's content and the checkpoint step, so a rerun (e.g. the ladder
pipeline adding one method) only patches what changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import hashlib
import json
import math
import os

from absl import logging
import jax
import numpy as np

from trackstar_jax import checkpointing, fileio, lm_eval, optim
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import results as results_lib
from trackstar_jax import sharding as sharding_lib
from trackstar_jax import store as store_lib
from trackstar_jax.evaluation import ablation, relation_split
from trackstar_jax.evaluation import metrics as metrics_lib
from trackstar_jax.jobs import own_model
from trackstar_jax.jobs import workdir as workdir_lib

TAIL_PATCH_KS = (1, 10)


class EvaluationInputError(ValueError):
  """A results file, the dataset and the checkpoint do not belong together."""


def parse_results_flag(values: Sequence[str]) -> dict[str, str]:
  """["name=path", "path2", ...] -> {name: path} (a bare path is named by its file stem)."""
  out = {}
  for v in values:
    name, sep, path = v.partition("=")
    if not sep:
      name, path = os.path.splitext(os.path.basename(v))[0], v
    if not name or not path:
      raise ValueError(f"--results entry {v!r} must be name=path or a path.")
    if name in out:
      raise ValueError(f"--results names {name!r} twice.")
    out[name] = path
  if not out:
    raise ValueError("--results is empty: give at least one results file (name=path).")
  return out


def parse_compare_flag(values: Sequence[str]) -> list[tuple[str, str]]:
  """["a,b", ...] -> [("a", "b"), ...]: the --compare pairs of launch/evaluate.py."""
  pairs = []
  for v in values:
    parts = [p.strip() for p in v.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
      raise ValueError(f"--compare={v!r}: expected two different results names as A,B (e.g. exact,rank1).")
    pairs.append((parts[0], parts[1]))
  return pairs


def check_checkpoint(*, ckpt_meta: Mapping, dataset, workdir: str) -> None:
  """The checkpoint was trained on this dataset's corpus."""
  fp = ckpt_meta.get("dataset", {}).get("fingerprint", "")
  if fp and fp != dataset.fingerprint:
    raise EvaluationInputError(
      f"Checkpoint in {workdir!r} (step {ckpt_meta.get('step')}) was trained on corpus {fp[:12]}..., "
      f"but --config gives dataset {dataset.name!r} with corpus {dataset.fingerprint[:12]}...: "
      "pass the config the model was trained with (or its --workdir)."
    )


def check_provenance(*, name: str, path: str, meta: Mapping, workdir: str, step: int, dataset, checkpoint: str) -> None:
  """The results were retrieved with this checkpoint (directly or via their store).

  `checkpoint` is the evaluated checkpoint's `checkpointing.params_fingerprint`:
  stores record the checkpoint by content, so a moved or copied workdir passes.
  """
  rstep = meta.get("step")
  if rstep is not None and int(rstep) != step:
    raise EvaluationInputError(
      f"Results {name!r} ({path}) were retrieved with checkpoint step {rstep}, but the evaluated "
      f"checkpoint is step {step} of {workdir!r}: set --config.encoder.step={rstep} or re-run retrieve."
    )
  url = meta.get("store")
  if not url:
    return
  try:
    store = store_lib.open_store(url)
  except FileNotFoundError:
    logging.warning("Results %r name store %s, which no longer exists: provenance not checked.", name, url)
    return
  sm = store.meta
  problems = []
  if sm.checkpoint and sm.checkpoint != checkpoint:
    problems.append(
      f"store checkpoint {sm.checkpoint!r} != evaluated checkpoint {checkpoint!r} (step {step} of "
      f"{os.path.abspath(workdir)!r})"
    )
  if sm.step != step:
    problems.append(f"store step {sm.step} != evaluated step {step}")
  if sm.corpus_fingerprint and sm.corpus_fingerprint != dataset.fingerprint:
    problems.append(f"store corpus {sm.corpus_fingerprint[:12]}... != dataset corpus {dataset.fingerprint[:12]}...")
  if problems:
    raise EvaluationInputError(
      f"Results {name!r} ({path}) come from encoding store {url}, which does not match the evaluated "
      "checkpoint: " + "; ".join(problems) + ". Evaluate with the --workdir/--config.encoder.step that "
      "produced the store, or re-run encode and retrieve for this checkpoint."
    )


def load_checked(
  results: Mapping[str, str], *, dataset, workdir: str, step: int, checkpoint: str
) -> dict[str, list[dict]]:
  """name -> records, after every check (cheap; done before any tail-patching)."""
  out = {}
  queries = list(dataset.queries)
  for name, path in results.items():
    records, meta = results_lib.load_results(path)
    if not records:
      raise EvaluationInputError(f"Results {name!r} ({path}) have no records.")
    try:
      metrics_lib.check_results(
        records,
        metadata=meta,
        num_examples=len(dataset.corpus),
        fingerprint=dataset.fingerprint,
        dataset_name=dataset.name,
        source=path,
      )
      metrics_lib.match_queries(records, queries, path)
    except ValueError as e:
      raise EvaluationInputError(f"Results {name!r}: {e}") from e
    check_provenance(
      name=name, path=path, meta=meta, workdir=workdir, step=step, dataset=dataset, checkpoint=checkpoint
    )
    out[name] = records
  return out


def _sha256(path: str) -> str:
  return hashlib.sha256(fileio.read_bytes(path)).hexdigest()


def _cache_key(path: str, *, step: int, k: int, subset_ids: Sequence[int], config) -> str:
  parts = dict(
    results=_sha256(path),
    step=step,
    k=k,
    queries=sorted(int(i) for i in subset_ids),
    train=checkpointing.config_to_dict(config.train),
  )
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def file_slug(name: str) -> str:
  """A method name as a file name: 'TrackStar, d=64/block' -> 'TrackStar_d_64_block'."""
  out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
  while "__" in out:
    out = out.replace("__", "_")
  return out.strip("_") or "method"


def _comparisons(compare, records, queries, *, correct, want, config) -> dict:
  """{"a vs b": paired_comparison + names} on the table's query subset."""
  dev, _ = relation_split.relation_split(
    [q["relation"] for q in queries],
    dev_fraction=float(config.accuracy.dev_fraction),
    seed=int(config.accuracy.split_seed),
  )
  rows = {}
  for name in {n for pair in compare for n in pair}:
    all_rows = metrics_lib.query_rows(records[name], queries, model_correct=correct, source=name)
    rows[name] = [r for r in all_rows if want(bool(r["correct"]))]
  out = {}
  for a, b in compare:
    out[f"{a} vs {b}"] = dict(
      a=a, b=b, **relation_split.paired_comparison(rows[a], rows[b], dev=dev, seed=int(config.evaluate.seed))
    )
    if out[f"{a} vs {b}"]["dev"]["n"]:
      keep = relation_split.keep_costlier(out[f"{a} vs {b}"])
      logging.info("evaluate: %s vs %s, decided on dev MRR: %s", a, b, a if keep else b)
  return out


def run(
  config,
  workdir: str,
  *,
  results: Mapping[str, str],
  output_prefix: str | None = None,
  dataset=None,
  skipped: Mapping[str, str] | None = None,
  tail_patch: bool = True,
  compare: Sequence[tuple[str, str]] = (),
) -> dict:
  """Metrics + tail-patch of every results file; writes `<prefix>.json/.md`.

  Args:
    config: the experiment config (dataset, train, encoder.step, evaluate).
    workdir: the training workdir (checkpoint with optimizer state, tokenizer).
    results: method name -> results JSONL path, in table row order.
    output_prefix: where to write (default `<workdir>/evaluation`).
    dataset: optional preloaded `FactDataset`.
    skipped: method name -> reason, rows added to the table as skipped
      (e.g. the dense baseline without its optional packages).
    tail_patch: False skips tail-patching (metrics only).
    compare: (a, b) pairs of method names to compare on the relation split
      (`config.accuracy`'s dev fraction and seed), a the costlier method.

  Returns:
    The table dict (`ablation.ablation_table` + `model_accuracy`,
    `tail_patch`, `skipped`, `step`).
  """
  from trackstar_jax.evaluation import tail_patch as tail_patch_lib  # pylint: disable=g-import-not-at-top

  if workdir_lib.uses_own_model(config) or own_model.is_own_data(config):
    raise ValueError(
      "launch/evaluate.py (model accuracy, tail-patch) runs on this project's training workdirs only, not yet on "
      "your own model or corpus (configs/own_model.py). results.jsonl already marks each proponent "
      "(proponent_correct) when queries.gold_field is set."
    )
  ec = config.evaluate
  unknown = sorted({n for pair in compare for n in pair} - set(results))
  if unknown:
    raise ValueError(f"evaluate: compare names {unknown}, which are not among the results {sorted(results)}.")
  workdir = os.path.abspath(workdir)
  prefix = output_prefix or os.path.join(workdir, "evaluation")
  rd = workdir_lib.load_data(config, workdir, dataset=dataset)
  dataset, corpus_ex, query_ex = rd.dataset, rd.corpus, rd.queries
  step = workdir_lib.checkpoint_step(config, workdir)
  check_checkpoint(ckpt_meta=checkpointing.load_meta(workdir, step=step), dataset=dataset, workdir=workdir)
  # Params and optimizer state on one device (no redundant SPMD copies); the optimizer at the final rate.
  # A model-sharded config (config.sharding) keeps its placement on config.mesh instead.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  mesh = mesh_lib.make_mesh(config.mesh) if sharding_lib.is_sharded(config) else None
  lm = workdir_lib.load_run(workdir, step=step, config=config, data=False, sharding=device, mesh=mesh)
  records = load_checked(
    results, dataset=dataset, workdir=workdir, step=step, checkpoint=checkpointing.params_fingerprint(lm.params)
  )
  queries = list(dataset.queries)
  optimizer = optim.make_optimizer(config.train, learning_rate=optim.final_learning_rate(config.train))
  acc = lm_eval.query_accuracy(
    lm.model.apply,
    lm.params,
    query_ex,
    batch_size=int(config.train.eval_batch_size),
    frequencies=np.asarray([int(q["frequency"]) for q in queries]),
  )
  correct = {int(i): bool(c) for i, c in zip(acc["ids"], acc["correct"])}
  logging.info(
    "evaluate: step %d, model answers %d of %d queries correctly (%.3f)",
    step,
    sum(correct.values()),
    len(correct),
    acc["accuracy"],
  )

  subset = str(ec.subset)
  k = int(ec.tail_patch_k)
  want = {"overall": lambda c: True, "model_correct": lambda c: c, "model_incorrect": lambda c: not c}[subset]
  tp = {}
  if tail_patch:
    for name, path in results.items():
      recs = [r for r in records[name] if want(correct[int(r["example_id"])])]
      if not recs:
        logging.warning("evaluate: no %s queries for %r: no tail-patch.", subset, name)
        continue
      key = _cache_key(path, step=step, k=k, subset_ids=[r["example_id"] for r in recs], config=config)
      cache = os.path.join(prefix + "_cache", f"{file_slug(name)}.tail_patch.json")
      if fileio.exists(cache):
        cached = fileio.read_json(cache)
        if cached.get("key") == key:
          tp[name] = cached["summary"]
          logging.info("evaluate: tail-patch %r from cache.", name)
          continue
      logging.info("evaluate: tail-patching %r: %d queries x top-%d proponents.", name, len(recs), k)
      scores = tail_patch_lib.tail_patch(
        apply_fn=lm.model.apply,
        params=lm.params,
        opt_state=lm.opt_state,
        optimizer=optimizer,
        query_examples=query_ex,
        corpus_examples=corpus_ex,
        results=recs,
        k=k,
        query_chunk=int(ec.query_chunk),
      )
      tp[name] = tail_patch_lib.summarize(scores, ks=tuple(x for x in TAIL_PATCH_KS if x <= k))
      fileio.write_json(cache, dict(key=key, summary=tp[name]))

  table = ablation.ablation_table(
    methods=records,
    queries=queries,
    tail_patch=tp,
    subset=subset,
    model_correct=correct,
    num_examples=len(dataset.corpus),
    fingerprint=dataset.fingerprint,
    dataset_name=dataset.name,
  )
  for name, reason in (skipped or {}).items():
    row = {"method": name, "n": 0, **dict.fromkeys(table["columns"], math.nan), "skipped": reason}
    table["rows"].append(row)
  table.update(
    step=step,
    dataset=dataset.name,
    skipped=dict(skipped or {}),
    tail_patch=tp,
    results={n: fileio.absolute(p) for n, p in results.items()},
    model_accuracy={
      "accuracy": acc["accuracy"],
      "n": acc["n"],
      "n_correct": int(sum(correct.values())),
      "by_frequency": acc.get("by_frequency", {}),
    },
    model_correct_by_query={str(q): c for q, c in correct.items()},  # for the HTML report's filter
  )
  if compare:
    table["comparisons"] = _comparisons(compare, records, queries, correct=correct, want=want, config=config)
  lds_file = config.get("lds", {}).get("output") or os.path.join(workdir, "lds.json")
  if fileio.exists(lds_file):  # the LDS job's report (launch/lds.py): its table joins this one
    table["lds"] = fileio.read_json(lds_file)
  ablation.write_table(table, prefix)
  logging.info("evaluate: wrote %s.{md,json}", prefix)
  return table
