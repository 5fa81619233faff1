"""End-to-end: train (a few steps) -> fit_hessian -> encode (+ resume) -> retrieve, on the tiny synthetic config.

Checks the results file against a brute force over the encoder's own encodings
(`hessian.cosine_scores`: full [Q, N] score matrix), in float32.
"""

import os

import jax
import numpy as np

from trackstar_jax import encoding
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib
from trackstar_jax.jobs import encode, fit_hessian, retrieve
from trackstar_jax.jobs import workdir as workdir_lib


def test_pipeline_end_to_end(trained):
  config, workdir = trained.config, trained.workdir
  config.store.chunk_rows = 48
  config.store.dtype = "float32"
  config.encoder.batch_size = 16
  config.hessian.train_sample = 48
  config.retrieve.k = 4
  config.retrieve.chunk_rows = 100
  config.retrieve.matmul_dtype = "float32"
  rd = workdir_lib.load_data(config, workdir)
  dataset, tokenizer, corpus, queries = rd.dataset, rd.tokenizer, rd.corpus, rd.queries

  h = fit_hessian.run(config, workdir, dataset=dataset)
  assert os.path.exists(workdir_lib.hessian_path(config, workdir)) and 0 < h.lam < 1

  store = encode.run(config, workdir, dataset=dataset)
  assert store.is_complete() and store.num_rows == len(corpus)
  full = store.read(0, store.num_rows)
  np.testing.assert_array_equal(full.ids, corpus.ids)
  # Resume: drop two chunks' markers (as if killed before they committed); a rerun redoes only those.
  store.unmark([1, 3])
  assert [a for a, _ in store_lib.open_store(store.url).missing_ranges()] == [48, 144]
  again = encode.run(config, workdir, dataset=dataset)
  np.testing.assert_array_equal(again.read(0, again.num_rows).phi, full.phi)

  path = retrieve.run(config, workdir, dataset=dataset)
  assert results_lib.validate_results_file(path) == len(dataset.queries)
  lines = results_lib.read_results(path)
  meta = results_lib.read_metadata(path)
  assert meta["fingerprint"] == dataset.fingerprint and meta["num_examples"] == len(corpus)

  encoder, _ = workdir_lib.load_encoder(config, workdir, tokenizer)
  phi_q = encoding.encode_to_array(encoder, queries, batch_size=16)
  scores = np.asarray(hessian_lib.cosine_scores(phi_q, full.phi, hessian=h))  # [Q, N] brute force
  for i, line in enumerate(lines):
    want = np.argsort(-scores[i], kind="stable")[:4]
    np.testing.assert_allclose(line["proponent_scores"], scores[i, want], atol=1e-4)
    assert line["proponent_ids"] == [int(x) for x in corpus.ids[want]]
    assert line["example_id"] == dataset.queries[i]["query_id"]
    gold = set(dataset.queries[i]["gold_sentence_ids"])
    assert line["proponent_correct"] == [p in gold for p in line["proponent_ids"]]
  assert jax.process_count() == 1
