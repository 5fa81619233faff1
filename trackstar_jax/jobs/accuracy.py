"""The accuracy job: which queries a checkpoint answers, on a fixed dev / test split of relations.

  table = run(config, workdir)                     # <workdir>/accuracy.json
  best, md = compare({"a": wd_a, "b": wd_b})      # variants chosen on dev relations, reported on test

Greedy accuracy (`lm_eval.query_accuracy`) of the checkpoint at
`config.encoder.step` (-1 = latest) on the queries of `config`, overall, by
fact frequency and by relation, and on the two halves of
`evaluation.relation_split` (seed `config.accuracy.split_seed`). Training
variants are compared on the dev half only; the test half is what is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

from absl import logging
import numpy as np

from trackstar_jax import fileio, lm_eval
from trackstar_jax.evaluation import relation_split
from trackstar_jax.jobs import workdir as workdir_lib


def output_path(workdir: str) -> str:
  return os.path.join(workdir, "accuracy.json")


def run(config, workdir: str, *, dataset=None) -> dict:
  step = workdir_lib.checkpoint_step(config, workdir)
  lm = workdir_lib.load_run(workdir, step=step, config=config, opt_state=False, data=False)
  rd = workdir_lib.load_data(config, workdir, dataset=dataset)
  queries = rd.query_records
  res = lm_eval.query_accuracy(
    lm.model.apply,
    lm.params,
    rd.queries,
    batch_size=int(config.train.eval_batch_size),
    frequencies=np.asarray([int(q["frequency"]) for q in queries]),
  )
  dev, _ = relation_split.relation_split(
    [q["relation"] for q in queries],
    dev_fraction=float(config.accuracy.dev_fraction),
    seed=int(config.accuracy.split_seed),
  )
  table = relation_split.accuracy_by_split(res["correct"], queries, dev=dev)
  table.update(step=int(step), workdir=os.path.abspath(workdir), dataset=rd.dataset.name)
  fileio.write_json(output_path(workdir), table)
  logging.info(
    "accuracy at step %d: all %.3f, dev %.3f (>=3: %.3f), test %.3f (>=3: %.3f)",
    step,
    table["all"]["accuracy"],
    table["dev"]["accuracy"],
    table["dev"][">=3"],
    table["test"]["accuracy"],
    table["test"][">=3"],
  )
  return table


def compare(workdirs: Mapping[str, str], *, metric: str = ">=3") -> tuple[str, str]:
  """(the variant selected on dev `metric`, a markdown table) from each workdir's accuracy.json."""
  tables = {}
  for name, wd in workdirs.items():
    path = output_path(wd)
    if not fileio.exists(path):
      raise FileNotFoundError(f"Variant {name!r}: no {path!r}; run launch/accuracy.py --workdir={wd} first.")
    tables[name] = fileio.read_json(path)
  splits = {tuple(t["dev_relations"]) for t in tables.values()}
  if len(splits) > 1:
    raise ValueError(f"The variants were scored on different relation splits: {sorted(splits)}.")
  best = relation_split.select_variant(tables, metric=metric)
  return best, relation_split.markdown(tables, selected=best, metric=metric)
