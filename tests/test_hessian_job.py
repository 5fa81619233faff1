"""The fit_hessian job streams phi into R batch by batch; it must equal R from all of phi at once."""

import numpy as np
import pytest

from trackstar_jax import encoding
from trackstar_jax import hessian as hessian_lib
from trackstar_jax.jobs import fit_hessian
from trackstar_jax.jobs import workdir as workdir_lib


@pytest.mark.parametrize("block_diagonal", [False, True])
def test_streamed_job_equals_fit_on_all_phi(trained, block_diagonal):
  config, workdir = trained.config.copy_and_resolve_references(), trained.workdir
  config.encoder.batch_size = 16
  config.hessian.train_sample = 100  # not a multiple of the batch: a padded last batch
  config.hessian.top_k_eig = 20
  config.hessian.block_diagonal = block_diagonal
  h = fit_hessian.run(config, workdir)

  rd = workdir_lib.load_data(config, workdir)
  corpus, queries = rd.corpus, rd.queries
  encoder, _ = workdir_lib.load_encoder(config, workdir, rd.tokenizer)
  rows = np.sort(np.random.default_rng(int(config.hessian.seed)).choice(len(corpus), 100, replace=False))
  train_phi = encoding.encode_to_array(encoder, corpus.select(rows), batch_size=16)
  eval_phi = encoding.encode_to_array(encoder, queries, batch_size=16)
  ref = hessian_lib.fit_hessian(
    train_phi=train_phi, eval_phi=eval_phi, config=config.hessian, n_blocks=len(encoder.blocks)
  )
  assert (h.meta["n_train"], h.meta["n_eval"]) == (100, len(queries))
  assert h.lam == pytest.approx(ref.lam, rel=1e-4)
  assert np.shape(h.inv_sqrt) == np.shape(ref.inv_sqrt)
  np.testing.assert_allclose(h.inv_sqrt, ref.inv_sqrt, rtol=2e-3, atol=2e-3 * np.abs(ref.inv_sqrt).max())
