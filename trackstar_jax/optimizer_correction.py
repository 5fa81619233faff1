"""Optimizer second-moment correction g' = g / sqrt(V), read from optax state.

The second moments are found by type or structure, anywhere in the state
tree (inside `optax.chain`, `inject_hyperparams`, `masked`,
`multi_transform`, `MultiSteps`, ...), never by position. Flax NNX states
(`nnx.Optimizer(...).opt_state`, `nnx.Variable` leaves) are unwrapped first,
so their paths are the params' attribute paths:

  adam       optax `ScaleByAdamState` (or a restored dict with `count`, `nu`):
             g' = g / (sqrt(nu / bc) + eps), bc = 1 - b2^count when
             `bias_correction` (else bc = 1). Element-wise, so the encoder
             forms each layer's per-example gradient (see gradients.py).
  adam_rank1 Adam's nu replaced by its Adafactor-style rank-1 fit on the
             kernel's matrix view, V ~ r c^T / mean(r) with r, c the row and
             column means of (nu / bc + eps^2): an approximation that keeps
             Adam on the fused path (exact when nu is rank-1, up to eps).
  adafactor  optax `FactoredState` (`v_row`, `v_col`, `v`), optax's own update
             rule: for a factored kernel with `d1, d0` its two largest axes
             (np.argsort order, as optax), g' = g * (v_row / mean_{d1}(v_row))
             ^-1/2 [broadcast over d0] * v_col^-1/2 [broadcast over d1]. For a
             3-axis kernel the third axis is a batch axis of both factors; the
             encoder handles that (the factor is not rank-1 in the matrix
             view). Unfactored kernels (small axes) use g * v^-1/2 element-wise.
  auto       per parameter, adam or adafactor by what the state holds.
  none       g' = g.

A correction is a product of `Factor`s per traced kernel: arrays spanning a
subset of the kernel's axes. The encoder folds factors that span only input
(or only output) axes into the projection matrices; the rest are applied in
the fused or per-layer path.

Public API:
  find_second_moments(opt_state) -> SecondMoments
  make_correction(*, kind, layouts, opt_state=None, eps=1e-8,
                  bias_correction=False, b2=None) -> Correction
  restore_second_moments(workdir, *, step=None, paths=None, sharding=None)
      partial Orbax restore of only the second-moment subtrees (this project's layout);
  restore_second_moments_at(checkpoint_layout.locate(path, "state/opt_state"), paths=None)
      the same from any Orbax checkpoint layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
import os
import re
import sys
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax import checkpoint_layout, projection

KINDS = ("none", "adam", "adam_rank1", "adafactor", "auto")
SUPPORTED_STATES = (
  "optax ScaleByAdamState (adam, adamw, ...; fields count/mu/nu) and optax FactoredState "
  "(adafactor / scale_by_factored_rms; fields count/v_row/v_col/v), possibly nested in chain, "
  "inject_hyperparams, masked, multi_transform or MultiSteps states"
)
_ADAM_KEYS = {"count", "nu"}
_FACTORED_KEYS = {"count", "v_row", "v_col", "v"}


@dataclasses.dataclass(frozen=True)
class Factor:
  """A correction factor over some kernel axes: values.shape = shape[axes]."""

  values: jax.Array
  axes: tuple[int, ...]


@dataclasses.dataclass
class SecondMoments:
  """Second moments per canonical parameter path, as found in a state tree."""

  adam: dict[str, tuple[Any, Any, dict]]  # path -> (nu, count, hyperparams)
  factored: dict[str, tuple[Any, Any, Any]]  # path -> (v_row, v_col, v)
  seen_types: list[str]


def _fields(node) -> dict[str, Any] | None:
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    return dict(zip(node._fields, node))
  if isinstance(node, Mapping):
    return {str(k): v for k, v in node.items()}
  return None


def _scalar(x):
  try:
    return float(np.asarray(x))
  except (TypeError, ValueError):
    return None


def _unwrap_nnx(opt_state: Any) -> Any:
  """An NNX optimizer state with its `nnx.Variable` wrappers replaced by their values.

  `nnx.Optimizer(model, tx, wrt=nnx.Param).opt_state` holds optax states whose
  leaves are `OptVariable`s (and `tx.init(nnx.state(model, nnx.Param))` holds
  `Param`s): as pytrees their key paths end in `.value`. Unwrapped, the
  `nnx.State` mappings keep the attribute paths of the params
  (`blocks/0/attn/query/kernel`), as `nnx.to_pure_dict` and
  `nnx_adapter.functional` give them. An `nnx.Optimizer` itself stands for its
  `opt_state`.
  """
  nnx = sys.modules.get("flax.nnx")  # not imported: no NNX state can exist (Linen users skip the import)
  if nnx is None:
    return opt_state
  if isinstance(opt_state, nnx.Optimizer):
    opt_state = opt_state.opt_state
  is_variable = lambda x: isinstance(x, nnx.Variable)
  if not any(is_variable(l) for l in jax.tree.leaves(opt_state, is_leaf=is_variable)):
    return opt_state
  return jax.tree.map(lambda x: x.value if is_variable(x) else x, opt_state, is_leaf=is_variable)


def find_second_moments(opt_state: Any) -> SecondMoments:
  """Walks an optax state (NamedTuples, a raw restored dict/list tree, or an NNX optimizer state)."""
  out = SecondMoments(adam={}, factored={}, seen_types=[])
  opt_state = _unwrap_nnx(opt_state)

  def add(table, path, value):
    if path in table:
      raise ValueError(f"Two second-moment states for parameter {path!r}: ambiguous optimizer state.")
    table[path] = value

  def walk(node, hyper):
    fields = _fields(node)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      out.seen_types.append(type(node).__name__)
    if fields is not None and set(fields) >= _ADAM_KEYS and not set(fields) >= _FACTORED_KEYS:
      for path, nu in projection.flatten_paths(fields["nu"]).items():
        add(out.adam, projection.canonical_path(path), (nu, fields["count"], hyper))
      return
    if fields is not None and set(fields) >= _FACTORED_KEYS:
      rows = projection.flatten_paths(fields["v_row"])
      cols = projection.flatten_paths(fields["v_col"])
      full = projection.flatten_paths(fields["v"])
      for path in rows:
        add(out.factored, projection.canonical_path(path), (rows[path], cols[path], full[path]))
      return
    if fields is not None:
      if "hyperparams" in fields and isinstance(fields["hyperparams"], Mapping):
        hyper = dict(hyper, **{k: _scalar(v) for k, v in fields["hyperparams"].items()})
      for value in fields.values():
        walk(value, hyper)
    elif isinstance(node, (list, tuple)):
      for value in node:
        walk(value, hyper)

  walk(opt_state, {})
  return out


def supported_kinds(found: SecondMoments) -> tuple[str, ...]:
  """The `encoder.correction` values that a state with these second moments supports."""
  kinds = ["none"]
  if found.adam:
    kinds += ["adam", "adam_rank1"]
  if found.factored:
    kinds += ["adafactor"]
  if found.adam or found.factored:
    kinds += ["auto"]
  return tuple(kinds)


def _not_found(kind: str, found: SecondMoments) -> ValueError:
  seen = sorted(set(found.seen_types)) or ["no optax state types"]
  need = (
    "Adafactor's factored second moments (v_row/v_col)"
    if kind == "adafactor"
    else ("Adam's second moments (nu)" if kind in ("adam", "adam_rank1") else "second moments")
  )
  has = []
  if found.adam:
    has.append(f"Adam's nu for {len(found.adam)} parameters")
  if found.factored:
    has.append(f"Adafactor's factored moments for {len(found.factored)} parameters")
  holds = ("it holds " + " and ".join(has)) if has else "it holds none of the supported kinds"
  usable = ", ".join(repr(k) for k in supported_kinds(found))
  return ValueError(
    f"encoder.correction={kind!r} needs {need}, but the checkpoint's optimizer state does not have them: {holds}"
    f" (state types: {', '.join(seen)}). This checkpoint supports encoder.correction in {{{usable}}}"
    f" ('none' = no correction). Supported optimizer states: {SUPPORTED_STATES}."
  )


@dataclasses.dataclass
class Correction:
  """1/sqrt(V) per traced kernel as a product of `Factor`s."""

  kind: str
  factors: dict[str, tuple[Factor, ...]]  # canonical path -> factors
  shapes: dict[str, tuple[int, ...]]

  def get(self, path: str) -> tuple[Factor, ...]:
    return self.factors.get(projection.canonical_path(path), ())

  def elementwise(self, path: str) -> jax.Array | None:
    """The full [*kernel_shape] multiplier (None when there is no correction)."""
    path = projection.canonical_path(path)
    factors = self.get(path)
    if not factors:
      return None
    shape = self.shapes[path]
    total = jnp.ones(shape, jnp.float32)
    for f in factors:
      expanded = jnp.expand_dims(f.values, [a for a in range(len(shape)) if a not in f.axes])
      total = total * expanded
    return total

  def apply(self, path: str, grad: jax.Array) -> jax.Array:
    """grad [..., *kernel_shape] -> corrected grad (float32)."""
    mult = self.elementwise(path)
    return grad.astype(jnp.float32) if mult is None else grad.astype(jnp.float32) * mult


def _check_shape(path, what, got, want):
  if tuple(got) != tuple(want):
    raise ValueError(
      f"Optimizer state {what} for parameter {path!r} has shape {tuple(got)}, but the parameter has shape"
      f" {tuple(want)}: the checkpoint's optimizer state does not match the model/params being encoded."
    )


def _adam_factors(path, layout, nu, count, hyper, *, eps, bias_correction, b2, rank1):
  shape = layout.shape
  _check_shape(path, "nu", np.shape(nu), shape)
  nu = jnp.asarray(nu, jnp.float32)
  eps = hyper.get("eps", eps) if hyper.get("eps") is not None else eps
  if bias_correction:
    b2 = hyper.get("b2") if hyper.get("b2") is not None else b2
    if b2 is None:
      raise ValueError("encoder.bias_correction needs Adam's b2: set encoder.b2 (or train.b2).")
    count = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
    nu = nu / (1.0 - jnp.float32(b2) ** count)
  if not rank1:
    return (Factor(1.0 / (jnp.sqrt(nu) + eps), tuple(range(len(shape)))),)
  mat = layout.as_matrix(nu) + jnp.float32(eps) ** 2  # [n, m]
  r, c = jnp.mean(mat, axis=1), jnp.mean(mat, axis=0)
  in_shape = tuple(shape[a] for a in layout.in_axes)
  out_shape = tuple(shape[a] for a in layout.out_axes)
  return (
    Factor((r**-0.5).reshape(in_shape), layout.in_axes),
    Factor(((c / jnp.mean(r)) ** -0.5).reshape(out_shape), layout.out_axes),
  )


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int]:
  """(d1, d0): the second-largest and largest axes, in optax's argsort order."""
  order = np.argsort(shape)
  return int(order[-2]), int(order[-1])


