"""Kronecker-factored random projection of per-example gradients, per block.

Every traced weight matrix i (a kernel viewed as input axes x output axes,
`n_i x m_i`) gets two Gaussian matrices

  P_in,i  [n_i, d_in]   entries ~ N(0, 1/d_in)
  P_out,i [m_i, d_out]  entries ~ N(0, 1/d_out)

and the projected gradient of a block b of matrices is

  Phi_b = sum_{i in b} P_in,i^T G'_i P_out,i        [d_in, d_out]
  phi   = concat_b vec(Phi_b)                        [B * d_in * d_out]

so that E[<phi(a), phi(b)>] = <g'(a), g'(b)> (E[P P^T] = I, and matrices of
one block have independent projections). The matrices are a pure function of
(seed, parameter path): `fold_in(key(seed), crc32(path))`, generated with the
threefry PRNG on the host CPU backend, so they are bit-identical on every
host, device kind and run, and are never stored.

Paths are the '/'-joined keys of the variables tree given to the model
(`params/block_0/attn/query/kernel`); the leading `params/` collection name is
dropped for hashing (`canonical_path`), so the same model yields the same
projection whether or not its params are wrapped in a variables dict.

Public API:
  flatten_paths(tree) -> {path: leaf}; keypath_str(jax key path) -> path
  select_paths(tree, *, regex) -> [path]          (error lists the paths)
  canonical_path(path) -> str
  block_key_fn(*, block_regex, layers_per_group) -> Callable[[path], key]
  KernelLayout(shape, in_axes)                     matrix view of a kernel
  projection_matrices(path, *, n, m, d_in, d_out, seed) -> (P_in, P_out)
  ProjectionPlan.create(layouts, *, d_in, d_out, seed, block_fn)
    .dim, .blocks, .block_of[path], .matrices(path), .project(grads) -> phi
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
import dataclasses
import functools
import math
import re
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np

# Default blocks: layer groups x {attn, mlp} of `trackstar_jax.models`.
DEFAULT_BLOCK_REGEX = r"block_(?P<layer>\d+)/(?P<kind>attn|mlp)/"


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def keypath_str(keypath: Sequence[Any]) -> str:
  """A jax key path as an 'a/b/kernel' string."""
  return "/".join(_key_name(k) for k in keypath)


def flatten_paths(tree: Any) -> dict[str, Any]:
  """{'a/b/kernel': leaf} for every leaf of a pytree (dict keys, fields, indices)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {keypath_str(path): leaf for path, leaf in leaves}


def canonical_path(path: str) -> str:
  """The path without a leading `params/` collection name (hash and lookup key)."""
  return path[len("params/") :] if path.startswith("params/") else path


def select_paths(tree: Any, *, regex: str) -> list[str]:
  """Paths of `tree` matching `regex` (re.search), in tree order.

  Raises:
    ValueError: nothing matches; the message lists the available paths.
  """
  paths = list(flatten_paths(tree))
  pattern = re.compile(regex)
  selected = [p for p in paths if pattern.search(p)]
  if not selected:
    shown = "\n  ".join(paths[:200]) + ("\n  ..." if len(paths) > 200 else "")
    raise ValueError(f"encoder.param_regex {regex!r} matches no parameter. Available paths:\n  {shown}")
  return selected


def block_key_fn(*, block_regex: str = DEFAULT_BLOCK_REGEX, layers_per_group: int = 1) -> Callable[[str], tuple]:
  """Maps a parameter path to its block key via a regex.

  The match's groups form the key; a group named `layer` is an integer that
  is divided by `layers_per_group` (contiguous layer groups). Blocks are
  ordered by key, integers numerically.
  """
  pattern = re.compile(block_regex)
  if layers_per_group < 1:
    raise ValueError(f"encoder.layers_per_group must be >= 1, got {layers_per_group}.")

  def fn(path: str) -> tuple:
    match = pattern.search(path)
    if match is None:
      raise ValueError(
        f"Traced parameter {path!r} does not match the block regex {block_regex!r}"
        " (encoder.block_regex): set it so that every traced path maps to a block,"
        " or pass block_fn= to the encoder."
      )
    names = {i: name for name, i in pattern.groupindex.items()}
    key = []
    for i, value in enumerate(match.groups(), start=1):
      if names.get(i) == "layer":
        key.append(int(value) // layers_per_group)
      else:
        key.append(value)
    return tuple(key)

  return fn


def block_name(key: Hashable) -> str:
  if isinstance(key, tuple):
    return "/".join(str(k) for k in key)
  return str(key)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """A kernel viewed as a matrix: rows = `in_axes`, columns = the other axes.

  Both groups keep the kernel's axis order; the matrix is
  `kernel.transpose(in_axes + out_axes).reshape(n, m)`.
  """

  shape: tuple[int, ...]
  in_axes: tuple[int, ...]

  def __post_init__(self):
    if not self.in_axes or len(self.in_axes) >= len(self.shape):
      raise ValueError(f"A kernel {self.shape} needs input and output axes, got in_axes={self.in_axes}.")

  @property
  def out_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(len(self.shape)) if a not in self.in_axes)

  @property
  def n(self) -> int:
    return math.prod(self.shape[a] for a in self.in_axes)

  @property
  def m(self) -> int:
    return math.prod(self.shape[a] for a in self.out_axes)

  def as_matrix(self, kernel: jax.Array) -> jax.Array:
    """kernel [*shape] (or [B, *shape]) -> [n, m] (or [B, n, m])."""
    lead = kernel.ndim - len(self.shape)
    perm = tuple(range(lead)) + tuple(lead + a for a in self.in_axes + self.out_axes)
    return kernel.transpose(perm).reshape(kernel.shape[:lead] + (self.n, self.m))


