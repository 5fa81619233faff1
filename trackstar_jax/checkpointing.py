"""Orbax checkpoints of a training run: params, optimizer state and metadata.

Layout of a workdir:

  <workdir>/config.json                     the resolved config of the run
  <workdir>/checkpoints/<step>/params       Flax params (StandardSave)
  <workdir>/checkpoints/<step>/opt_state    optax state (StandardSave)
  <workdir>/checkpoints/<step>/meta         JSON: step, config, dataset name +
                                            fingerprint, tokenizer path

TrackStar reads the optimizer's second moments from `opt_state`, so both are
always saved together. Restores take abstract targets (`jax.eval_shape`) and
place arrays with the given shardings (default: replicated on all devices).

Resuming into a workdir written with another config is refused when a field
that changes what the checkpoint *means* differs (`FROZEN_FIELDS`: dataset
and world, tokenizer, sequence length, model shape, optimizer kind and its
second-moment hyperparameters, batch size and data seed). Everything else
(num_steps, learning rate and schedule, logging/eval/checkpoint cadence,
paths, mesh, later pipeline stages) may change between restarts.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import json
import logging as logging_std
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "meta")

# Dotted config fields (or prefixes ending in ".") that must match on resume.
FROZEN_FIELDS = (
  "dataset",
  "world.",
  "tokenizer.",
  "seq_len",
  "model.",
  "train.optimizer",
  "train.b1",
  "train.b2",
  "train.eps",
  "train.weight_decay",
  "train.adafactor_",
  "train.batch_size",
  "train.seed",
)

# Frozen fields added after checkpoints were written: a saved config without one had this value.
ADDED_FIELD_DEFAULTS = {
  "model.factory": "trackstar_jax.models.factory:decoder_lm",
  "tokenizer.path": "",
  "tokenizer.kind": "",
  "tokenizer.add_bos": None,
  "tokenizer.add_eos": None,
  "tokenizer.bos_token": "",
  "tokenizer.eos_token": "",
}


class _DropOrbaxInfo(logging_std.Filter):
  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def quiet_orbax_logging() -> None:
  """Drops Orbax's INFO lines (dozens per save) from absl logging; idempotent."""
  logger = logging_std.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxInfo) for f in logger.filters):
    logger.addFilter(_DropOrbaxInfo())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints` with our three items."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=options,
    item_handlers=dict(
      params=ocp.StandardCheckpointHandler(),
      opt_state=ocp.StandardCheckpointHandler(),
      meta=ocp.JsonCheckpointHandler(),
    ),
  )


def config_to_dict(config) -> dict[str, Any]:
  """A JSON-normalized plain dict of a ConfigDict (tuples become lists)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(raw, default=str))


def write_config(config, workdir: str) -> str:
  """Writes the resolved config to `<workdir>/config.json` (process 0 only)."""
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
  return path


def make_meta(
  *, step: int, config, dataset_name: str = "", dataset_fingerprint: str = "", tokenizer_path: str = ""
) -> dict[str, Any]:
  return dict(
    step=int(step),
    config=config_to_dict(config),
    dataset=dict(name=dataset_name, fingerprint=dataset_fingerprint),
    tokenizer_path=tokenizer_path,
  )


def save(
  manager: ocp.CheckpointManager, *, step: int, params, opt_state, meta: dict[str, Any], wait: bool = False
) -> None:
  """Saves one checkpoint (asynchronously unless `wait`); every process calls it."""
  meta = dict(meta, step=int(step))
  manager.save(
    int(step),
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta),
    ),
    force=True,
  )
  if wait:
    manager.wait_until_finished()


def latest_step(workdir: str) -> int | None:
  """The newest checkpointed step in `<workdir>/checkpoints`, or None."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  return make_manager(workdir, read_only=True).latest_step()


def _resolve_step(manager, workdir: str, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(
      f"No checkpoint in {checkpoint_dir(workdir)!r}: train a model into this workdir first"
      " (python -m launch.train --config=... --workdir=...) or pass the right --workdir."
    )
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint for step {step} in {checkpoint_dir(workdir)!r}; have {sorted(steps)}.")
  return int(step)


def _default_sharding() -> jax.sharding.Sharding:
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("replica",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract(tree, sharding) -> Any:
  """ShapeDtypeStructs with shardings from arrays/abstract arrays/metadata."""
  if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
    sharding = sharding(tree)  # e.g. sharding.param_shardings of the saved shapes
  sharding = sharding or _default_sharding()
  if not isinstance(sharding, jax.sharding.Sharding):  # a pytree of shardings
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)

  def one(x):
    s = getattr(x, "sharding", None)
    if not isinstance(s, jax.sharding.Sharding):
      s = sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree.map(one, tree)


@dataclasses.dataclass
class Checkpoint:
  """A restored checkpoint; `opt_state` is None unless it was asked for."""

  step: int
  params: Any
  opt_state: Any
  meta: dict[str, Any]


def restore(
  workdir: str,
  *,
  step: int | None = None,
  abstract_params=None,
  abstract_opt_state=None,
  restore_opt_state: bool = True,
  sharding=None,
  opt_sharding=None,
) -> Checkpoint:
  """Restores params (+ optimizer state) and metadata from `workdir`.

  Args:
    workdir: the training workdir (holding `checkpoints/`).
    step: which step; default the latest.
    abstract_params: target tree (`jax.eval_shape(model.init, ...)` or real
      arrays); default: the saved structure (nested dicts).
    abstract_opt_state: target optimizer state tree, e.g.
      `jax.eval_shape(make_optimizer(cfg.train).init, params)`; needed to get
      optax NamedTuples back (without it the raw saved structure is returned).
    restore_opt_state: False restores params and meta only.
    sharding: a Sharding for every leaf or a pytree of them matching the
      targets, or a function from the target tree (its leaves have `.shape`)
      to such a pytree (`lambda t: sharding.from_config(t, config, mesh)`);
      leaves of the targets that carry a sharding keep it. Default:
      replicated over all devices.
    opt_sharding: the optimizer state's (a Sharding or a pytree matching it,
      e.g. `sharding.opt_state_shardings`); default: `sharding` when that is
      one Sharding, else replicated.

  Raises:
    FileNotFoundError: no checkpoint (or not that step) under the workdir.
  """
  manager = make_manager(workdir, read_only=True)
  step = _resolve_step(manager, workdir, step)
  metadata = manager.item_metadata(step)
  if abstract_params is None:
    abstract_params = metadata["params"]
  args = dict(params=ocp.args.StandardRestore(_abstract(abstract_params, sharding)), meta=ocp.args.JsonRestore())
  if restore_opt_state:
    target = metadata["opt_state"] if abstract_opt_state is None else abstract_opt_state
    if opt_sharding is None:
      opt_sharding = sharding if isinstance(sharding, jax.sharding.Sharding) else None
    args["opt_state"] = ocp.args.StandardRestore(_abstract(target, opt_sharding))
  out = manager.restore(step, args=ocp.args.Composite(**args))
  logging.info("Restored step %d from %s", step, checkpoint_dir(workdir))
  return Checkpoint(step=step, params=out["params"], opt_state=out.get("opt_state"), meta=dict(out["meta"]))


def restore_params(workdir: str, *, step: int | None = None, abstract_params=None, sharding=None) -> Any:
  """Params only (e.g. for encoding or evaluation)."""
  return restore(workdir, step=step, abstract_params=abstract_params, restore_opt_state=False, sharding=sharding).params


def load_meta(workdir: str, *, step: int | None = None) -> dict[str, Any]:
  """The JSON metadata of a checkpoint (default: the latest)."""
  manager = make_manager(workdir, read_only=True)
  step = _resolve_step(manager, workdir, step)
  return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _frozen(key: str, frozen: Iterable[str]) -> bool:
  return any(
    key == f or (f.endswith(".") and key.startswith(f)) or (f.endswith("_") and key.startswith(f)) for f in frozen
  )


def config_differences(saved_config: dict[str, Any], config, *, frozen: Iterable[str] = FROZEN_FIELDS) -> list[str]:
  """Frozen fields whose values differ, as 'field: saved -> new' lines."""
  old = _flatten(saved_config)
  new = _flatten(config_to_dict(config))
  diffs = []
  for key in (set(ADDED_FIELD_DEFAULTS) & set(new)) - set(old):
    old[key] = ADDED_FIELD_DEFAULTS[key]
  for key in sorted(set(old) | set(new)):
    if _frozen(key, frozen) and old.get(key, "<unset>") != new.get(key, "<unset>"):
      diffs.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
  return diffs


def check_compatible(
  meta: dict[str, Any], config, *, workdir: str = "", dataset_fingerprint: str | None = None
) -> None:
  """Raises ValueError listing every frozen field that differs from `meta`.

  `dataset_fingerprint` (of the dataset loaded now) is compared with the one
  the checkpoint was trained on.
  """
  diffs = config_differences(meta.get("config", {}), config)
  saved_fp = meta.get("dataset", {}).get("fingerprint", "")
  if dataset_fingerprint is not None and saved_fp and saved_fp != dataset_fingerprint:
    diffs.append(f"dataset fingerprint: {saved_fp[:12]}... -> {dataset_fingerprint[:12]}... (corpus content changed)")
  if diffs:
    raise ValueError(
      f"Cannot resume in {workdir or 'this workdir'!r}: its checkpoint was written with an incompatible config."
      " Differing fields:\n  " + "\n  ".join(diffs) + "\nUse a new --workdir, or restore these values."
    )


def params_fingerprint(params: Any) -> str:
  """What identifies a checkpoint by content: a hash of every parameter's path, shape, dtype and moments.

  Stores and Hessians record it instead of the workdir's path, so a moved or
  copied workdir keeps its encodings, and a different checkpoint is refused.
  Cheap at any size (one device-side sum and sum of squares per leaf; works on
  sharded arrays).
  """
  import hashlib  # pylint: disable=g-import-not-at-top

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])):
    x = jnp.asarray(leaf, jnp.float32)
    moments = np.asarray(jax.device_get(jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.ravel(x)[0]])), np.float64)
    # 5 significant digits: the same on every device count and backend despite float32 summation order.
    digits = ",".join(np.format_float_scientific(v, precision=4) for v in moments)
    h.update(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype}:{digits};".encode())
  return "params-sha256:" + h.hexdigest()[:32]
