"""The compile check: compiles a config's steps ahead of time for a Cloud TPU slice, and says what fits.

  rows = compile_check.run(config, topologies=["v5p-256", "v5e-256"], steps=compile_check.STEPS)
  print(compile_check.format_table(rows))

Launcher and details: launch/compile_check.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any
from unittest import mock

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from trackstar_jax import encoder as encoder_lib
from trackstar_jax import hessian, projection, retrieval, training
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import sharding as sharding_lib
from trackstar_jax.models import DecoderLM, TransformerConfig

GIB = 2**30
STEPS = ("train", "encode_fused", "encode_adam", "hessian", "retrieve")

# User-allocatable HBM per chip, GiB, as Cloud TPU documents it (the HBM jax reports, less libtpu's reserve):
#   v4 32 (cloud.google.com/tpu/docs/v4), v5e 16 (cloud.google.com/tpu/docs/v5e),
#   v5p 95 (cloud.google.com/tpu/docs/v5p: "95 GiB", of 96 physical), v6e 32 (cloud.google.com/tpu/docs/v6e).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# libtpu's names for each generation, its chip configuration, and the slice shapes (in chips) by chip count.
_GENERATIONS = {
  "v4": ("v4", "megacore", 2),  # accelerator type counts TensorCores: 2 per chip
  "v5p": ("v5", "megacore", 2),
  "v5e": ("v5e", "default", 1),  # counts chips
  "v6e": ("v6e", "default", 1),
}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
CHIPS_PER_HOST = (2, 2, 1)  # 4 chips per host VM on every generation here (v5e/v6e 8-chip hosts aside)


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # accelerator type, e.g. v5p-256
  libtpu_name: str  # e.g. v5:4x4x8
  chip_config: str
  chips: int
  hbm_bytes: int


def parse_topology(name: str) -> Topology:
  """`v5p-256` -> its libtpu topology (v5:4x4x8, 128 chips, 95 GiB each)."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip())
  if not m:
    raise ValueError(f"Unknown TPU topology {name!r}: expected <v4|v5p|v5e|v6e>-<count>, e.g. v5p-256 or v5e-256.")
  gen, count = m.group(1), int(m.group(2))
  prefix, chip_config, per_chip = _GENERATIONS[gen]
  shapes = _SHAPES_3D if prefix in ("v4", "v5") else _SHAPES_2D
  chips = count // per_chip
  if count % per_chip or chips not in shapes:
    known = ", ".join(f"{gen}-{c * per_chip}" for c in shapes)
    raise ValueError(f"TPU topology {name!r} is not a slice shape this check knows; known: {known}.")
  return Topology(name, f"{prefix}:{shapes[chips]}", chip_config, chips, HBM_GIB[gen] * GIB)


