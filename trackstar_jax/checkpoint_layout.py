"""An Orbax checkpoint laid out the user's way: the params and the optimizer state found by name.

  where = locate("/ckpts/run7", "state/params", step=None)    # latest step of a CheckpointManager dir
  where.item_dir, where.keys                                  # ".../1000/state", ("params",)
  params = restore_subtree(where)                             # only that subtree is read (partial restore)

A name is a '/'-joined path: leading components name directories (a
CheckpointManager's step folder is chosen first, then an item such as
`state/` or `params/`, i.e. a folder holding Orbax's `_METADATA`), the rest
are keys inside that item's tree (dict keys, or list indices as digits). So

  checkpoint.path = "/ckpts/run7", params = "state/params", opt_state = "state/opt_state"
      a CheckpointManager with one item `state` = {"params": ..., "opt_state": ...}
  params = "params", opt_state = "opt_state"
      two items (this project's own layout), or one PyTree with those two keys
  checkpoint.path = "/ckpts/run7/1000/state", params = "params"
      a PyTree checkpoint directory given directly

Errors name what is there: the step folders, the items of a step, the keys
at the level where a name stops matching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import os
from typing import Any

from absl import logging
import jax
import numpy as np

_ITEM_MARKER = "_METADATA"  # what an Orbax PyTree checkpoint directory holds


@dataclasses.dataclass(frozen=True)
class Location:
  """Where a named subtree lives: an Orbax PyTree item directory and the keys inside its tree."""

  path: str  # the checkpoint path as configured
  name: str  # the configured '/'-joined name
  step: int | None  # the CheckpointManager step (None: a single checkpoint)
  item_dir: str
  keys: tuple[str, ...]


def steps(path: str) -> list[int]:
  """The step folders of a CheckpointManager directory (digits only), sorted."""
  return sorted(int(s) for s in os.listdir(path) if s.isdigit() and os.path.isdir(os.path.join(path, s)))


def _is_item(d: str) -> bool:
  return os.path.isfile(os.path.join(d, _ITEM_MARKER))


def _listing(d: str) -> str:
  names = sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []
  return ", ".join(names[:30]) + (" ..." if len(names) > 30 else "") or "nothing"


def locate(path: str, name: str, *, step: int | None = None) -> Location:
  """Finds item directory and keys of `name` ("state/params") in the checkpoint at `path`.

  Args:
    path: an Orbax CheckpointManager directory (step folders), one step's
      folder, or a PyTree checkpoint directory.
    name: '/'-joined: item folders, then keys inside the item's tree.
    step: the step of a CheckpointManager directory (None or -1: the latest).

  Raises:
    FileNotFoundError: no such checkpoint, step or item (listing what exists).
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint directory at {path!r} (checkpoint.path).")
  d, chosen = path, None
  if not _is_item(d):
    have = steps(d)
    if have:
      chosen = have[-1] if step in (None, -1) else int(step)
      if chosen not in have:
        raise FileNotFoundError(f"No step {chosen} in checkpoint {path!r} (checkpoint.step); its steps: {have}.")
      d = os.path.join(d, str(chosen))
  parts = [p for p in name.split("/") if p]
  while parts and not _is_item(d) and os.path.isdir(os.path.join(d, parts[0])):
    d = os.path.join(d, parts.pop(0))
  if not _is_item(d):
    raise FileNotFoundError(
      f"{name!r} names no Orbax item in checkpoint {path!r}: {d!r} holds {_listing(d)} (no {_ITEM_MARKER} file, so "
      "it is not a PyTree checkpoint). Name the item folder first, e.g. 'state/params' for an item 'state' "
      "holding a 'params' key."
    )
  return Location(path=path, name=name, step=chosen, item_dir=d, keys=tuple(parts))


def item_metadata(item_dir: str) -> Any:
  """The tree of array metadata (shape, dtype) of a PyTree checkpoint item."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  meta = ocp.PyTreeCheckpointer().metadata(item_dir)
  return getattr(getattr(meta, "item_metadata", meta), "tree", meta)


def _child(node: Any, key: str) -> Any:
  if isinstance(node, Mapping) and key in node:
    return node[key]
  if isinstance(node, (list, tuple)) and key.isdigit() and int(key) < len(node):
    return node[int(key)]
  raise KeyError(key)


def _keys_of(node: Any) -> list[str]:
  if isinstance(node, Mapping):
    return sorted(str(k) for k in node)
  if isinstance(node, (list, tuple)):
    return [str(i) for i in range(len(node))]
  return []


def subtree_metadata(where: Location) -> Any:
  """The metadata tree at `where.keys` inside the item; ValueError lists the keys where the name stops matching."""
  node, walked = item_metadata(where.item_dir), []
  for key in where.keys:
    try:
      node = _child(node, key)
    except KeyError:
      at = "/".join(walked) or "the top level"
      raise ValueError(
        f"{where.name!r} is not in checkpoint {where.item_dir!r}: no key {key!r} at {at}; the keys there are "
        f"{_keys_of(node) or '(none: a leaf)'}."
      ) from None
    walked.append(key)
  return node


def _nest(keys: tuple[str, ...], tree: Any, like: Any) -> Any:
  """`tree` placed at `keys` in a skeleton of `like` (lists keep their length; other entries None)."""
  if not keys:
    return tree
  key, rest = keys[0], keys[1:]
  if isinstance(like, (list, tuple)):
    out = [None] * len(like)
    out[int(key)] = _nest(rest, tree, like[int(key)])
    return out
  return {key: _nest(rest, tree, like[key])}


def _unnest(keys: tuple[str, ...], tree: Any) -> Any:
  for key in keys:
    tree = _child(tree, key)
  return tree


def _is_array_meta(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def restore_subtree(
  where: Location,
  *,
  prune: Callable[[Any], Any] | None = None,
  sharding: jax.sharding.Sharding | None = None,
  place: Callable[[Any], Any] | None = None,
) -> Any:
  """Reads only the subtree at `where` (Orbax partial restore), as a raw tree of arrays.

  Args:
    where: from `locate`.
    prune: metadata subtree -> the part of it to read (None entries are skipped),
      e.g. `optimizer_correction`'s second moments only. Default: all of it.
    sharding: where to place the arrays (default: replicated on all devices).
    place: instead, the abstract subtree (ShapeDtypeStructs) -> a matching tree of
      shardings, e.g. optimizer moments sharded like their parameters.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  full = item_metadata(where.item_dir)
  sub = subtree_metadata(where)
  if prune is not None:
    sub = prune(sub)
  if sharding is None:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("replica",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding) if _is_array_meta(m) else m,
    sub,
    is_leaf=_is_array_meta,
  )
  if place is not None:
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), target, place(target))
  item = _nest(where.keys, target, full)
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape), item)
  state = ocp.PyTreeCheckpointer().restore(
    where.item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  )
  logging.info("Restored %r from %s", where.name, where.item_dir)
  return _unnest(where.keys, state)
