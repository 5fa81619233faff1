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

from typing import Any

import jax
import optax

DEFAULT_ADAFACTOR_MIN_DIM = 32


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0, then cosine (default) or linear decay.

  The rate decays from `learning_rate` to
  `learning_rate * end_learning_rate_frac` at step `num_steps` and stays
  there. `train_cfg.schedule` in {"cosine", "linear", "constant"}
  (default "cosine"; "constant" still warms up).
  """
  peak = float(train_cfg.learning_rate)
  end = peak * float(train_cfg.get("end_learning_rate_frac", 1.0))
  warmup = int(train_cfg.get("warmup_steps", 0))
  num_steps = int(train_cfg.num_steps)
  kind = train_cfg.get("schedule", "cosine")
  decay_steps = max(num_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown train.schedule {kind!r}; use 'cosine', 'linear' or 'constant'.")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def final_learning_rate(train_cfg) -> float:
  """The learning rate at the end of training (step `num_steps`)."""
  return float(learning_rate_schedule(train_cfg)(int(train_cfg.num_steps)))


def decay_mask(params: Any) -> Any:
  """True for weight matrices; False for embeddings, norm scales and biases."""

  def keep(path, leaf):
    names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return leaf.ndim >= 2 and "embed" not in names and "norm" not in names

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg, *, learning_rate: float | None = None) -> optax.GradientTransformation:
  """The training optimizer of `train_cfg` (= `config.train`).

  Args:
    train_cfg: `optimizer` ("adamw" | "adafactor"), `learning_rate`,
      `warmup_steps`, `num_steps`, `end_learning_rate_frac`, `schedule`,
      `b1`, `b2`, `eps`, `weight_decay`, `grad_clip` (global norm; <= 0 off);
      Adafactor also reads `adafactor_decay_rate` (0.8),
      `adafactor_min_dim_size_to_factor` (32), `adafactor_clipping_threshold`
      (1.0, update RMS clipping), `adafactor_eps` (1e-30).
    learning_rate: a constant learning rate instead of the schedule (same
      state structure as the scheduled optimizer).

  Returns:
    An `optax.chain`; see the module docstring for its state layout.
  """
  if learning_rate is None:
    lr = learning_rate_schedule(train_cfg)
  else:
    lr = optax.constant_schedule(float(learning_rate))
  name = str(train_cfg.get("optimizer", "adamw")).lower()
  clip = float(train_cfg.get("grad_clip", 0.0) or 0.0)
  weight_decay = float(train_cfg.get("weight_decay", 0.0))
  parts = [optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()]
  if name in ("adamw", "adam"):
    parts.append(
        optax.scale_by_adam(
            b1=float(train_cfg.get("b1", 0.9)),
            b2=float(train_cfg.get("b2", 0.999)),
            eps=float(train_cfg.get("eps", 1e-8)),
        )
    )
  elif name == "adafactor":
    parts.append(
        optax.scale_by_factored_rms(
            factored=True,
            decay_rate=float(train_cfg.get("adafactor_decay_rate", 0.8)),
            min_dim_size_to_factor=int(
                train_cfg.get("adafactor_min_dim_size_to_factor", DEFAULT_ADAFACTOR_MIN_DIM)
            ),
            epsilon=float(train_cfg.get("adafactor_eps", 1e-30)),
        )
    )
    parts.append(optax.clip_by_block_rms(float(train_cfg.get("adafactor_clipping_threshold", 1.0))))
  else:
    raise ValueError(f"Unknown train.optimizer {name!r}; use 'adamw' or 'adafactor'.")
  # add_decayed_weights(0) is kept so both settings share one state structure.
  parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)
