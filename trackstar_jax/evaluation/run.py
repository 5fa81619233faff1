"""The evaluate job: fact-tracing metrics and tail-patch of named results files.

  table = evaluate_job(config, workdir, results={"trackstar": "w/results.jsonl",
                                                 "bm25": "w/bm25.jsonl"})

For the checkpoint of `workdir` (step `config.encoder.step`, -1 = latest) and
the dataset of `config`, it

  1. checks every results file against the dataset (corpus fingerprint,
     dataset name, proponent ids inside the corpus, every query has ground
     truth) and against the checkpoint (the results' step and, when the
     results name their encoding store, the store's checkpoint/step/corpus),
  2. computes which queries the model answers correctly
     (`train.query_accuracy`),
  3. computes MRR / recall@10 / precision@10 overall, by relation, by fact
     frequency and for model-correct / -incorrect queries
     (`metrics.compute_metrics`),
  4. tail-patches each method's top-k proponents on the queries of
     `config.evaluate.subset` with the checkpoint's params and restored
     optimizer state and `optim.make_optimizer(config.train,
     learning_rate=optim.final_learning_rate(config.train))`,
  5. writes `<prefix>.json` (everything) and `<prefix>.md` (the table plus
     MRR by frequency / relation / correctness), prefix default
     `<workdir>/evaluation`.

Tail-patch scores are cached per method in `<prefix>_cache/` keyed by the
results file's content and the checkpoint step, so a rerun (e.g. the ladder
pipeline adding one method) only patches what changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from trackstar_jax import checkpointing
from trackstar_jax import optim
from trackstar_jax import store as store_lib
from trackstar_jax import train as train_lib
from trackstar_jax.evaluation import ablation
from trackstar_jax.evaluation import metrics as metrics_lib

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


def checkpoint_step(config, workdir: str) -> int:
  """config.encoder.step, or the latest step when it is -1/None."""
  step = config.encoder.get("step", -1)
  if step in (None, -1):
    step = checkpointing.latest_step(workdir)
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {checkpointing.checkpoint_dir(workdir)!r}: run "
                              "launch/train.py with this --workdir first, or pass the training --workdir.")
  return int(step)


def check_checkpoint(*, ckpt_meta: Mapping, dataset, workdir: str) -> None:
  """The checkpoint was trained on this dataset's corpus."""
  fp = ckpt_meta.get("dataset", {}).get("fingerprint", "")
  if fp and fp != dataset.fingerprint:
    raise EvaluationInputError(
        f"Checkpoint in {workdir!r} (step {ckpt_meta.get('step')}) was trained on corpus {fp[:12]}..., "
        f"but --config gives dataset {dataset.name!r} with corpus {dataset.fingerprint[:12]}...: "
        "pass the config the model was trained with (or its --workdir).")


def check_provenance(*, name: str, path: str, meta: Mapping, workdir: str, step: int, dataset) -> None:
  """The results were retrieved with this checkpoint (directly or via their store)."""
  rstep = meta.get("step")
  if rstep is not None and int(rstep) != step:
    raise EvaluationInputError(
        f"Results {name!r} ({path}) were retrieved with checkpoint step {rstep}, but the evaluated "
        f"checkpoint is step {step} of {workdir!r}: set --config.encoder.step={rstep} or re-run retrieve.")
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
  if sm.checkpoint and os.path.abspath(sm.checkpoint) != os.path.abspath(workdir):
    problems.append(f"store checkpoint {sm.checkpoint!r} != evaluated workdir {os.path.abspath(workdir)!r}")
  if sm.step != step:
    problems.append(f"store step {sm.step} != evaluated step {step}")
  if sm.corpus_fingerprint and sm.corpus_fingerprint != dataset.fingerprint:
    problems.append(f"store corpus {sm.corpus_fingerprint[:12]}... != dataset corpus {dataset.fingerprint[:12]}...")
  if problems:
    raise EvaluationInputError(
        f"Results {name!r} ({path}) come from encoding store {url}, which does not match the evaluated "
        "checkpoint: " + "; ".join(problems) + ". Evaluate with the --workdir/--config.encoder.step that "
        "produced the store, or re-run encode and retrieve for this checkpoint.")


