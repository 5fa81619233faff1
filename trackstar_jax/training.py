"""Training building blocks: the jitted step (data-parallel, params sharded by rules), initial state, batches.

  param_sh, opt_sh = state_shardings(model, optimizer, config, mesh, seq_len=config.seq_len)
  params = init_params(model, seq_len=..., seed=..., sharding=param_sh)
  opt_state = init_opt_state(optimizer, params, sharding=opt_sh)
  step = make_train_step(model.apply, optimizer, mesh, param_sharding=param_sh, opt_sharding=opt_sh)
  params, opt_state, metrics = step(params, opt_state, mesh_lib.shard_batch(batch, mesh))

The loop that uses them (checkpoints, metrics, evaluation) is the train job,
`trackstar_jax.jobs.train`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import functools
import itertools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trackstar_jax import checkpointing, losses, optim
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import sharding as sharding_lib
from trackstar_jax.data import batching

TRAIN_KEYS = ("inputs", "targets", "loss_mask", "pad_mask")


def _freeze(tree):
  """A hashable stand-in (memoization key) for a Sharding or a pytree of them."""
  if tree is None or isinstance(tree, jax.sharding.Sharding):
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple(leaves))


def _thaw(key):
  return jax.tree.unflatten(key[0], key[1]) if isinstance(key, tuple) else key


@functools.lru_cache(maxsize=8)
def _jitted_init(model, sharding_key):
  return jax.jit(model.init, out_shardings=_thaw(sharding_key))


def init_params(model, *, seq_len: int, seed: int, sharding=None) -> Any:
  """Initial params (float32) of a Linen LM taking (tokens, pad_mask), placed with `sharding`.

  `sharding`: one Sharding, or a pytree of them shaped like the params (`sharding.param_shardings`).
  """
  return _jitted_init(model, _freeze(sharding))(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))


@functools.lru_cache(maxsize=8)
def _cached_optimizer(train_cfg_json: str) -> optax.GradientTransformation:
  return optim.make_optimizer(ml_collections.ConfigDict(json.loads(train_cfg_json)))


def optimizer_for(train_cfg) -> optax.GradientTransformation:
  """`optim.make_optimizer(train_cfg)`, memoized on the config's values.

  The same optimizer object for equal configs lets jitted steps built on it
  be reused (no recompilation when a notebook or test trains again).
  """
  return _cached_optimizer(json.dumps(checkpointing.config_to_dict(train_cfg), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _jitted_opt_init(optimizer: optax.GradientTransformation, sharding_key):
  return jax.jit(optimizer.init, out_shardings=_thaw(sharding_key))


def init_opt_state(optimizer: optax.GradientTransformation, params, *, sharding=None):
  """`optimizer.init(params)` under jit, placed with `sharding` (a Sharding or `sharding.opt_state_shardings`)."""
  return _jitted_opt_init(optimizer, _freeze(sharding))(params)


def state_shardings(model, optimizer: optax.GradientTransformation, config, mesh, *, seq_len: int):
  """(param shardings, optimizer-state shardings) of `config.sharding` on `mesh` (replicated when unset)."""
  abstract = jax.eval_shape(lambda: init_params(model, seq_len=seq_len, seed=0))
  params = sharding_lib.from_config(abstract, config, mesh)
  abstract_opt = jax.eval_shape(optimizer.init, abstract)
  return params, sharding_lib.opt_state_shardings(abstract_opt, sharding_lib.with_shardings(abstract, params), mesh)


def make_train_step(
  apply_fn: Callable, optimizer: optax.GradientTransformation, mesh, *, param_sharding=None, opt_sharding=None
):
  """jit(params, opt_state, batch) -> (params, opt_state, metrics), donating state.

  The batch is split over the mesh's "data" axis; params and optimizer state
  are placed with `param_sharding` / `opt_sharding` (Shardings or pytrees of
  them, `state_shardings`; default replicated), in and out. The loss is the
  mean NLL over all masked tokens of the global batch (so it does not depend
  on the device count or the sharding). Memoized.
  """
  return _make_train_step(apply_fn, optimizer, mesh, _freeze(param_sharding), _freeze(opt_sharding))


@functools.lru_cache(maxsize=8)
def _make_train_step(apply_fn, optimizer, mesh, param_key, opt_key):
  repl = mesh_lib.replicated(mesh)
  param_sharding = repl if param_key is None else _thaw(param_key)
  opt_sharding = repl if opt_key is None else _thaw(opt_key)
  batch_sharding = {k: mesh_lib.data_sharding(mesh, 2) for k in TRAIN_KEYS}
  return jax.jit(
    train_step_fn(apply_fn, optimizer),
    in_shardings=(param_sharding, opt_sharding, batch_sharding),
    out_shardings=(param_sharding, opt_sharding, repl),
    donate_argnums=(0, 1),
  )


def train_step_fn(apply_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
  """The pure (unjitted) step (params, opt_state, batch) -> (params, opt_state, metrics) of `make_train_step`.

  Pure, so it composes: `jax.vmap` of it trains several models at once
  (`evaluation.datamodels`).
  """

  def loss_fn(params, batch):
    return losses.mean_token_loss(apply_fn(params, batch["inputs"], batch["pad_mask"]), batch)

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), tokens=jnp.sum(batch["loss_mask"]))
    return params, opt_state, metrics

  return train_step


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def train_batches(examples, *, batch_size: int, seed: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of the global batches from step `start_step` on, forever.

  Epoch e is shuffled with `epoch_seed(seed, e)` (the last batch of an epoch
  is padded with rows whose loss_mask is 0); step s is batch
  s % batches_per_epoch of epoch s // batches_per_epoch, so a restarted run
  sees exactly the batches of an uninterrupted one without replaying them.
  """
  per_epoch = batching.num_batches(len(examples.inputs), batch_size=batch_size, pad_last=True)
  if per_epoch == 0:
    raise ValueError("The training corpus is empty.")
  epoch, skip = divmod(int(start_step), per_epoch)
  while True:
    it = batching.iterate_batches(
      examples,
      batch_size=batch_size,
      shuffle=True,
      seed=epoch_seed(seed, epoch),
      epochs=1,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      pad_last=True,
    )
    yield from itertools.islice(it, skip, None)
    epoch, skip = epoch + 1, 0
