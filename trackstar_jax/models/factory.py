"""Models named in the config by import path: `config.model.factory = "my_pkg.lm:make_model"`.

The contract. A factory is a function

  def make_model(model_config, *, vocab_size, seq_len, **unused):
    return ...

called with the config's `model` section (an `ml_collections.ConfigDict`:
put your own fields there, e.g. `--config.model.d_model=512`), the
tokenizer's vocabulary size and the sequence length; accept `**unused` so
later keywords do not break it. It returns one of:

  a Flax Linen module     called as `module.apply(variables, inputs, pad_mask) -> logits`;
                          initialised (shapes only) as `module.init(rng, inputs, pad_mask)`
  a Flax NNX module       called as `module(inputs) -> logits` (its nnx.Linear /
                          LinearGeneral / Einsum layers are traced, the module unchanged)
  (apply_fn, params)      `apply_fn(params, inputs [B, T] int32, pad_mask [B, T] bool)
                          -> logits [B, T, V]`; params a pytree of arrays (or
                          `jax.ShapeDtypeStruct`s): the structure the checkpoint's params
                          are restored into. Use it for an NNX module that needs the
                          padding mask: `nnx_adapter.functional(model=m, call=...)`.

The params restored from a checkpoint (`config.checkpoint.params`) replace
the module's own initial values; they must have the same paths and shapes
(for Linen, a checkpoint holding `variables["params"]` without the `params`
level is accepted too).

The project's own `DecoderLM` is the default factory, `decoder_lm` below
(`DEFAULT`): configs that name no factory build it from the model presets.

  fn = import_factory("my_pkg.lm:make_model")       # ImportError naming the module / attribute
  model = fn(config.model, vocab_size=32000, seq_len=512)
"""

from __future__ import annotations

from collections.abc import Callable
import importlib
from typing import Any

from trackstar_jax.models.transformer import DecoderLM, TransformerConfig

DEFAULT = "trackstar_jax.models.factory:decoder_lm"


def decoder_lm(model_config, *, vocab_size: int, seq_len: int = 0, **unused) -> DecoderLM:
  """The project's `DecoderLM` of `model_config` (the `TransformerConfig` fields) with `vocab_size` tokens."""
  del seq_len, unused
  return DecoderLM(TransformerConfig.from_config(model_config, vocab_size=int(vocab_size)))


def factory_name(model_config) -> str:
  """`model_config.factory`, or `DEFAULT` when absent or empty (configs written before factories existed)."""
  name = model_config.get("factory", "") if hasattr(model_config, "get") else ""
  return name or DEFAULT


def import_factory(spec: str) -> Callable[..., Any]:
  """The callable named by "package.module:attribute" (or "package.module.attribute").

  Raises:
    ImportError: the module does not import (with the underlying error), or has
      no such attribute (with the names it has); ValueError: a malformed spec.
  """
  module_name, sep, attr = spec.partition(":")
  if not sep:
    module_name, _, attr = spec.rpartition(".")
  if not module_name or not attr:
    raise ValueError(f"model.factory={spec!r} must be 'package.module:function' (e.g. 'my_pkg.lm:make_model').")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(
      f"model.factory={spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}). Is its package "
      "installed or on PYTHONPATH (the launchers run from the repository root)?"
    ) from e
  fn = module
  for part in attr.split("."):
    if not hasattr(fn, part):
      names = sorted(n for n in dir(module) if not n.startswith("_"))
      raise ImportError(
        f"model.factory={spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute "
        f"{attr!r}. Its public names: {names[:30]}{' ...' if len(names) > 30 else ''}."
      )
    fn = getattr(fn, part)
  if not callable(fn):
    raise ValueError(f"model.factory={spec!r} names a {type(fn).__name__}, not a function.")
  return fn
