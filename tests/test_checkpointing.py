"""Checkpoints: save/restore round trips, shardings, errors, config compatibility."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar_jax import checkpointing, configs, optim
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.models import DecoderLM, TransformerConfig


def _config():
  return configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=8)


def _state(optimizer="adamw"):
  config = _config()
  config.train.optimizer = optimizer
  model = DecoderLM(TransformerConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8))
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  tx = optim.make_optimizer(config.train)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
  return config, params, tx, opt_state


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_round_trip(tmp_path, optimizer):
  config, params, tx, opt_state = _state(optimizer)
  workdir = str(tmp_path / "run")
  manager = checkpointing.make_manager(workdir, keep=2)
  meta = checkpointing.make_meta(
    step=0, config=config, dataset_name="synthetic_facts", dataset_fingerprint="abc", tokenizer_path="/x/tok"
  )
  checkpointing.save(manager, step=5, params=params, opt_state=opt_state, meta=meta, wait=True)
  assert checkpointing.latest_step(workdir) == 5
  mesh = mesh_lib.make_mesh()
  repl = mesh_lib.replicated(mesh)
  abstract_params = jax.eval_shape(lambda: params)
  ckpt = checkpointing.restore(
    workdir, abstract_params=abstract_params, abstract_opt_state=jax.eval_shape(tx.init, abstract_params), sharding=repl
  )
  assert ckpt.step == 5
  _assert_trees_equal(ckpt.params, params)
  _assert_trees_equal(ckpt.opt_state, opt_state)  # same optax NamedTuples back
  leaf = jax.tree.leaves(ckpt.params)[0]
  assert leaf.sharding.is_equivalent_to(repl, leaf.ndim) and len(leaf.sharding.device_set) == 8
  state_types = [type(s) for s in ckpt.opt_state]
  assert (optax.ScaleByAdamState if optimizer == "adamw" else optax.FactoredState) in state_types
  assert ckpt.meta["step"] == 5 and ckpt.meta["dataset"] == {"name": "synthetic_facts", "fingerprint": "abc"}
  assert ckpt.meta["config"]["model"]["d_model"] == config.model.d_model
  assert ckpt.meta["tokenizer_path"] == "/x/tok"
  # Params only, without a target: the saved structure.
  _assert_trees_equal(checkpointing.restore_params(workdir), params)
  assert checkpointing.load_meta(workdir)["step"] == 5


def test_keep_and_step_selection(tmp_path):
  config, params, _, opt_state = _state()
  workdir = str(tmp_path)
  manager = checkpointing.make_manager(workdir, keep=2)
  meta = checkpointing.make_meta(step=0, config=config)
  for step in (1, 2, 3):
    p = jax.tree.map(lambda x: x + step, params)
    checkpointing.save(manager, step=step, params=p, opt_state=opt_state, meta=meta)
  manager.wait_until_finished()
  assert checkpointing.latest_step(workdir) == 3
  assert sorted(int(d) for d in os.listdir(checkpointing.checkpoint_dir(workdir)) if d.isdigit()) == [2, 3]
  restored = checkpointing.restore_params(workdir, step=2)
  _assert_trees_equal(restored, jax.tree.map(lambda x: x + 2, params))
  with pytest.raises(FileNotFoundError, match="step 1"):
    checkpointing.restore_params(workdir, step=1)


def test_missing_checkpoint_names_path(tmp_path):
  workdir = str(tmp_path / "nothing_here")
  assert checkpointing.latest_step(workdir) is None
  with pytest.raises(FileNotFoundError, match="nothing_here/checkpoints"):
    checkpointing.restore(workdir)
  os.makedirs(checkpointing.checkpoint_dir(workdir))
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    checkpointing.load_meta(workdir)


def test_config_compatibility():
  config = _config()
  meta = checkpointing.make_meta(step=3, config=config, dataset_fingerprint="f" * 64)
  # Free fields may change.
  free = _config()
  free.train.num_steps = 99999
  free.train.log_every = 3
  free.train.learning_rate = 0.5
  free.mesh = (("data", 2), ("model", -1))
  free.data_dir = "/elsewhere"
  checkpointing.check_compatible(meta, free, dataset_fingerprint="f" * 64)
  # Frozen ones are listed, all of them.
  bad = _config()
  bad.model.d_model = 256
  bad.tokenizer.vocab_size = 7
  bad.train.optimizer = "adafactor"
  bad.dataset = "lama_trex"
  bad.world.seed = 3
  with pytest.raises(ValueError) as e:
    checkpointing.check_compatible(meta, bad, workdir="/w", dataset_fingerprint="0" * 64)
  msg = str(e.value)
  for field in (
    "model.d_model",
    "tokenizer.vocab_size",
    "train.optimizer",
    "dataset:",
    "world.seed",
    "dataset fingerprint",
  ):
    assert field in msg, (field, msg)
  assert "num_steps" not in msg and "/w" in msg
  diffs = checkpointing.config_differences(meta["config"], bad)
  assert len(diffs) == 5
  # New frozen-prefix fields count too.
  newer = _config()
  with newer.unlocked():
    newer.train.adafactor_momentum = 0.5  # a field the saved config does not have
  assert checkpointing.config_differences(meta["config"], newer) == ["train.adafactor_momentum: '<unset>' -> 0.5"]


def test_write_config(tmp_path):
  config = _config()
  path = checkpointing.write_config(config, str(tmp_path / "w"))
  with open(path) as f:
    saved = json.load(f)
  assert saved["model"]["d_model"] == config.model.d_model
  assert saved["mesh"] == [["data", -1]]