def topology_devices(topo: Topology) -> list[Any]:
  """Compile-only devices of the slice (needs libtpu; nothing is allocated on them)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  # libtpu takes /tmp/libtpu_lockfile to keep a second process off the chips; with no chips attached
  # (compile only) several checks, or a check beside a test run, may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
  try:
    desc = topologies.get_topology_desc(
      topology_name=topo.libtpu_name,
      platform="tpu",
      chip_config_name=topo.chip_config,
      chips_per_host_bounds=CHIPS_PER_HOST,
      num_slices=1,
    )
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError(f"{e}\nInstall libtpu for the installed jax: pip install -e '.[tpu-aot]'") from None
    raise
  return list(desc.devices)


def make_mesh(config, devices) -> Mesh:
  """config.mesh over the slice's devices, laid out along the chips' torus (mesh_utils).

  An axis that is no product of the torus's axis sizes (model 4 on v5e-256's 16 x 16) splits a physical
  axis (allow_split_physical_axes): per-device memory, what this check reports, does not depend on it.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  names, sizes = mesh_lib.mesh_shape(config.mesh, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except NotImplementedError as e:
    logging.info("mesh %s: %s; splitting physical axes.", dict(zip(names, sizes)), str(e).split(".")[0])
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  return Mesh(grid, names)


def per_device_bytes(compiled) -> int:
  """Arguments + outputs + temporaries - aliased (donated) buffers, per device."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


# The sizes in XLA's out-of-memory messages, e.g. libtpu 0.0.42: "Ran out of memory on HBM, the total memory
# required for HLO temporaries (37.29G) exceeds available HBM (15.75G)."; older: "Used 120.53G of 95.74G hbm".
_OOM = (
  re.compile(r"required for ([\w ]+?) \(([\d.]+)([KMGT])i?B?\) exceeds available (\w+) \(([\d.]+)([KMGT])i?B?\)", re.I),
  re.compile(r"(?:Used|requires?|need(?:ed)?)\s+([\d.]+)\s*([KMGT])i?B?\b", re.IGNORECASE),
)


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * 1024 ** ("KMGT".index(unit.upper()) + 1))


def _oom_bytes(message: str) -> int | None:
  """The size the program needs in an XLA out-of-memory message (see `_OOM`), or None."""
  m = _OOM[0].search(message)
  if m:
    return _bytes(m.group(2), m.group(3))
  m = _OOM[1].search(message)
  return None if not m else _bytes(m.group(1), m.group(2))


def _oom_note(message: str) -> str:
  """'compiler: out of memory (...)' with what XLA said it needed and had."""
  m = _OOM[0].search(message)
  if m:
    need, have = _bytes(m.group(2), m.group(3)), _bytes(m.group(5), m.group(6))
    return f"compiler: out of memory ({m.group(1)} need {need / GIB:.1f} GiB, {m.group(4)} has {have / GIB:.1f} GiB)"
  need = _oom_bytes(message)
  return "compiler: out of memory" + (f" ({need / GIB:.1f} GiB)" if need else " (XLA gave no size)")


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Ran out of memory" in text


# ----------------------------------------------------------------------------
# Abstract state and the steps (jitted exactly as the jobs jit them).


class Setup:
  """The model, its abstract sharded params and optimizer state, on `mesh`."""

  def __init__(self, config, mesh: Mesh, *, vocab_size: int):
    self.config, self.mesh, self.seq_len = config, mesh, int(config.seq_len)
    self.model = DecoderLM(TransformerConfig.from_config(config.model, vocab_size=vocab_size))
    self.optimizer = training.optimizer_for(config.train)
    self.param_sh, self.opt_sh = training.state_shardings(
      self.model, self.optimizer, config, mesh, seq_len=self.seq_len
    )
    abstract = jax.eval_shape(lambda: training.init_params(self.model, seq_len=self.seq_len, seed=0))
    self.params = sharding_lib.with_shardings(abstract, self.param_sh)
    self.opt_state = sharding_lib.with_shardings(jax.eval_shape(self.optimizer.init, abstract), self.opt_sh)
    self.n_data = mesh.shape["data"]
    self._encoders = {}

  def batch(self, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    t, sh = self.seq_len, NamedSharding(self.mesh, P("data", None))
    fields = dict(inputs=jnp.int32, targets=jnp.int32, loss_mask=jnp.float32, pad_mask=jnp.bool_)
    out = {k: jax.ShapeDtypeStruct((rows, t), d, sharding=sh) for k, d in fields.items()}
    out["ids"] = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=NamedSharding(self.mesh, P("data")))
    return out

  def train(self, rows: int):
    step = training.make_train_step(
      self.model.apply, self.optimizer, self.mesh, param_sharding=self.param_sh, opt_sharding=self.opt_sh
    )
    batch = {k: v for k, v in self.batch(rows).items() if k in training.TRAIN_KEYS}
    return step.lower(self.params, self.opt_state, batch).compile()

  def encoder(self, correction: str):
    """(TrackStarEncoder, abstract params, abstract arrays) built from the abstract state (cached)."""
    if correction not in self._encoders:
      enc_cfg = self.config.encoder.to_dict()
      enc_cfg.update(correction=correction, layer_mode="auto", b2=enc_cfg["b2"] or float(self.config.train.b2))
      enc_cfg.update(eps=float(self.config.train.eps))
      holder = {}

      def build(params, opt_state):
        holder["encoder"] = encoder_lib.TrackStarEncoder(
          model_apply=self.model.apply,
          params=params,
          opt_state=opt_state,
          mesh=self.mesh,
          seq_len=self.seq_len,
          config=enc_cfg,
          param_sharding=self.param_sh,
        )
        return holder["encoder"].arrays

      arrays = _build_abstract(build, self.params, self.opt_state, eager_constants=True)
      arrays = sharding_lib.with_shardings(arrays, _array_shardings(arrays, self.params, self.mesh))
      self._encoders[correction] = (holder["encoder"], arrays)
    return self._encoders[correction]

  def encode(self, rows: int, correction: str):
    encoder, arrays = self.encoder(correction)
    return encoder._fn.lower(self.params, arrays, self.batch(rows)).compile()  # pylint: disable=protected-access

  def hessian(self, rows: int):
    encoder, _ = self.encoder("adam_rank1")
    hc = self.config.hessian
    n_blocks = len(encoder.blocks)
    holder = {}

    def build():
      holder["acc"] = hessian.SecondMoment(
        encoder.dim, n_blocks=n_blocks, block_diagonal=bool(hc.block_diagonal), mesh=self.mesh
      )
      return holder["acc"]._sum  # pylint: disable=protected-access

    acc_struct = _build_abstract(build)
    acc = holder["acc"]
    d = encoder.dim
    shape = (n_blocks, d // n_blocks, d // n_blocks) if hc.block_diagonal else (d, d)
    sh = NamedSharding(self.mesh, P("data", *([None] * (len(shape) - 1))))
    if shape[0] % self.n_data:
      sh = NamedSharding(self.mesh, P())
    acc_in = jax.ShapeDtypeStruct(acc_struct.shape, acc_struct.dtype, sharding=sh)
    phi_shape = (rows, n_blocks, d // n_blocks) if hc.block_diagonal else (rows, d)
    phi = jax.ShapeDtypeStruct(phi_shape, jnp.float32, sharding=NamedSharding(self.mesh, P("data")))
    valid = jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=NamedSharding(self.mesh, P("data")))
    return acc._add.lower(acc_in, phi, valid).compile()  # pylint: disable=protected-access

  def retrieve(self, rows: int, *, queries: int):
    encoder, _ = self.encoder("adam_rank1")
    host = [d for d in self.mesh.devices.flat if d.process_index == self.mesh.devices.flat[0].process_index]
    host_mesh = Mesh(np.asarray(host), ("data",))
    rc, hc = self.config.retrieve, self.config.hessian
    d, n_blocks = encoder.dim, len(encoder.blocks)
    inv_shape = (n_blocks, d // n_blocks, d // n_blocks) if hc.block_diagonal else (d, d)
    holder = {}

    def build(q, inv):
      with mock.patch.object(jax, "process_index", lambda: host[0].process_index):
        holder["topk"] = retrieval.StreamingTopK(
          q, k=int(rc.k), mesh=host_mesh, inv_sqrt=inv, normalize=bool(rc.normalize), matmul_dtype=rc.matmul_dtype
        )
      return 0

    q = jax.ShapeDtypeStruct((queries, d), jnp.float32)
    _build_abstract(build, q, jax.ShapeDtypeStruct(inv_shape, jnp.float32))
    # A scan is two programs per chunk: the norms 1 / ||R^{-1/2} phi|| (first scan; cached afterwards) and the
    # fused score-and-select step. They run one after the other: the chunk's memory is the larger of the two.
    programs = holder["topk"].abstract().programs(rows)
    return max(programs.values(), key=per_device_bytes)


def _build_abstract(fn, *abstract_args, eager_constants: bool = False):
  """Runs a library constructor on abstract inputs: its device placement and host copies become no-ops.

  The library's classes place their state on devices when built; on a compile-only topology nothing
  can be placed. Under `jax.eval_shape` the state stays abstract; `eager_constants` still runs
  setup on constants eagerly on the host (`ensure_compile_time_eval`: the encoder's projection
  matrices, which it copies to numpy). Returns fn's (abstract) result.
  """
  with contextlib.ExitStack() as stack:
    if eager_constants:
      stack.enter_context(jax.ensure_compile_time_eval())
    stack.enter_context(mock.patch.object(encoder_lib, "_place", lambda tree, sharding: tree))
    stack.enter_context(mock.patch.object(encoder_lib, "_host", lambda a: a))
    return jax.eval_shape(fn, *abstract_args)


def _array_shardings(arrays, params, mesh):
  """The encoder's per-kernel arrays ({path: p_in, p_out, factors}): an element-wise factor (the kernel's
  shape: exact Adam's 1/sqrt(nu)) sharded like its kernel, projections and factored moments replicated."""
  rep = NamedSharding(mesh, P())
  kernels = {projection.canonical_path(p): leaf for p, leaf in projection.flatten_paths(params).items()}

  def one(path, entry):
    kernel = kernels[projection.canonical_path(path)]
    like = lambda a: kernel.sharding if tuple(a.shape) == tuple(kernel.shape) else rep  # noqa: E731
    return jax.tree.map(like, entry)

  return {path: one(path, entry) for path, entry in arrays.items()}


# ----------------------------------------------------------------------------
# The table.


@dataclasses.dataclass
class Row:
  topology: str
  chips: int
  step: str
  batch: int  # global rows (retrieve: chunk rows of one host)
  per_device_gib: float | None
  hbm_gib: float
  fits: bool
  largest_batch: int | None = None
  largest_gib: float | None = None
  note: str = ""
  compile_s: float = 0.0
  searched: bool = False  # the largest-batch search ran (else largest_batch says nothing)


def _try(fn, rows: int) -> tuple[int | None, str, float]:
  """(per-device bytes or None, note, seconds) of compiling at `rows`.

  The compiler's refusals become the row's note: out of memory (with its sizes), or another XLA error
  (e.g. v5e's "device assignment should include all slice devices" for a per-host program). Errors of
  tracing (Python exceptions: this project's bugs) propagate.
  """
  t0 = time.time()
  try:
    return per_device_bytes(fn(rows)), "", time.time() - t0
  except Exception as e:  # pylint: disable=broad-except
    if _is_oom(e):
      return _oom_bytes(str(e)), _oom_note(str(e)), time.time() - t0
    if not isinstance(e, jax.errors.JaxRuntimeError):
      raise
    logging.warning("compile error at %d rows: %s", rows, e)
    first = " ".join(str(e).split())
    return None, f"compile error: {first[:300]}", time.time() - t0


def check_step(fn, *, topology: Topology, step: str, batch: int, unit: int, search: bool, max_rows: int) -> Row:
  """Compiles `fn(batch)`; with `search`, doubles per-device rows from `unit` until it no longer fits."""
  hbm = topology.hbm_bytes
  used, note, secs = _try(fn, batch)
  fits = used is not None and used <= hbm and not note
  row = Row(
    topology.name, topology.chips, step, batch, _gib(used), hbm / GIB, fits, note=note, compile_s=round(secs, 1)
  )
  if not search:
    return row
  row.searched = True
  best, rows = None, unit
  while rows <= max_rows:
    b, n, _ = (used, note, 0.0) if rows == batch else _try(fn, rows)
    if b is None or n or b > hbm:
      break
    best, rows = (rows, b), rows * 2
  if best:
    row.largest_batch, row.largest_gib = best[0], _gib(best[1])
  return row


def _gib(b: int | None) -> float | None:
  return None if b is None else round(b / GIB, 3)


def format_table(rows: list[Row]) -> str:
  head = "| topology | chips | step | batch | per-device GiB | HBM GiB | fits | largest batch that fits (GiB) |"
  lines = [head, "|" + "---|" * 8]
  for r in rows:
    used = "?" if r.per_device_gib is None else f"{r.per_device_gib:.3f}"
    if not r.searched:
      largest = "not searched"
    else:
      largest = "none" if r.largest_batch is None else f"{r.largest_batch} ({r.largest_gib:.3f})"
    fits = "yes" if r.fits else "**no**" + (f": {r.note}" if r.note else "")
    lines.append(f"| {r.topology} | {r.chips} | {r.step} | {r.batch} | {used} | {r.hbm_gib:g} | {fits} | {largest} |")
  return "\n".join(lines)


def run(config, *, topologies: list[str], steps: list[str], vocab_size: int = 0, queries: int = 8192,
        search: bool = True, max_per_device_batch: int = 256) -> list[Row]:  # fmt: skip
  """Compiles `steps` of `config` for each topology; returns the table rows."""
  unknown = sorted(set(steps) - set(STEPS))
  if unknown:
    raise ValueError(f"Unknown steps {unknown}; known: {', '.join(STEPS)}.")
  vocab = int(vocab_size or config.tokenizer.vocab_size)
  out = []
  for name in topologies:
    topo = parse_topology(name)
    mesh = make_mesh(config, topology_devices(topo))
    setup = Setup(config, mesh, vocab_size=vocab)
    logging.info(
      "%s: %d chips, mesh %s, %s", name, topo.chips, dict(mesh.shape), config.sharding.preset or "replicated"
    )
    n = setup.n_data
    host_devices = math.prod(CHIPS_PER_HOST)
    jobs = {
      "train": (setup.train, int(config.train.batch_size), n),
      "encode_fused": (functools.partial(setup.encode, correction="adam_rank1"), int(config.encoder.batch_size), n),
      "encode_adam": (functools.partial(setup.encode, correction="adam"), int(config.encoder.batch_size), n),
      "hessian": (setup.hessian, int(config.encoder.batch_size), n),
      # Chunk rows: searched from 1024 per chip up to 16x that.
      "retrieve": (functools.partial(setup.retrieve, queries=queries), int(config.retrieve.chunk_rows), host_devices),
    }
    for step in steps:
      fn, batch, unit = jobs[step]
      batch = -(-batch // unit) * unit  # the jobs pad to a multiple of the data axis
      if step == "retrieve":
        unit, top = unit * 1024, unit * 16384
      else:
        top = max_per_device_batch * unit
      row = check_step(fn, topology=topo, step=step, batch=batch, unit=unit, search=search, max_rows=top)
      logging.info("%s", row)
      out.append(row)
  return out
