"""The fit_hessian job: R_train from a corpus sample, R_eval from the queries; saves R^{-1/2}.

  hessian = run(config, workdir)   # <workdir>/hessian.npz (config.hessian.path)

The sample is `config.hessian.train_sample` corpus examples drawn with
`config.hessian.seed` (the same rows for any number of hosts; with a user
corpus each host reads and encodes only the sampled rows of its slice); the
Hessian records which encodings it was fit for, and the retrieve job refuses
a store made by another encoder or checkpoint.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import numpy as np

from trackstar_jax import api, encoding
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.jobs import encode as encode_job
from trackstar_jax.jobs import workdir as workdir_lib


def producer(config, workdir: str, encoder, *, step: int, dataset, num_rows: int) -> dict[str, Any]:
  """The fields of an encoding that a Hessian depends on (not the store layout)."""
  meta = encoding.store_meta(
    encoder, num_rows=num_rows, **encode_job.provenance(config, encoder, step=step, dataset=dataset)
  )
  d = meta.to_json()
  return {k: d[k] for k in ("dim", "checkpoint", "step", "projection_seed", "blocks", "correction", "extra")}


def run(config, workdir: str, *, dataset=None) -> hessian_lib.Hessian:
  # A user corpus: each host reads its slice and encodes the sampled rows in it (HostView.select).
  rd = workdir_lib.load_data(config, workdir, dataset=dataset, host_slice=True, queries=True)
  encoder, step = workdir_lib.load_encoder(config, workdir, rd.tokenizer)
  n = min(int(config.hessian.train_sample), len(rd.corpus))
  rows = np.sort(np.random.default_rng(int(config.hessian.seed)).choice(len(rd.corpus), n, replace=False))
  h = api.fit_hessian(
    encoder=encoder,
    train=rd.corpus.select(rows),
    queries=rd.queries,
    batch_size=int(config.encoder.batch_size),
    config=config.hessian,
  )
  h.meta["encoding"] = producer(config, workdir, encoder, step=step, dataset=rd.dataset, num_rows=len(rd.corpus))
  path = workdir_lib.hessian_path(config, workdir)
  if mesh_lib.is_chief():
    h.save(path)
    logging.info(
      "fit_hessian: lambda=%.4f from %d corpus examples and %d queries -> %s",
      h.lam,
      h.meta["n_train"],
      h.meta["n_eval"],
      path,
    )
  mesh_lib.sync("fit_hessian:saved")
  return h