def _adafactor_factors(path, layout, v_row, v_col, v, *, tiny=1e-30):
  shape = layout.shape
  if tuple(np.shape(v)) == tuple(shape) and np.size(v_row) <= 1:
    return (Factor(jnp.maximum(jnp.asarray(v, jnp.float32), tiny) ** -0.5, tuple(range(len(shape)))),)
  d1, d0 = factored_dims(shape)
  without = lambda axis: tuple(s for a, s in enumerate(shape) if a != axis)
  _check_shape(path, "v_row", np.shape(v_row), without(d0))
  _check_shape(path, "v_col", np.shape(v_col), without(d1))
  v_row = jnp.maximum(jnp.asarray(v_row, jnp.float32), tiny)
  v_col = jnp.maximum(jnp.asarray(v_col, jnp.float32), tiny)
  reduced_d1 = d1 - 1 if d1 > d0 else d1
  row = (v_row / jnp.mean(v_row, axis=reduced_d1, keepdims=True)) ** -0.5
  axes = lambda skip: tuple(a for a in range(len(shape)) if a != skip)
  return (Factor(row, axes(d0)), Factor(v_col**-0.5, axes(d1)))


def make_correction(
  *,
  kind: str,
  layouts: Mapping[str, projection.KernelLayout],
  opt_state: Any = None,
  eps: float = 1e-8,
  bias_correction: bool = False,
  b2: float | None = None,
) -> Correction:
  """Builds the correction of every traced kernel from an optax state.

  Args:
    kind: one of KINDS (config `encoder.correction`).
    layouts: canonical path -> KernelLayout of each traced kernel.
    opt_state: the optimizer state (optax NamedTuples, the raw tree of
      `restore_second_moments`, or an NNX `nnx.Optimizer` / its `opt_state`);
      unused for kind 'none'.
    eps: Adam's epsilon (overridden by an `inject_hyperparams` eps).
    bias_correction: divide nu by 1 - b2^count.
    b2: Adam's b2 (overridden by an `inject_hyperparams` b2).

  Raises:
    ValueError: unknown kind, no/unsupported second moments, a traced
      parameter without a second moment, or mismatched shapes.
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown encoder.correction {kind!r}; supported: {KINDS}.")
  layouts = {projection.canonical_path(p): l for p, l in layouts.items()}
  shapes = {p: l.shape for p, l in layouts.items()}
  if kind == "none":
    return Correction(kind, {}, shapes)
  if opt_state is None:
    raise ValueError(f"encoder.correction={kind!r} needs the optimizer state (opt_state=...).")
  found = find_second_moments(opt_state)
  want_adam = kind in ("adam", "adam_rank1")
  if (
    (want_adam and not found.adam)
    or (kind == "adafactor" and not found.factored)
    or (kind == "auto" and not (found.adam or found.factored))
  ):
    raise _not_found(kind, found)
  factors = {}
  for path, layout in layouts.items():
    if path in found.adam and kind in ("adam", "adam_rank1", "auto"):
      nu, count, hyper = found.adam[path]
      factors[path] = _adam_factors(
        path, layout, nu, count, hyper, eps=eps, bias_correction=bias_correction, b2=b2, rank1=kind == "adam_rank1"
      )
    elif path in found.factored and kind in ("adafactor", "auto"):
      factors[path] = _adafactor_factors(path, layout, *found.factored[path])
    else:
      have = sorted(found.adam if want_adam else found.factored)
      raise ValueError(
        f"The optimizer state has no {kind} second moment for traced parameter {path!r}. It has second"
        f" moments for: {have[:20]}{' ...' if len(have) > 20 else ''}. Check encoder.param_regex and that the"
        " checkpoint belongs to this model."
      )
  if kind == "auto":  # name what was found, so stores and logs record the concrete correction
    used = {"adam" if p in found.adam else "adafactor" for p in factors}
    kind = used.pop() if len(used) == 1 else "auto"
  logging.info("Optimizer correction %r for %d traced kernels.", kind, len(factors))
  return Correction(kind, factors, shapes)


# ----------------------------------------------------------------------------
# Partial restore from an Orbax checkpoint (<workdir>/checkpoints/<step>/opt_state).


def _prune(meta: Any, keep_path: Any, prefix: str = "") -> Any:
  """The raw metadata tree reduced to second-moment subtrees (None elsewhere)."""
  fields = meta if isinstance(meta, Mapping) else None
  if fields is not None and set(fields) >= _FACTORED_KEYS:
    return {k: fields[k] for k in ("count", "v_row", "v_col", "v")}  # count: how the state is recognised
  if fields is not None and set(fields) >= _ADAM_KEYS:
    nu = _filter_paths(fields["nu"], keep_path)
    return {"count": fields["count"], "nu": nu}
  if fields is not None:
    out = {}
    for k, v in fields.items():
      if k == "hyperparams" and isinstance(v, Mapping):
        out[k] = dict(v)
      else:
        sub = _prune(v, keep_path)
        if sub is not None:
          out[k] = sub
    return out or None
  if isinstance(meta, (list, tuple)):
    items = [_prune(v, keep_path) for v in meta]
    return items if any(i is not None for i in items) else None
  return None


def _filter_paths(tree: Any, keep_path) -> Any:
  if keep_path is None or not isinstance(tree, Mapping):
    return tree

  def rec(node, prefix):
    if isinstance(node, Mapping):
      out = {k: rec(v, f"{prefix}{k}/") for k, v in node.items()}
      return {k: v for k, v in out.items() if v is not None} or None
    return node if keep_path(prefix[:-1]) else None

  return rec(tree, "") or {}


def _moment_paths(meta: Any, prefix: str = "") -> list[str]:
  """'/'-joined parameter paths (as `paths` sees them) of every second moment in a raw state tree."""
  fields = meta if isinstance(meta, Mapping) else None
  if fields is not None and (set(fields) >= _ADAM_KEYS or set(fields) >= _FACTORED_KEYS):
    tree = fields["v_row"] if set(fields) >= _FACTORED_KEYS else fields["nu"]
    out = []

    def rec(node, pre):
      if isinstance(node, Mapping):
        for k, v in node.items():
          rec(v, f"{pre}{k}/")
      elif node is not None:
        out.append(pre[:-1])

    rec(tree, "")
    return out
  children = fields.values() if fields is not None else meta if isinstance(meta, (list, tuple)) else ()
  return [p for child in children for p in _moment_paths(child)]


def _check_paths(meta: Any, keep_path, paths: Any, item_dir: str) -> None:
  """Refuses `paths` that select none of the checkpoint's second moments (or name absent ones)."""
  if keep_path is None:
    return
  have = sorted(set(_moment_paths(meta)))
  if not have:
    return  # reported below: no second moments at all
  shown = ", ".join(have[:10]) + (f", ... ({len(have)} in all)" if len(have) > 10 else "")
  if isinstance(paths, str):
    if not any(map(keep_path, have)):
      raise ValueError(
        f"encoder.param_regex {paths!r} matches none of the {len(have)} parameters that have second moments in"
        f" {item_dir!r}. Their paths: {shown}. Fix encoder.param_regex (it is searched in these '/'-joined"
        " paths), or check that the checkpoint belongs to this model."
      )
    return
  canon = {projection.canonical_path(p) for p in have}
  absent = sorted(p for p in paths if projection.canonical_path(p) not in canon)
  if absent:
    raise ValueError(
      f"No second moments in {item_dir!r} for parameters {absent[:10]}. Parameters that have them: "
      f"{shown}. Check encoder.param_regex and that the checkpoint belongs to this model."
    )


