"""The fit_hessian job streams phi into R batch by batch; it must equal R from all of phi at once."""

import numpy as np
import pytest

from configs import synthetic
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import pipeline
from trackstar_jax import train as train_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = synthetic.get_config("runlocal=True")
  with config.unlocked():
    config.train.num_steps = 4
    config.train.eval_every = 4
    config.train.checkpoint_every = 4
    config.encoder.batch_size = 16
    config.hessian.train_sample = 100  # not a multiple of the batch: a padded last batch
    config.hessian.top_k_eig = 20
  workdir = str(tmp_path_factory.mktemp("hess") / "w")
  train_lib.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.parametrize("block_diagonal", [False, True])
def test_streamed_job_equals_fit_on_all_phi(trained, block_diagonal):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.hessian.block_diagonal = block_diagonal
  h = pipeline.fit_hessian_job(config, workdir)

  dataset, tokenizer, _, corpus, queries = train_lib.load_data(config, workdir)
  encoder, _ = pipeline.load_encoder(config, workdir, tokenizer)
  rows = np.sort(np.random.default_rng(int(config.hessian.seed)).choice(len(corpus), 100, replace=False))
  train_phi = pipeline.encode_examples(encoder, corpus.select(rows), batch_size=16)
  eval_phi = pipeline.encode_examples(encoder, queries, batch_size=16)
  ref = hessian_lib.fit_hessian(train_phi=train_phi, eval_phi=eval_phi, config=config.hessian,
                                n_blocks=len(encoder.blocks))
  assert (h.meta["n_train"], h.meta["n_eval"]) == (100, len(queries))
  assert h.lam == pytest.approx(ref.lam, rel=1e-4)
  assert np.shape(h.inv_sqrt) == np.shape(ref.inv_sqrt)
  np.testing.assert_allclose(h.inv_sqrt, ref.inv_sqrt, rtol=2e-3, atol=2e-3 * np.abs(ref.inv_sqrt).max())
