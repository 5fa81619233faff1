"""Flax NNX models for the encoder: an NNX module as (apply_fn, params).

The encoder takes a functional model: `apply_fn(params, inputs, pad_mask) ->
logits` and a params pytree whose key paths name the kernels. `functional`
turns an NNX module (or the graphdef and states of `nnx.split`) into that:

  model = MyNNXLM(..., rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  ...  # training
  apply_fn, params = nnx_adapter.functional(model=model)
  encoder = TrackStarEncoder(model_apply=apply_fn, params=params, config=config.encoder,
                             opt_state=optimizer.opt_state)

The public API does this itself: `trackstar_jax.build_encoder(model=model,
opt_state=optimizer.opt_state, ...)` (see colabs/bring_your_own_model.ipynb).

`params` is `nnx.to_pure_dict` of the module's `nnx.Param` state: a nested
dict with the attribute paths of the module (`block_0/attn/query/kernel`,
`blocks/0/mlp/wi/kernel` for an `nnx.List`), so `encoder.param_regex` and the
block regex are written against those paths, and they are the paths that
`optimizer_correction` reads from the NNX optimizer state. `apply_fn` merges a
fresh module from the graphdef and `params` on every call (under jit: at trace
time only) and calls it inside `layer_registry.nnx_module_paths`, so its
`nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum` layers are traced by the
fused path; the user's module is not modified. State other than the params
(batch statistics, RNG counters) is held constant: put the module in eval
mode (`model.eval()`) first if it has dropout or batch norm.

Public API:
  functional(*, model=None, graphdef=None, state=None, call=None, wrt=nnx.Param)
      -> (apply_fn, params)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import logging
from flax import nnx
import jax

from trackstar_jax import layer_registry, projection

CallFn = Callable[[nnx.Module, jax.Array, jax.Array], jax.Array]


def _default_call(model: nnx.Module, inputs: jax.Array, pad_mask: jax.Array) -> jax.Array:
  del pad_mask
  return model(inputs)


def functional(
  *,
  model: nnx.Module | None = None,
  graphdef: Any = None,
  state: Any = None,
  call: CallFn | None = None,
  wrt: Any = nnx.Param,
) -> tuple[Callable[..., jax.Array], dict]:
  """An NNX module as the encoder's `(model_apply, params)`.

  Args:
    model: the NNX module (not modified; its current values are used).
    graphdef: instead of `model`: the graphdef of `nnx.split(model, ...)` ...
    state: ... and its state(s) (one `nnx.State` or a sequence of them).
    call: `(module, inputs [B, T], pad_mask [B, T]) -> logits [B, T, V]`;
      default `module(inputs)`.
    wrt: the NNX filter of the parameters (default `nnx.Param`: the same
      filter as `nnx.Optimizer(model, tx, wrt=nnx.Param)`).

  Returns:
    (apply_fn, params): `apply_fn(params, inputs, pad_mask) -> logits`, and
    params as a nested dict of arrays (`nnx.to_pure_dict`).

  Raises:
    ValueError: neither or both of `model` and `graphdef`/`state` given.
  """
  if (model is None) == (graphdef is None):
    raise ValueError("nnx_adapter.functional needs model= or graphdef= (+ state=), not both.")
  if model is None:
    if state is None:
      raise ValueError("nnx_adapter.functional(graphdef=...) needs state= (the states of nnx.split).")
    states = tuple(state) if isinstance(state, (tuple, list)) else (state,)
    model = nnx.merge(graphdef, *states)
  if not isinstance(model, nnx.Module):
    raise ValueError(f"nnx_adapter.functional needs an nnx.Module, got {type(model).__name__}.")
  graphdef, param_state, rest = nnx.split(model, wrt, ...)
  params = nnx.to_pure_dict(param_state)
  call = call or _default_call

  def apply_fn(params: Any, inputs: jax.Array, pad_mask: jax.Array) -> jax.Array:
    fresh = jax.tree.map(lambda x: x, param_state)  # a new State: `param_state` stays as it is
    nnx.replace_by_pure_dict(fresh, params)
    module = nnx.merge(graphdef, fresh, rest)
    with layer_registry.nnx_module_paths(module):
      return call(module, inputs, pad_mask)

  logging.info("nnx_adapter: %s with %d parameter arrays", type(model).__name__, len(projection.flatten_paths(params)))
  return apply_fn, params
