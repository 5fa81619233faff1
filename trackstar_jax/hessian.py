"""The Gauss-Newton Hessian approximation R in projected space, and R^{-1/2}.

  R_train = (1/N) sum_z phi(z) phi(z)^T    over a sample of training examples
  R_eval  = (1/Q) sum_q phi(q) phi(q)^T    over the query set
  R       = lam R_eval + (1 - lam) R_train     (task-specific, "mixed")
            with lam * sigma_eval[k] = (1 - lam) * sigma_train[k] for the k-th
            largest eigenvalues, i.e. lam = s_t / (s_e + s_t)
  R       = R_train                        (config.hessian.mixed = False)
  R^{-1/2} = U diag(sigma + eta * mean(sigma))^{-1/2} U^T     (damped)

Second moments accumulate in float32 (matmuls at HIGHEST precision) under
jit: inputs may be data-sharded global arrays, the sum over examples is then
a cross-device reduction; the full [d, d] accumulator can be kept sharded by
rows over the mesh's data axis (`SecondMoment(mesh=...)`). Several processes:
each device sums phi phi^T over its own rows and the partial sums are reduced
once at the end (`SecondMoment(partials=True)`, chosen by `second_moment` for
phi spread over processes), so no host gathers phi. Eigendecompositions
run in float32 on the default device, or float64 on the host
(`config.hessian.dtype`), never in bf16. Block-diagonal mode
(`config.hessian.block_diagonal`) keeps one [d_b, d_b] matrix per projection
block (d_b = d_in * d_out) and its eigenvalues pool for the lambda rule.

Public API:
  SecondMoment(dim, *, n_blocks=1, block_diagonal=False, mesh=None, partials=False)
      .update(phi [B, d], *, valid=None), .count, .result() -> R
  mixing_lambda(sigma_train, sigma_eval, *, k) -> float
  inverse_sqrt(R, *, damping, dtype) -> (R^{-1/2}, eigenvalues)
  HessianOptions(mixed, top_k_eig, damping, block_diagonal, dtype)
  fit_hessian(*, train_phi, eval_phi=None, options=None | config=None, n_blocks=1) -> Hessian
  Hessian.apply(phi) -> psi, .save(path), Hessian.load(path)
  apply_inv_sqrt(x, inv_sqrt, dtype), inv_norm(x), normalize(psi)
  transform(phi, inv_sqrt, normalize_rows) -> e, unit_encode(phi, hessian) -> e, cosine_scores(q, z)
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any
import zipfile
import zlib

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from trackstar_jax import fileio
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import options as opts_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def _outer(phi, valid):
  phi = jnp.where(valid[:, None], phi.astype(jnp.float32), 0.0)
  return jnp.einsum("ni,nj->ij", phi, phi, precision=_HIGHEST)


def _outer_blocks(phi, valid):
  phi = jnp.where(valid[:, None, None], phi.astype(jnp.float32), 0.0)
  return jnp.einsum("nbi,nbj->bij", phi, phi, precision=_HIGHEST)


def _mesh_of(phi: Any):
  """The mesh of a phi batch spread over several processes (a global array no host holds whole), else None."""
  if isinstance(phi, jax.Array) and not phi.is_fully_addressable and isinstance(phi.sharding, NamedSharding):
    return phi.sharding.mesh
  return None


class SecondMoment:
  """Running (1/N) sum phi phi^T over batches, padding rows excluded.

  Three placements of the accumulator (the sum, [d, d] or [n_blocks, d_b, d_b]):
    default           on the default device; phi may be a data-sharded array (a reduction per batch).
    mesh=             rows sharded over the mesh's "data" axis (a reduce-scatter per batch).
    partials=True     (with mesh=; for phi spread over several processes) one partial sum per
                      data shard, each device adding its own rows: no communication per batch;
                      `result()` reduces the partials once (one all-reduce) and returns R on every host.
  """

  def __init__(self, dim: int, *, n_blocks: int = 1, block_diagonal: bool = False, mesh=None, partials: bool = False):
    if block_diagonal and dim % n_blocks:
      raise ValueError(f"phi dim {dim} is not a multiple of the number of blocks {n_blocks}.")
    if partials and (mesh is None or "data" not in mesh.axis_names):
      raise ValueError("SecondMoment(partials=True) needs a mesh with a 'data' axis (the mesh of phi).")
    self.dim, self.n_blocks, self.block_diagonal = dim, n_blocks, block_diagonal
    shape = (n_blocks, dim // n_blocks, dim // n_blocks) if block_diagonal else (dim, dim)
    if block_diagonal:
      fn = lambda phi, valid: _outer_blocks(jnp.reshape(phi, (phi.shape[0], n_blocks, -1)), valid)
    else:
      fn = _outer
    self._partials = partials
    if partials:
      data = P("data")
      sharding = NamedSharding(mesh, data)
      self._sum = jnp.zeros((mesh.shape["data"], *shape), jnp.float32, device=sharding)
      add = mesh_lib.shard_map(
        lambda acc, phi, valid: acc + fn(phi, valid)[None], mesh=mesh, in_specs=(data, data, data), out_specs=data
      )
      self._add = jax.jit(add, donate_argnums=0, out_shardings=sharding)
      self._reduce = jax.jit(lambda acc: jnp.sum(acc, axis=0), out_shardings=NamedSharding(mesh, P()))
    else:
      sharding = None
      if mesh is not None and "data" in mesh.axis_names and shape[0] % mesh.shape["data"] == 0:
        sharding = NamedSharding(mesh, P("data", *([None] * (len(shape) - 1))))
      self._sum = jnp.zeros(shape, jnp.float32, device=sharding)
      self._add = jax.jit(lambda acc, phi, valid: acc + fn(phi, valid), donate_argnums=0, out_shardings=sharding)
    self.count = 0

  def update(self, phi: Any, *, valid: Any = None) -> None:
    """phi [B, d]; valid [B] bool (default: all rows, e.g. ids >= 0); with partials both global arrays on the mesh."""
    if phi.shape[-1] != self.dim:
      raise ValueError(f"phi has dim {phi.shape[-1]}, expected {self.dim}.")
    if valid is None:
      valid = np.ones(phi.shape[0], bool)
    count = int(np.count_nonzero(valid)) if isinstance(valid, np.ndarray) else int(jnp.sum(valid))
    # One add in flight: waiting for the previous sum bounds how far the host queues work ahead of the
    # devices. Unbounded, XLA:CPU with several devices deadlocked (~1 run in 3 on 2 loaded cores: three
    # devices waiting in the add's all-reduce, the fourth's launch blocked on its in-flight limit).
    jax.block_until_ready(self._sum)
    self._sum = self._add(self._sum, phi, jnp.asarray(valid, bool))
    self.count += count

  def result(self) -> jax.Array | np.ndarray:
    """R = sum / N; with partials a host array, the same on every process."""
    if not self.count:
      raise ValueError("No examples were accumulated into the second moment.")
    if self._partials:
      total = self._reduce(self._sum)  # the one cross-device (cross-host) reduction, [d, d] / [nb, db, db]
      return np.asarray(total.addressable_data(0)) / np.float32(self.count)
    return self._sum / self.count


def second_moment(phis: Any, *, n_blocks: int = 1, block_diagonal: bool = False) -> tuple[Any, int]:
  """R and N from an array [N, d] or an iterable of arrays / (phi, valid) pairs.

  Batches spread over several processes (global arrays, as `encoding.phi_batches`
  yields there) are summed per device and reduced once (`SecondMoment(partials=True)`):
  no host holds more than one batch of phi, whatever the sample size.
  """
  if hasattr(phis, "shape"):
    phis = [phis]
  acc = None
  for item in phis:
    phi, valid = item if isinstance(item, tuple) else (item, None)
    if acc is None:
      mesh = _mesh_of(phi)
      acc = SecondMoment(
        phi.shape[-1], n_blocks=n_blocks, block_diagonal=block_diagonal, mesh=mesh, partials=mesh is not None
      )
    acc.update(phi, valid=valid)
  if acc is None:
    raise ValueError("No phi batches given.")
  return acc.result(), acc.count


def _eigh(r: Any, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  if dtype == "float64":
    sigma, u = np.linalg.eigh(np.asarray(r, np.float64))
    return sigma, u
  if dtype != "float32":
    raise ValueError(f"config.hessian.dtype must be 'float32' or 'float64', got {dtype!r} (never bf16).")
  sigma, u = jnp.linalg.eigh(jnp.asarray(r, jnp.float32), symmetrize_input=True)
  return sigma, u


def eigenvalues(r: Any, *, dtype: str = "float32") -> np.ndarray:
  """All eigenvalues of R (or of every block), descending."""
  sigma, _ = _eigh(r, dtype)
  return np.sort(np.asarray(sigma, np.float64).reshape(-1))[::-1]


def mixing_lambda(sigma_train: Any, sigma_eval: Any, *, k: int) -> float:
  """lam with lam * sigma_eval[k] = (1 - lam) * sigma_train[k] (k-th largest, 1-based)."""
  st = np.sort(np.asarray(sigma_train, np.float64))[::-1]
  se = np.sort(np.asarray(sigma_eval, np.float64))[::-1]
  k = int(min(max(k, 1), len(st), len(se)))
  s_t, s_e = max(st[k - 1], 0.0), max(se[k - 1], 0.0)
  if s_t + s_e <= 0:
    logging.warning("k-th eigenvalues of R_train and R_eval are both 0 (k=%d): lambda = 0.5.", k)
    return 0.5
  return float(s_t / (s_t + s_e))


def inverse_sqrt(r: Any, *, damping: float, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
  """(R + eta mean(eig R) I)^{-1/2} and R's eigenvalues; R [d, d] or [nb, db, db].

  For block-diagonal R the mean is over all eigenvalues of all blocks.
  """
  sigma, u = _eigh(r, dtype)
  xp = np if dtype == "float64" else jnp
  sigma = xp.maximum(sigma, 0.0)
  shift = damping * xp.mean(sigma)
  scale = (sigma + shift) ** -0.5
  if not bool(xp.all(xp.isfinite(scale))):
    raise ValueError("R + damping is singular: use config.hessian.damping > 0.")
  inv = xp.einsum("...ik,...k,...jk->...ij", u, scale, u, **({} if xp is np else dict(precision=_HIGHEST)))
  return np.asarray(inv, np.float32), np.asarray(sigma)


class HessianFileError(ValueError):
  """A Hessian file that cannot be used: truncated, corrupt or not a Hessian."""


@dataclasses.dataclass
class Hessian:
  """R^{-1/2}: [d, d] or, block-diagonal, [n_blocks, d_b, d_b] (float32)."""

  inv_sqrt: Any
  lam: float
  meta: dict[str, Any]

  @property
  def block_diagonal(self) -> bool:
    return np.ndim(self.inv_sqrt) == 3

  @property
  def dim(self) -> int:
    s = np.shape(self.inv_sqrt)
    return s[0] * s[1] if len(s) == 3 else s[0]

  def apply(self, phi: Any) -> jax.Array:
    """psi = R^{-1/2} phi for phi [N, d] -> [N, d] float32."""
    phi = jnp.asarray(phi, jnp.float32)
    if phi.shape[-1] != self.dim:
      raise ValueError(f"phi has dim {phi.shape[-1]} but the Hessian was fit for dim {self.dim}.")
    return _apply_f32(phi, jnp.asarray(self.inv_sqrt))

  def save(self, path: str) -> None:
    """One .npz with inv_sqrt, lam and JSON metadata, written atomically (local or kvstore path)."""
    buf = io.BytesIO()
    np.savez(
      buf,
      inv_sqrt=np.asarray(self.inv_sqrt, np.float32),
      lam=np.float64(self.lam),
      meta=np.asarray(json.dumps(self.meta, sort_keys=True)),
    )
    fileio.write_bytes(path, buf.getvalue())

  @classmethod
  def load(cls, path: str) -> Hessian:
    """Reads a `save`d Hessian; a missing, truncated or corrupt file raises an error that says what to rerun.

    Raises:
      FileNotFoundError: no file at `path`.
      HessianFileError: the file is not a complete Hessian (truncated, corrupt, other contents).
    """
    rerun = (
      f"Re-run `python -m launch.fit_hessian --config=<this experiment's config> "
      f"--workdir={fileio.parent(path)}` (the workdir whose config.hessian.path is "
      f"this file) to write it again."
    )
    if not fileio.exists(path):
      raise FileNotFoundError(f"No Hessian at {path}. {rerun}")
    raw = fileio.read_bytes(path)
    try:
      with np.load(io.BytesIO(raw), allow_pickle=False) as data:
        missing = {"inv_sqrt", "lam", "meta"} - set(getattr(data, "files", ()))
        if missing:
          raise HessianFileError(f"Hessian file {path} lacks {sorted(missing)}: not a Hessian.save file. {rerun}")
        h = cls(inv_sqrt=data["inv_sqrt"], lam=float(data["lam"]), meta=json.loads(str(data["meta"])))
    except HessianFileError:
      raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
      raise HessianFileError(
        f"Hessian file {path} ({len(raw)} bytes) is truncated or corrupt: {type(e).__name__}: {e}. {rerun}"
      ) from e
    shape = np.shape(h.inv_sqrt)
    square = (len(shape) == 2 and shape[0] == shape[1]) or (len(shape) == 3 and shape[1] == shape[2])
    if not square or not np.all(np.isfinite(h.inv_sqrt)):
      raise HessianFileError(
        f"Hessian file {path} holds an invalid R^-1/2 (shape {shape}{', non-finite values' if square else ''}). {rerun}"
      )
    return h


def apply_inv_sqrt(x: jax.Array, inv_sqrt: jax.Array, *, dtype=jnp.float32) -> jax.Array:
  """x @ inv_sqrt for inv_sqrt [d, d] or block-diagonal [B, d/B, d/B]: the one implementation of R^{-1/2} phi.

  R^{-1/2} is symmetric, so x @ inv_sqrt == (inv_sqrt @ x^T)^T. `dtype` is the
  operand dtype (bfloat16 on the retrieval fast path); accumulation is float32,
  at full precision (no TF32) for float32 operands.
  """
  hi = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  x, m = x.astype(dtype), inv_sqrt.astype(dtype)
  if m.ndim == 2:
    return jnp.dot(x, m, precision=hi, preferred_element_type=jnp.float32)
  b, db, _ = m.shape
  if dtype != jnp.float32 and jax.default_backend() == "cpu":
    # XLA:CPU has no batched bf16 x bf16 -> f32 dot; the bf16-rounded operands multiplied in float32
    # give the same products (only the summation order can differ).
    x, m = x.astype(jnp.float32), m.astype(jnp.float32)
  y = jnp.einsum("cbi,bij->cbj", x.reshape(x.shape[0], b, db), m, precision=hi, preferred_element_type=jnp.float32)
  return y.reshape(x.shape[0], b * db)


_apply_f32 = jax.jit(apply_inv_sqrt)


def inv_norm(x: jax.Array) -> jax.Array:
  """1 / ||x|| per row, in float32; zero rows get a finite (huge) factor, so they stay zero when scaled."""
  x = x.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), jnp.finfo(jnp.float32).tiny))


@dataclasses.dataclass(frozen=True)
class HessianOptions:
  """How R is fit. The defaults here are the project's defaults (config section `hessian`).

  Attributes:
    mixed: task-specific R = lam R_eval + (1 - lam) R_train (needs query phis);
      False: R = R_train.
    top_k_eig: k of the lambda rule (paper: ~1000 of 2^16 dims).
    damping: eta of R + eta * mean(eig R) * I.
    block_diagonal: one [d_b, d_b] R per projection block instead of a full [d, d].
    dtype: eigendecomposition dtype, float32 (on device) or float64 (host); never bf16.
  """

  mixed: bool = True
  top_k_eig: int = 100
  damping: float = 1e-3
  block_diagonal: bool = False
  dtype: str = "float32"


# Fields of the config section `hessian` that belong to the fit_hessian job.
JOB_FIELDS = ("train_sample", "seed", "path")


def fit_hessian(
  *, train_phi: Any, eval_phi: Any = None, options: HessianOptions | None = None, config: Any = None, n_blocks: int = 1
) -> Hessian:
  """R^{-1/2} from training (and query) phis.

  Args:
    train_phi: [N, d] array or iterable of [B, d] arrays / (phi, valid) pairs.
    eval_phi: same for the queries; required when options.mixed.
    options: `HessianOptions` (default: the defaults).
    config: alternatively a ConfigDict / mapping of its fields (e.g. `config.hessian`).
    n_blocks: number of projection blocks of phi (for block_diagonal).
  """
  if options is not None and config is not None:
    raise ValueError("Pass options= or config=, not both.")
  if options is None:
    options = opts_lib.from_config(HessianOptions, config, ignore=JOB_FIELDS)
  block, dtype, damping = bool(options.block_diagonal), str(options.dtype), float(options.damping)
  r_train, n_train = second_moment(train_phi, n_blocks=n_blocks, block_diagonal=block)
  meta = dict(
    n_train=n_train,
    n_eval=0,
    damping=damping,
    dtype=dtype,
    block_diagonal=block,
    n_blocks=n_blocks,
    top_k_eig=int(options.top_k_eig),
    mixed=bool(options.mixed),
  )
  lam = 0.0
  r = r_train
  if meta["mixed"]:
    if eval_phi is None:
      raise ValueError("A mixed R (hessian.mixed=True) needs query phis (eval_phi); or set mixed=False.")
    r_eval, n_eval = second_moment(eval_phi, n_blocks=n_blocks, block_diagonal=block)
    s_train, s_eval = eigenvalues(r_train, dtype=dtype), eigenvalues(r_eval, dtype=dtype)
    lam = mixing_lambda(s_train, s_eval, k=meta["top_k_eig"])
    k = min(meta["top_k_eig"], len(s_train)) - 1
    meta.update(n_eval=n_eval, sigma_train_k=float(s_train[k]), sigma_eval_k=float(s_eval[k]))
    r = lam * r_eval + (1.0 - lam) * r_train
  _warn_if_rank_deficient(n_train + meta["n_eval"], r.shape[-1], damping)
  inv, sigma = inverse_sqrt(r, damping=damping, dtype=dtype)
  meta.update(lam=lam, sigma_max=float(np.max(sigma)), sigma_mean=float(np.mean(sigma)))
  logging.info("Hessian: lambda=%.4f N_train=%d N_eval=%d dim=%d", lam, n_train, meta["n_eval"], r.shape[-1])
  return Hessian(inv_sqrt=inv, lam=lam, meta=meta)


def _warn_if_rank_deficient(n_rows: int, dim: int, damping: float) -> None:
  """R from fewer rows than its dimension has rank <= n_rows: R^{-1/2} is then set by the damping.

  Directions outside the sample are scaled up by 1/sqrt(damping * mean eig), and rows of the sample
  itself come out nearly orthonormal, so their scores tie at rounding level (a (data 8) and a
  (data 2 x model 4) mesh then rank them differently). Worth saying, not an error: tiny test
  configs do it on purpose.
  """
  if n_rows < dim:
    logging.warning(
      "R is fit from %d rows in dimension %d (rank <= %d): R^{-1/2} outside the sample is set by the damping "
      "(hessian.damping=%g) and scores among sampled rows tend to tie. Sample at least %d rows "
      "(hessian.train_sample; the paper-like configs use >= 8x the block size), or raise hessian.damping.",
      n_rows,
      dim,
      n_rows,
      damping,
      dim,
    )


def normalize(psi: Any) -> jax.Array:
  """Rows divided by their L2 norm, in float32 (zero rows stay zero)."""
  psi = jnp.asarray(psi, jnp.float32)
  return psi * inv_norm(psi)[..., None]


def transform(phi: Any, inv_sqrt: Any = None, *, normalize_rows: bool = True) -> jax.Array:
  """e = R^{-1/2} phi / ||R^{-1/2} phi|| in float32; `inv_sqrt` None skips R, `normalize_rows` False the norm.

  The reference encoding of both sides of a score; the retrieval step computes
  the same scores without materializing e (see `retrieval.StreamingTopK`).
  """
  x = jnp.asarray(phi, jnp.float32)
  if inv_sqrt is not None:
    x = _apply_f32(x, jnp.asarray(inv_sqrt, jnp.float32))
  return normalize(x) if normalize_rows else x


def unit_encode(phi: Any, hessian: Hessian | None = None) -> jax.Array:
  """e = R^{-1/2} phi / ||R^{-1/2} phi|| (no Hessian: phi / ||phi||)."""
  return transform(phi, None if hessian is None else hessian.inv_sqrt)


def cosine_scores(queries: Any, corpus: Any, *, hessian: Hessian | None = None) -> jax.Array:
  """score(q, z) = e_q . e_z for raw phis: [Q, d] x [N, d] -> [Q, N]."""
  return jnp.matmul(unit_encode(queries, hessian), unit_encode(corpus, hessian).T, precision=_HIGHEST)