def _keep_path(paths: Iterable[str] | str | None):
  if isinstance(paths, str):
    return lambda p, rx=re.compile(paths): bool(rx.search(p))
  if paths is not None:
    wanted = {projection.canonical_path(p) for p in paths}
    return lambda p: projection.canonical_path(p) in wanted
  return None


def restore_second_moments_at(
  where: checkpoint_layout.Location,
  *,
  paths: Iterable[str] | str | None = None,
  sharding: jax.sharding.Sharding | None = None,
  param_sharding: Any = None,
) -> Any:
  """Restores only the second moments of the optimizer state at `where` (any Orbax layout).

  `where` is `checkpoint_layout.locate(path, "state/opt_state", step=...)`:
  the subtree may be an optax state nested any way (chain, inject_hyperparams,
  masked, multi_transform, MultiSteps). Adam's `nu` (+ `count`) and
  Adafactor's `v_row/v_col/v` are read, nothing else; `paths` (canonical
  paths, or a regex) limits Adam's `nu` to the traced parameters.

  Returns:
    The raw state tree (dicts/lists, None where nothing was read) for
    `make_correction(opt_state=...)`.
  """
  keep_path = _keep_path(paths)
  meta = checkpoint_layout.subtree_metadata(where)
  label = where.item_dir + ("/" + "/".join(where.keys) if where.keys else "")
  _check_paths(meta, keep_path, paths, label)
  if _prune(meta, keep_path) is None:
    raise ValueError(f"No second moments in {label!r}. Supported: {SUPPORTED_STATES}.")
  place = None
  if param_sharding is not None:
    from trackstar_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top  (it imports this module)

    mesh = jax.tree.leaves(param_sharding)[0].mesh
    place = lambda item: sharding_lib.opt_state_shardings(item, param_sharding, mesh)  # noqa: E731
  state = checkpoint_layout.restore_subtree(where, prune=lambda m: _prune(m, keep_path), sharding=sharding, place=place)
  logging.info("Restored second moments from %s", label)
  return state


def restore_second_moments(
  workdir: str,
  *,
  step: int | None = None,
  paths: Iterable[str] | str | None = None,
  sharding: jax.sharding.Sharding | None = None,
  param_sharding: Any = None,
) -> tuple[int, Any]:
  """Restores only the optimizer's second moments from a training workdir of this project.

  Reads `<workdir>/checkpoints/<step>/opt_state` (the layout of
  `trackstar_jax.checkpointing`) with an Orbax partial restore
  (`restore_second_moments_at`, which says what `sharding` and `param_sharding` do; other layouts:
  `checkpoint_layout.locate`).

  Returns:
    (step, raw state tree): dicts/lists, None where nothing was restored;
    pass it to `make_correction(opt_state=...)`.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {ckpt_dir!r}: pass the training --workdir.")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint for step {step} in {ckpt_dir!r}; have {steps}.")
  where = checkpoint_layout.Location(
    path=ckpt_dir, name="opt_state", step=step, item_dir=os.path.join(ckpt_dir, str(step), "opt_state"), keys=()
  )
  return step, restore_second_moments_at(where, paths=paths, sharding=sharding, param_sharding=param_sharding)
