"""The retrieve job: top-k proponents and bottom-k opponents of every query -> results JSONL.

  path = run(config, workdir)      # <workdir>/results.jsonl (config.retrieve.output) + .meta.json

Encodes the queries with the checkpoint's encoder, checks that the store (and
the Hessian, unless `retrieve.use_hessian=False`) were made by this encoder,
checkpoint and corpus, then streams the store through the exact sharded top-k
(`trackstar_jax.retrieve`) and writes the published TrackStar results schema.
With a user corpus and several processes, each reads only its slice of the
corpus; process 0 gathers the proponents' and opponents' texts and sources.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import numpy as np

from trackstar_jax import api, encoding, fileio
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.jobs import encode as encode_job
from trackstar_jax.jobs import fit_hessian as fit_hessian_job
from trackstar_jax.jobs import workdir as workdir_lib


def run(config, workdir: str, *, dataset=None) -> str:
  rc = config.retrieve
  # A user corpus over several processes: each reads its slice (a HostView) and names the results' rows in it.
  rd = workdir_lib.load_data(config, workdir, dataset=dataset, host_slice=True, queries=True)
  corpus = rd.corpus
  encoder, step = workdir_lib.load_encoder(config, workdir, rd.tokenizer)
  meta = encoding.store_meta(
    encoder, num_rows=len(corpus), **encode_job.provenance(config, encoder, step=step, dataset=rd.dataset)
  )
  store = store_lib.open_store(workdir_lib.store_url(config, workdir))
  # The store's layout (dtype, chunk_rows) may differ from this config; what produced it may not.
  diff = store_lib.meta_differences(
    store.meta, dataclasses.replace(meta, dtype=store.meta.dtype, chunk_rows=store.meta.chunk_rows)
  )
  if diff:
    raise store_lib.StoreMismatchError(
      f"Encoding store {store.url} does not match this config/checkpoint:\n  "
      + "\n  ".join(diff)
      + "\nRe-run launch/encode.py (another store URL)."
    )
  store.require_complete()
  h = None
  if rc.use_hessian:
    path = workdir_lib.hessian_path(config, workdir)
    if not fileio.exists(path):
      raise FileNotFoundError(f"No Hessian at {path}: run launch/fit_hessian.py, or set retrieve.use_hessian=False.")
    h = hessian_lib.Hessian.load(path)
    want = fit_hessian_job.producer(config, workdir, encoder, step=step, dataset=rd.dataset, num_rows=len(corpus))
    if h.meta.get("encoding") != want:
      raise ValueError(f"Hessian {path} was fit for other encodings than store {store.url}; rerun fit_hessian.")
  result = api.retrieve(
    encoder=encoder,
    queries=rd.queries,
    store=store,
    hessian=h,
    k=int(rc.k),  # clamped to the corpus size by retrieval (the results record the k used)
    normalize=bool(rc.normalize),
    matmul_dtype=str(rc.matmul_dtype),
    chunk_rows=int(rc.chunk_rows),
    batch_size=int(config.encoder.batch_size),
    select=str(rc.select),
    cache_norms=bool(rc.cache_norms),
    reads_in_flight=int(rc.reads_in_flight),
    transfers_ahead=int(rc.transfers_ahead),
    pinned=bool(rc.pinned),
    copy_piece_mib=int(rc.copy_piece_mib),
    pinned_reads=bool(rc.pinned_reads),
    mapped_reads=bool(rc.mapped_reads),
  )
  out = workdir_lib.results_path(config, workdir)
  rows = np.unique(np.concatenate([result.top_rows.ravel(), result.bottom_rows.ravel()]))  # the same on every process
  if isinstance(corpus, corpus_lib.HostView):  # a slice per process: each names the rows in its own (collective)
    texts, sources = rd.gather_texts_and_sources(rows)
    source_of = sources.__getitem__
  elif mesh_lib.is_chief():
    texts, source_of = rd.texts_for_rows(rows, np.asarray(corpus.ids)), rd.source_of
  if mesh_lib.is_chief():
    method = rc.method or ("trackstar" if h is not None and rc.normalize else "gradient")
    records = results_lib.build_results(queries=rd.query_records, result=result, text_of=texts, source_of=source_of)
    results_lib.write_results(
      out,
      records,
      metadata=dict(
        num_queries=result.num_queries,
        k=result.k,
        dataset=rd.dataset.name,
        fingerprint=rd.dataset.fingerprint,
        num_examples=len(corpus),
        method=method,
        step=int(step),
        store=store.url,
        normalize=bool(rc.normalize),
        hessian_lambda=None if h is None else float(h.lam),
        correction=meta.correction,
      ),
    )
    logging.info("retrieve: %d queries, k=%d -> %s", result.num_queries, result.k, out)
  mesh_lib.sync("retrieve:written")
  return out
