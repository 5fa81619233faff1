"""A training workdir is an input: later jobs can leave it untouched, and it can be moved or copied.

* encode / fit_hessian / retrieve / evaluate with every output redirected
  write nothing into the training workdir or its TFDS build (so a read-only
  or shared workdir works), and each job's config and metrics line land
  next to its outputs;
* a moved workdir keeps its store and Hessian (the checkpoint is identified
  by content, not by path), and a different checkpoint is still refused.
"""

import os
import shutil

import pytest

from trackstar_jax import checkpointing
from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib
from trackstar_jax.jobs import cli, encode, evaluate, fit_hessian, retrieve, train
from trackstar_jax.jobs import workdir as workdir_lib


def _snapshot(*roots):
  """path -> (size, mtime_ns) of every file under `roots`."""
  out = {}
  for root in roots:
    for d, _, files in os.walk(root):
      for f in files:
        st = os.stat(os.path.join(d, f))
        out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
  return out


def _redirect(config, out):
  config.store.url = os.path.join(out, "enc.zarr")
  config.store.chunk_rows = 64
  config.hessian.path = os.path.join(out, "hessian.npz")
  config.hessian.train_sample = 64
  config.retrieve.output = os.path.join(out, "results.jsonl")
  config.retrieve.k = 3
  config.evaluate.subset = "overall"
  config.evaluate.tail_patch_k = 1
  return config


def test_redirected_jobs_leave_the_training_workdir_untouched(trained, tmp_path):
  config, workdir = _redirect(trained.config, str(tmp_path / "out")), trained.workdir
  config.data_dir = os.path.join(os.path.dirname(workdir), "tfds")
  before = _snapshot(workdir, config.data_dir)
  store = encode.run(config, workdir)
  cli.finish(config, cli.output_dir(store.url), "encode", rows=store.num_rows)
  fit_hessian.run(config, workdir)
  path = retrieve.run(config, workdir)
  cli.finish(config, cli.output_dir(path), "retrieve", results=path)
  prefix = str(tmp_path / "out" / "evaluation")
  evaluate.run(config, workdir, results={"trackstar": path}, output_prefix=prefix)
  assert _snapshot(workdir, config.data_dir) == before  # not one file added, removed or rewritten
  for job in ("encode", "retrieve"):
    assert os.path.exists(tmp_path / "out" / f"{job}_config.json")
    assert '"wall_s"' in (tmp_path / "out" / f"{job}_metrics.jsonl").read_text()
  assert os.path.exists(prefix + ".json") and results_lib.validate_results_file(path) > 0


def test_moved_workdir_keeps_its_encodings_and_another_checkpoint_is_refused(trained, tmp_path):
  config, workdir = _redirect(trained.config, str(tmp_path / "out")), trained.workdir
  config.data_dir = os.path.join(os.path.dirname(workdir), "tfds")
  encode.run(config, workdir)
  fit_hessian.run(config, workdir)
  moved = str(tmp_path / "elsewhere" / "w")
  shutil.copytree(workdir, moved)
  shutil.rmtree(workdir)  # moved, not copied: nothing at the old path
  path = retrieve.run(config, moved)  # the same store and Hessian, found valid for the moved checkpoint
  assert len(results_lib.read_results(path)) > 0
  meta = store_lib.open_store(config.store.url).meta
  assert meta.checkpoint.startswith("params-sha256:") and "elsewhere" not in meta.checkpoint

  # Two more training steps in the moved workdir: another checkpoint, whose encodings these are not.
  config.train.num_steps = config.train.checkpoint_every = 6
  train.run(config, moved)
  assert checkpointing.latest_step(moved) == 6
  with pytest.raises(store_lib.StoreMismatchError, match="checkpoint"):
    retrieve.run(config, moved)
  assert workdir_lib.checkpoint_step(config, moved) == 6
