"""Device mesh from config, multi-host start-up and helpers, and batch sharding.

The mesh is declared in the config as axis (name, size) pairs, -1 meaning
"all remaining devices": `(("data", -1),)` or `(("data", -1), ("model", 2))`.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import math
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

# shard_map without the replication check: the per-device bodies return per-device partials on purpose.
if hasattr(jax, "shard_map"):
  shard_map = functools.partial(jax.shard_map, check_vma=False)
else:  # older jax
  from jax.experimental.shard_map import shard_map as _experimental_shard_map  # pylint: disable=g-import-not-at-top

  shard_map = functools.partial(_experimental_shard_map, check_rep=False)


def maybe_initialize_distributed(*, force: bool = False) -> None:
  """Starts `jax.distributed` when asked or when the environment says so.

  Explicit: `--distributed` flag (force=True), or env JAX_COORDINATOR_ADDRESS +
  JAX_NUM_PROCESSES + JAX_PROCESS_ID (our launch scripts set these). Cloud TPU
  and SLURM environments are auto-detected by `jax.distributed.initialize()`.
  """
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(
      coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(env["JAX_NUM_PROCESSES"]),
      process_id=int(env["JAX_PROCESS_ID"]),
    )
  elif force:
    jax.distributed.initialize()
  logging.info(
    "process %d/%d, local devices %d, global devices %d (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )


def mesh_shape(axes: Sequence[tuple[str, int]], n_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves -1 in mesh axes against the device count.

  Raises:
    ValueError: the axes' sizes do not multiply to the device count (or, with a -1, do not divide it), a
      size is 0 or below -1, or more than one axis is -1; the message names the axes and the device count.
  """
  names = tuple(str(a) for a, _ in axes)
  sizes = [int(s) for _, s in axes]
  shown = ", ".join(f"{n}={s}" for n, s in zip(names, sizes))
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh {tuple(axes)} names an axis twice.")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh ({shown}): sizes must be positive, with at most one -1 (= the rest).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(
        f"config.mesh ({shown}) does not divide the {n_devices} devices: the fixed axes need a multiple of"
        f" {known} devices. Use sizes whose product divides {n_devices}."
      )
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(
      f"config.mesh ({shown}) needs {math.prod(sizes)} devices, but there are {n_devices}"
      f" ({jax.process_count()} process(es)): make the sizes multiply to {n_devices}, or use -1 for one axis."
    )
  return names, tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),), devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(axes, len(devices))
  return Mesh(np.asarray(devices).reshape(sizes), names)


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis split over the mesh's "data" axis, the rest replicated."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this host's slice of a global batch on the mesh's data axis.

  Each process passes its own rows (global_batch / process_count of them);
  the result is one global array per field.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    sharding = data_sharding(mesh, value.ndim)
    if jax.process_count() == 1:
      out[key] = jax.device_put(value, sharding)
    else:
      out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


# ----------------------------------------------------------------------------
# Multi-host helpers (no-ops in one process).


def is_chief() -> bool:
  """True on process 0, the one that writes shared files."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def allgather(x: np.ndarray) -> np.ndarray:
  """[n, ...] from every process -> [process_count * n, ...] (process order)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  out = np.asarray(multihost_utils.process_allgather(x, tiled=False))
  return out.reshape((-1,) + out.shape[2:])


def allgather_object(obj: Any) -> list[Any]:
  """A JSON-serializable object from every process -> [process 0's, process 1's, ...] on every process.

    texts = mesh_lib.allgather_object([[i, corpus.text_of(i)] for i in mine])   # collective

  For small metadata (what a host knows of its slice), not arrays. The object
  goes through JSON in one process too, so the result is the same for any
  process count: tuples come back as lists and dict keys as strings.
  """
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  if jax.process_count() == 1:
    parts = [data]
  else:
    sizes = allgather(np.asarray([data.size], np.int64))
    padded = np.zeros((1, int(sizes.max())), np.uint8)
    padded[0, : data.size] = data
    parts = [row[:n] for row, n in zip(allgather(padded), sizes)]
  return [json.loads(np.asarray(part, np.uint8).tobytes().decode()) for part in parts]
