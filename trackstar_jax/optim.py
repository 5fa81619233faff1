"""Optimizers and learning-rate schedules for training (and tail-patching).

`make_optimizer(config.train)` returns a plain `optax.chain`, so the optimizer
state is a tuple of optax's own NamedTuples and the TrackStar optimizer
correction can find the second moments by type anywhere in the tree:

  adamw:     (clip, ScaleByAdamState(count, mu, nu), MaskedState(...),
              ScaleByScheduleState(count))
  adafactor: (clip, FactoredState(count, v_row, v_col, v),
              clip_by_block_rms, MaskedState(...), ScaleByScheduleState(count))

Adafactor uses `optax.scale_by_factored_rms`: a parameter gets factored
second moments when its two largest axes are both >=
`train.adafactor_min_dim_size_to_factor` (default 32, so every transformer
weight matrix of our presets is factored; optax's own default, 128, would
leave the `tiny` attention kernels [128, 4, 32] unfactored). With d0 the
largest axis and d1 the second largest (optax `_factored_dims`),
`v_row` = EMA of mean_{d0}(g^2) (shape without d0), `v_col` = EMA of
mean_{d1}(g^2) (shape without d1), and the second-moment estimate is
V = v_row (broadcast over d0) * v_col (broadcast over d1) / mean_{d1}(v_row).
For a [n, m] matrix with n < m: v_row is [n], v_col is [m], V_ij = r_i c_j /
mean(r). A 3-axis attention kernel is factored over its two largest axes
([D, H, Dh] -> D and Dh); the remaining (head) axis is a batch axis of the
factored state (rank-1 per head). Vectors keep a full `v` and dummy
`v_row`/`v_col` of shape (1,); factored parameters have a dummy `v` of (1,).

`make_optimizer(train_cfg, learning_rate=lr)` builds the same chain with a
constant learning rate: its state has exactly the same structure, so a
checkpointed optimizer state can be restored into it (tail-patch at the
final learning rate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from trackstar_jax import options as opts_lib


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
  """The training optimizer and its schedule. Defaults here are the project's (config section `train`).

  Attributes:
    optimizer: "adamw" | "adafactor".
    schedule: linear warmup from 0, then "cosine" | "linear" | "constant".
    learning_rate: peak learning rate.
    end_learning_rate_frac: the rate decays to learning_rate * this at num_steps.
    warmup_steps, num_steps: schedule length.
    weight_decay: decoupled weight decay on weight matrices (`decay_mask`).
    b1, b2, eps: Adam's.
    grad_clip: global-norm clipping (<= 0: off).
    adafactor_decay_rate, adafactor_eps, adafactor_clipping_threshold: Adafactor's
      (the last clips the update's block RMS).
    adafactor_min_dim_size_to_factor: axes at least this long are factored
      (32, so every weight matrix of our presets is; optax's default is 128).
  """

  optimizer: str = "adamw"
  schedule: str = "cosine"
  learning_rate: float = 3e-3
  end_learning_rate_frac: float = 0.1
  warmup_steps: int = 100
  num_steps: int = 2000
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  grad_clip: float = 1.0
  adafactor_decay_rate: float = 0.8
  adafactor_eps: float = 1e-30
  adafactor_clipping_threshold: float = 1.0
  adafactor_min_dim_size_to_factor: int = 32


# Fields of the config section `train` that belong to the training loop, not the optimizer.
JOB_FIELDS = (
  "batch_size",
  "seed",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "keep_checkpoints",
  "eval_batch_size",
  "num_sample_answers",
)


def _options(train_cfg) -> OptimizerOptions:
  if isinstance(train_cfg, OptimizerOptions):
    return train_cfg
  return opts_lib.from_config(OptimizerOptions, train_cfg, ignore=JOB_FIELDS)


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0, then cosine / linear decay (or constant) to the end rate at num_steps.

  `train_cfg`: `OptimizerOptions` or a ConfigDict of its fields (`config.train`).
  """
  o = _options(train_cfg)
  peak = float(o.learning_rate)
  end = peak * float(o.end_learning_rate_frac)
  warmup = int(o.warmup_steps)
  decay_steps = max(int(o.num_steps) - warmup, 1)
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif o.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown train.schedule {o.schedule!r}; use 'cosine', 'linear' or 'constant'.")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def final_learning_rate(train_cfg) -> float:
  """The learning rate at the end of training (step `num_steps`)."""
  return float(learning_rate_schedule(train_cfg)(int(_options(train_cfg).num_steps)))


def decay_mask(params: Any) -> Any:
  """True for weight matrices; False for embeddings, norm scales and biases."""

  def keep(path, leaf):
    names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return leaf.ndim >= 2 and "embed" not in names and "norm" not in names

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg, *, learning_rate: float | None = None) -> optax.GradientTransformation:
  """The training optimizer of `train_cfg` (`OptimizerOptions`, or `config.train`).

  Args:
    train_cfg: the options (see `OptimizerOptions`).
    learning_rate: a constant learning rate instead of the schedule (same
      state structure as the scheduled optimizer).

  Returns:
    An `optax.chain`; see the module docstring for its state layout.
  """
  o = _options(train_cfg)
  lr = learning_rate_schedule(o) if learning_rate is None else optax.constant_schedule(float(learning_rate))
  name = str(o.optimizer).lower()
  clip = float(o.grad_clip or 0.0)
  parts = [optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()]
  if name in ("adamw", "adam"):
    parts.append(optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)))
  elif name == "adafactor":
    parts.append(
      optax.scale_by_factored_rms(
        factored=True,
        decay_rate=float(o.adafactor_decay_rate),
        min_dim_size_to_factor=int(o.adafactor_min_dim_size_to_factor),
        epsilon=float(o.adafactor_eps),
      )
    )
    parts.append(optax.clip_by_block_rms(float(o.adafactor_clipping_threshold)))
  else:
    raise ValueError(f"Unknown train.optimizer {name!r}; use 'adamw' or 'adafactor'.")
  # add_decayed_weights(0) is kept so both settings share one state structure.
  parts.append(optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)