def load_checked(results: Mapping[str, str], *, dataset, workdir: str, step: int) -> dict[str, list[dict]]:
  """name -> records, after every check (cheap; done before any tail-patching)."""
  out = {}
  queries = list(dataset.queries)
  for name, path in results.items():
    records, meta = metrics_lib.load_results(path)
    if not records:
      raise EvaluationInputError(f"Results {name!r} ({path}) have no records.")
    try:
      metrics_lib.check_results(records, metadata=meta, num_examples=len(dataset.corpus),
                                fingerprint=dataset.fingerprint, dataset_name=dataset.name, source=path)
      metrics_lib._match_queries(records, queries, path)  # pylint: disable=protected-access
    except ValueError as e:
      raise EvaluationInputError(f"Results {name!r}: {e}") from e
    check_provenance(name=name, path=path, meta=meta, workdir=workdir, step=step, dataset=dataset)
    out[name] = records
  return out


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _cache_key(path: str, *, step: int, k: int, subset_ids: Sequence[int], config) -> str:
  parts = dict(results=_sha256(path), step=step, k=k, queries=sorted(int(i) for i in subset_ids),
               train=checkpointing.config_to_dict(config.train))
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def file_slug(name: str) -> str:
  """A method name as a file name: 'TrackStar, d=64/block' -> 'TrackStar_d_64_block'."""
  out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
  while "__" in out:
    out = out.replace("__", "_")
  return out.strip("_") or "method"


class _Model:
  """The checkpoint's model, params and optimizer state, restored on first use (on one device)."""

  def __init__(self, config, workdir: str, tokenizer, step: int):
    self.config, self.workdir, self.step = config, workdir, step
    self.model = train_lib.build_model(config, tokenizer)
    self.optimizer = optim.make_optimizer(
        config.train, learning_rate=optim.final_learning_rate(config.train))
    self._ckpt = None

  def restore(self):
    if self._ckpt is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # no redundant SPMD copies
      abstract = jax.eval_shape(
          lambda: train_lib.init_params(self.model, seq_len=self.config.seq_len, seed=0))
      self._ckpt = checkpointing.restore(
          self.workdir, step=self.step, abstract_params=abstract,
          abstract_opt_state=jax.eval_shape(self.optimizer.init, abstract), sharding=device)
    return self._ckpt