def _path_seed(path: str) -> np.uint32:
  return np.uint32(zlib.crc32(canonical_path(path).encode("utf-8")))


_CHUNK = 1 << 14  # normals are drawn in fixed-size chunks: one compiled kernel for every shape


@jax.jit
def _normal_chunks(key: jax.Array, start: jax.Array, count: int = 8) -> jax.Array:
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(count, dtype=jnp.uint32))
  return jax.vmap(lambda k: jax.random.normal(k, (_CHUNK,), jnp.float32))(keys).reshape(-1)


def _normal(key: jax.Array, size: int) -> np.ndarray:
  """size i.i.d. N(0, 1) float32, a function of (key, size) only."""
  out, start = [], 0
  while start * _CHUNK < size:
    out.append(np.asarray(_normal_chunks(key, jnp.uint32(start))))
    start += 8
  return np.concatenate(out)[:size]


@functools.lru_cache(maxsize=4096)
def _matrices(name: str, n: int, m: int, d_in: int, d_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    key = jax.random.fold_in(jax.random.key(int(seed), impl="threefry2x32"), _path_seed(name))
    p_in = _normal(jax.random.fold_in(key, 0), n * d_in).reshape(n, d_in) / np.float32(np.sqrt(d_in))
    p_out = _normal(jax.random.fold_in(key, 1), m * d_out).reshape(m, d_out) / np.float32(np.sqrt(d_out))
  p_in.flags.writeable = False
  p_out.flags.writeable = False
  return p_in, p_out


def projection_matrices(
  path: str, *, n: int, m: int, d_in: int, d_out: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """(P_in [n, d_in], P_out [m, d_out]) float32 for one parameter path.

  Deterministic in (seed, canonical path, shapes), computed on the CPU backend
  with the threefry PRNG, so every host and device kind gets the same bits.
  Read-only numpy arrays (cached).
  """
  return _matrices(canonical_path(path), int(n), int(m), int(d_in), int(d_out), int(seed))


@dataclasses.dataclass
class ProjectionPlan:
  """Which block each traced matrix belongs to, and the layout of phi."""

  layouts: dict[str, KernelLayout]  # canonical path -> layout, tree order
  block_of: dict[str, int]  # canonical path -> block index
  blocks: list[str]  # block names, in phi order
  d_in: int
  d_out: int
  seed: int

  @classmethod
  def create(
    cls,
    layouts: Mapping[str, KernelLayout],
    *,
    d_in: int,
    d_out: int,
    seed: int,
    block_fn: Callable[[str], Hashable] | None = None,
  ) -> ProjectionPlan:
    if not layouts:
      raise ValueError("No traced parameters: nothing to project.")
    if d_in < 1 or d_out < 1:
      raise ValueError(f"encoder.d_in/d_out must be >= 1, got {d_in}/{d_out}.")
    block_fn = block_fn or block_key_fn()
    keys = {p: block_fn(p) for p in layouts}
    order = sorted(
      set(keys.values()),
      key=lambda k: tuple((0, x) if isinstance(x, int) else (1, str(x)) for x in (k if isinstance(k, tuple) else (k,))),
    )
    index = {k: i for i, k in enumerate(order)}
    return cls(
      layouts={canonical_path(p): l for p, l in layouts.items()},
      block_of={canonical_path(p): index[k] for p, k in keys.items()},
      blocks=[block_name(k) for k in order],
      d_in=int(d_in),
      d_out=int(d_out),
      seed=int(seed),
    )

  @property
  def dim(self) -> int:
    return len(self.blocks) * self.d_in * self.d_out

  def block_members(self) -> list[list[str]]:
    members = [[] for _ in self.blocks]
    for path, b in self.block_of.items():
      members[b].append(path)
    return members

  def matrices(self, path: str) -> tuple[np.ndarray, np.ndarray]:
    layout = self.layouts[canonical_path(path)]
    return projection_matrices(path, n=layout.n, m=layout.m, d_in=self.d_in, d_out=self.d_out, seed=self.seed)

  def assemble(self, block_phis: Sequence[jax.Array]) -> jax.Array:
    """[B, d_in, d_out] per block -> phi [B, d] float32."""
    return jnp.concatenate([p.reshape(p.shape[0], -1) for p in block_phis], axis=-1).astype(jnp.float32)

  def project(self, grads: Mapping[str, jax.Array], *, matrices: Mapping[str, tuple] | None = None) -> jax.Array:
    """Brute-force projection of (corrected) per-example kernel gradients.

    Args:
      grads: canonical path -> [B, *kernel_shape] for every traced path.
      matrices: optional precomputed {path: (P_in, P_out)}.

    Returns:
      phi [B, d] float32.
    """
    phis = []
    for members in self.block_members():
      acc = 0.0
      for path in members:
        layout = self.layouts[path]
        p_in, p_out = matrices[path] if matrices is not None else self.matrices(path)
        g = layout.as_matrix(grads[path].astype(jnp.float32))  # [B, n, m]
        acc = acc + jnp.einsum("bnm,na,mc->bac", g, p_in, p_out, precision="highest")
      phis.append(acc)
    return self.assemble(phis)
