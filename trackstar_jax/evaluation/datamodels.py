"""Many models trained at once on subsets of the corpus: the measured side of the LDS.

  params = train_models(apply_fn=model.apply, init_fn=init, optimizer=optimizer, examples=corpus,
                        subsets=[rows_0, rows_1], seeds=[11, 12], num_steps=700, batch_size=64)
  loss = lm_eval.query_losses(model.apply, params, queries, stacked=True)      # [G, Q]

Model g trains on `examples.select(subsets[g])` with the main run's recipe:
the same optimizer and step (`training.train_step_fn`), batches from
`training.train_batches` (shuffled per epoch with `seeds[g]`), params from
`init_fn(init_seeds[g])`. The G models are stacked on a leading axis and
trained together by one `jit(vmap(step))`: each keeps its own params,
optimizer state and batches, and their results equal G separate runs
(tests/test_lds.py). With a `sharding` over the models axis (a mesh axis of
size dividing G) the models are spread over devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trackstar_jax import training
from trackstar_jax.progress import Progress


def stack(trees: Sequence[Any]) -> Any:
  """G pytrees of equal structure -> one pytree with a leading axis of G."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.lru_cache(maxsize=8)
def make_multi_train_step(apply_fn: Callable, optimizer: optax.GradientTransformation, sharding=None):
  """jit(vmap(train_step_fn)): (params, opt_state, batch), all with a leading models axis -> the same, + metrics [G].

  Donates params and optimizer state. `sharding` (of the models axis) places
  every input and output; None leaves placement to jit. Memoized.
  """
  step = jax.vmap(training.train_step_fn(apply_fn, optimizer))
  if sharding is None:
    return jax.jit(step, donate_argnums=(0, 1))
  return jax.jit(step, in_shardings=sharding, out_shardings=sharding, donate_argnums=(0, 1))


def models_sharding(mesh, num_models: int):
  """The models axis split over the mesh's "data" axis when its size divides `num_models`, else None (one device)."""
  n = int(mesh.shape["data"])
  if n > 1 and num_models % n == 0 and mesh.size == n:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return None


def train_models(
  *,
  apply_fn: Callable,
  init_fn: Callable[[int], Any],
  optimizer: optax.GradientTransformation,
  examples,
  subsets: Sequence[np.ndarray],
  seeds: Sequence[int],
  num_steps: int,
  batch_size: int,
  init_seeds: Sequence[int] | None = None,
  sharding=None,
  name: str = "models",
  log_every_s: float = 30.0,
) -> tuple[Any, dict[str, np.ndarray]]:
  """Trains G = len(subsets) models at once, model g on rows `subsets[g]` of `examples`.

  Args:
    apply_fn: `(params, inputs, pad_mask) -> logits` of the LM.
    init_fn: seed -> initial params of one model (e.g. `training.init_params`).
    optimizer: the training optimizer (`training.optimizer_for(config.train)`).
    examples: the corpus (`data.batching.Examples`).
    subsets: G arrays of row indices.
    seeds: G batch-order seeds (`training.train_batches`).
    num_steps: steps per model.
    batch_size: examples per model and step.
    init_seeds: G init seeds (default `seeds`).
    sharding: of the models axis (`models_sharding`), or None.
    name, log_every_s: progress lines.

  Returns:
    (params stacked [G, ...], metrics of the last step: `loss`, `grad_norm` [G]).
  """
  g = len(subsets)
  if len(seeds) != g or (init_seeds is not None and len(init_seeds) != g):
    raise ValueError(f"{g} subsets need {g} seeds (got {len(seeds)}) and init seeds.")
  init_seeds = seeds if init_seeds is None else init_seeds
  place = (lambda x: x) if sharding is None else (lambda x: jax.device_put(x, sharding))
  params = place(stack([init_fn(int(s)) for s in init_seeds]))
  opt_state = place(jax.vmap(optimizer.init)(params))
  streams = [
    training.train_batches(examples.select(np.asarray(rows)), batch_size=batch_size, seed=int(s), start_step=0)
    for rows, s in zip(subsets, seeds)
  ]
  step = make_multi_train_step(apply_fn, optimizer, sharding)
  progress = Progress(total=num_steps, name=name)
  metrics = {}
  for i in range(num_steps):
    batches = [next(s) for s in streams]
    batch = place({k: np.stack([b[k] for b in batches]) for k in training.TRAIN_KEYS})
    params, opt_state, metrics = step(params, opt_state, batch)
    if i == 0:
      jax.block_until_ready(metrics)
      progress.mark()  # the rate window starts after the compiling first step
    progress.update(i + 1)
    if progress.due(every_s=log_every_s):
      logging.info("%s, loss %.4f (mean of %d models)", progress.line(), float(jnp.mean(metrics["loss"])), g)
  metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items() if k in ("loss", "grad_norm")}
  return params, metrics