def evaluate_job(config, workdir: str, *, results: Mapping[str, str], output_prefix: str | None = None,
                 dataset=None, skipped: Mapping[str, str] | None = None, tail_patch: bool = True) -> dict:
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

  Returns:
    The table dict (`ablation.ablation_table` + `model_accuracy`,
    `tail_patch`, `skipped`, `step`).
  """
  from trackstar_jax.evaluation import tail_patch as tail_patch_lib  # pylint: disable=g-import-not-at-top

  ec = config.evaluate
  workdir = os.path.abspath(workdir)
  prefix = output_prefix or os.path.join(workdir, "evaluation")
  dataset, tokenizer, _, corpus_ex, query_ex = train_lib.load_data(config, workdir, dataset=dataset)
  step = checkpoint_step(config, workdir)
  check_checkpoint(ckpt_meta=checkpointing.load_meta(workdir, step=step), dataset=dataset, workdir=workdir)
  records = load_checked(results, dataset=dataset, workdir=workdir, step=step)
  queries = list(dataset.queries)

  lm = _Model(config, workdir, tokenizer, step)
  ckpt = lm.restore()
  acc = train_lib.query_accuracy(lm.model, ckpt.params, query_ex, batch_size=int(config.train.get("eval_batch_size", 256)),
                                 frequencies=np.asarray([int(q["frequency"]) for q in queries]))
  correct = {int(i): bool(c) for i, c in zip(acc["ids"], acc["correct"])}
  logging.info("evaluate: step %d, model answers %d of %d queries correctly (%.3f)", step,
               sum(correct.values()), len(correct), acc["accuracy"])

  subset = str(ec.get("subset", "model_correct"))
  k = int(ec.get("tail_patch_k", 10))
  want = {"overall": lambda c: True, "model_correct": lambda c: c, "model_incorrect": lambda c: not c}[subset]
  tp = {}
  if tail_patch:
    os.makedirs(prefix + "_cache", exist_ok=True)
    for name, path in results.items():
      recs = [r for r in records[name] if want(correct[int(r["example_id"])])]
      if not recs:
        logging.warning("evaluate: no %s queries for %r: no tail-patch.", subset, name)
        continue
      key = _cache_key(path, step=step, k=k, subset_ids=[r["example_id"] for r in recs], config=config)
      cache = os.path.join(prefix + "_cache", f"{file_slug(name)}.tail_patch.json")
      if os.path.exists(cache):
        with open(cache) as f:
          cached = json.load(f)
        if cached.get("key") == key:
          tp[name] = cached["summary"]
          logging.info("evaluate: tail-patch %r from cache.", name)
          continue
      logging.info("evaluate: tail-patching %r: %d queries x top-%d proponents.", name, len(recs), k)
      scores = tail_patch_lib.tail_patch(
          apply_fn=lm.model.apply, params=ckpt.params, opt_state=ckpt.opt_state, optimizer=lm.optimizer,
          query_examples=query_ex, corpus_examples=corpus_ex, results=recs, k=k,
          query_chunk=int(ec.get("query_chunk", 8)))
      tp[name] = tail_patch_lib.summarize(scores, ks=tuple(x for x in TAIL_PATCH_KS if x <= k))
      with open(cache, "w") as f:
        json.dump(dict(key=key, summary=tp[name]), f)

  table = ablation.ablation_table(methods=records, queries=queries, tail_patch=tp, subset=subset,
                                  model_correct=correct, num_examples=len(dataset.corpus),
                                  fingerprint=dataset.fingerprint, dataset_name=dataset.name)
  for name, reason in (skipped or {}).items():
    row = {"method": name, "n": 0, **{c: math.nan for c in table["columns"]}, "skipped": reason}
    table["rows"].append(row)
  table.update(step=step, dataset=dataset.name, skipped=dict(skipped or {}), tail_patch=tp,
               results={n: os.path.abspath(p) for n, p in results.items()},
               model_accuracy={"accuracy": acc["accuracy"], "n": acc["n"], "n_correct": int(sum(correct.values())),
                               "by_frequency": acc.get("by_frequency", {})})
  write(table, prefix)
  return table


def _breakdown(table: Mapping, key: str, title: str) -> list[str]:
  """A methods x groups MRR table (groups of `metrics[...][key]`)."""
  groups = []
  for m in table["metrics"].values():
    groups += [g for g in m[key] if g not in groups]
  if not groups:
    return []
  lines = [f"MRR by {title} (all queries; n per group in the header)", ""]
  first = next(iter(table["metrics"].values()))[key]
  head = [f"{g} (n={first[g]['n']})" if g in first else g for g in groups]
  lines += ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(groups)]
  for name, m in table["metrics"].items():
    lines.append(f"| {name} | " + " | ".join(ablation._fmt(m[key].get(g, {}).get("mrr")) for g in groups) + " |")  # pylint: disable=protected-access
  return lines + [""]


def to_markdown(table: Mapping) -> str:
  """The headline table, then MRR by correctness, frequency and relation."""
  acc = table.get("model_accuracy", {})
  out = [f"# Fact tracing: {table.get('dataset', '')}, checkpoint step {table.get('step', '?')}", ""]
  if acc:
    out += [f"Model answers {acc['n_correct']} of {acc['n']} queries correctly ({acc['accuracy']:.3f}).", ""]
  out += [ablation.to_markdown(table)]
  for name, reason in table.get("skipped", {}).items():
    out.append(f"- {name}: skipped ({reason})")
  if table.get("skipped"):
    out.append("")
  rows = ["MRR: model-correct vs model-incorrect queries", "", "| method | correct | incorrect |", "|---|---|---|"]
  for name, m in table["metrics"].items():
    rows.append(f"| {name} | {ablation._fmt(m['model_correct']['mrr'])} (n={m['model_correct']['n']}) | "  # pylint: disable=protected-access
                f"{ablation._fmt(m['model_incorrect']['mrr'])} (n={m['model_incorrect']['n']}) |")  # pylint: disable=protected-access
  out += rows + [""]
  out += _breakdown(table, "by_frequency", "fact frequency")
  out += _breakdown(table, "by_relation", "relation")
  return "\n".join(out)


def write(table: Mapping, prefix: str) -> tuple[str, str]:
  """<prefix>.md and <prefix>.json (atomic renames)."""
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  paths = []
  for ext, text in ((".md", to_markdown(table)), (".json", ablation.to_json(table))):
    tmp = f"{prefix}{ext}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, prefix + ext)
    paths.append(prefix + ext)
  logging.info("evaluate: wrote %s", ", ".join(paths))
  return paths[0], paths[1]
