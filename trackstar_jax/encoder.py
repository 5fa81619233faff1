"""TrackStarEncoder: raw per-example TrackStar encodings phi(z), sharded.

  encoder = TrackStarEncoder(model_apply=model.apply, params=variables,
                             options=EncoderOptions(d_in=32, d_out=32), opt_state=opt_state)
  phi = encoder.encode(batch)          # [B, encoder.dim] float32

phi(z) = concat_b vec(sum_{i in b} P_in,i^T (grad_{W_i} L(z) / sqrt(V_i)) P_out,i)
with L(z) the summed masked NLL (`losses.example_losses`: every real token of
a training example, only the target tokens of a query) — raw and
task-independent; R^{-1/2} and the unit norm are applied later
(`hessian.unit_encode`). Padding rows (`ids < 0`) encode to 0.

Options: `EncoderOptions` (param_regex, block_regex, layers_per_group, d_in,
d_out, seed, correction, bias_correction, eps, b2, layer_mode,
projection_dtype), given as `options=` or as a ConfigDict (`config=config.encoder`).

Distribution: one jitted program per process with explicit shardings on
`mesh`: the batch split over the "data" axis, params and projection matrices
replicated. For a model too large for one device, pass `param_sharding` (a
Sharding or a pytree of them, `sharding.param_shardings`, e.g. over a "model"
mesh axis): the batch stays split over "data" only, each traced kernel's
P_in / P_out and correction factors are split along the same mesh axes as the
kernel axes they span (`array_specs`), and XLA partitions the taps with the
layers. Each process passes its own rows; `encode_local` returns them, unpadded.

Public API:
  TrackStarEncoder(*, model_apply, params, options=None | config=None, opt_state=None,
                   correction=None, mesh=None, loss_fn=None, block_fn=None,
                   param_sharding=None, seq_len=8)
    .dim, .blocks, .plan, .correction, .modes()
    .encode(batch) -> jax.Array [B, d]; .encode_local(batch) -> np [B_local, d]
    .reference(batch) -> [B, d] (brute force vmap(grad); tests only)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from trackstar_jax import batch as batch_lib
from trackstar_jax import gradients, losses, projection
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import optimizer_correction as oc
from trackstar_jax import options as opts_lib

BATCH_FIELDS = ("inputs", "targets", "loss_mask", "pad_mask")


def _host(a: Any) -> np.ndarray:
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return np.asarray(a.addressable_data(0))  # replicated: any local copy
  return np.asarray(a)


def _kernel_specs(params: Any, param_sharding: Any) -> dict[str, tuple]:
  """canonical path -> the kernel's spec entries (one per axis), from a pytree of NamedShardings."""
  if param_sharding is None or isinstance(param_sharding, jax.sharding.Sharding):
    return {}
  out = {}
  for path, s in projection.flatten_paths(param_sharding).items():
    spec = tuple(getattr(s, "spec", ()))
    out[projection.canonical_path(path)] = spec
  shapes = {projection.canonical_path(p): np.ndim(a) for p, a in projection.flatten_paths(params).items()}
  return {p: spec + (None,) * (shapes.get(p, len(spec)) - len(spec)) for p, spec in out.items()}


def array_specs(projector: gradients.GradientProjector, kernel_specs: Mapping[str, tuple]) -> dict[str, Any]:
  """PartitionSpecs of `projector.arrays` matching their kernels' shardings.

  P_in [*in_shape, d_in] is split like the kernel's input axes, P_out [*out_shape, d_out] like its output
  axes, a correction factor over kernel axes like those axes; d_in / d_out are replicated.
  """
  out = {}
  for path, st in projector.static.items():
    spec = kernel_specs.get(projection.canonical_path(path), (None,) * len(st.layout.shape))
    on = lambda axes, extra=(), spec=spec: P(*(tuple(spec[a] for a in axes) + extra))
    out[path] = dict(
      p_in=on(st.layout.in_axes, (None,)),
      p_out=on(st.layout.out_axes, (None,)),
      factors=tuple(on(axes) for axes in st.factor_axes),
    )
  return out


def _place(tree: Any, sharding: Any) -> Any:
  """Puts a pytree on `sharding` (one Sharding or a matching pytree of them)."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)

  def one(a, s):
    if isinstance(a, jax.Array) and (a.sharding == s or a.sharding.is_equivalent_to(s, a.ndim)):
      return a
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if a.sharding.is_fully_replicated:  # any local copy is the whole array
        a = _host(a)
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
      return jax.device_put(a, s)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

  return jax.tree.map(one, tree, sharding)


def _dummy_batch(seq_len: int) -> dict[str, np.ndarray]:
  return dict(
    inputs=np.ones((1, seq_len), np.int32),
    targets=np.ones((1, seq_len), np.int32),
    loss_mask=np.ones((1, seq_len), np.float32),
    pad_mask=np.ones((1, seq_len), bool),
    ids=np.zeros((1,), np.int32),
  )


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
  """How phi is computed. The defaults here are the project's defaults (config section `encoder`).

  Attributes:
    param_regex: regex on '/'-joined parameter paths selecting the traced
      kernels (default: every block weight matrix of `models.DecoderLM`).
    block_regex: named groups of a path that form its block key; group
      `layer` is divided by `layers_per_group`.
    layers_per_group: consecutive layers sharing one projection block.
    d_in, d_out: per-block projection size: d_in x d_out dims per block.
    seed: projection seed (projections derive from (seed, parameter path)).
    correction: none | adam | adam_rank1 | adafactor | auto (from the optax
      state: Adam's nu when present, else Adafactor's factored moments).
    bias_correction: divide Adam's nu by 1 - b2^t.
    eps: Adam's epsilon (an `inject_hyperparams` eps in the state wins).
    b2: Adam's b2, needed for bias correction only (likewise).
    layer_mode: auto | fused | layer (debug: force per-layer per-example G).
    projection_dtype: auto (bf16 operands for bf16 models on GPU/TPU) | float32.
    layer_kernel: auto | xla | pallas: how a layer-mode layer with an elementwise correction (exact
      Adam) scales and projects its per-example G. auto: `scaled_projection`'s Pallas kernel on a GPU
      with bf16 operands and d_out <= 128 (it measured faster at 128-512 tokens), where the kernel
      tiles and the mesh shards the batch only; else einsums;
      xla: always einsums; pallas: the kernel wherever it tiles (Pallas' interpreter off GPUs: tests).
  """

  param_regex: str = r"block_\d+/(attn|mlp)/.*/kernel$"
  block_regex: str = projection.DEFAULT_BLOCK_REGEX
  layers_per_group: int = 1
  d_in: int = 16
  d_out: int = 16
  seed: int = 0
  correction: str = "auto"
  bias_correction: bool = False
  eps: float = 1e-8
  b2: float | None = None
  layer_mode: str = "auto"
  projection_dtype: str = "auto"
  layer_kernel: str = "auto"


# Fields of the config section `encoder` that belong to the jobs, not to the encoder.
JOB_FIELDS = ("batch_size", "step")


class TrackStarEncoder:
  """Per-example projected, optimizer-corrected gradients on a device mesh."""

  def __init__(
    self,
    *,
    model_apply: Callable[..., jax.Array] | None = None,
    params: Any,
    options: EncoderOptions | None = None,
    config: Any = None,
    opt_state: Any = None,
    correction: oc.Correction | None = None,
    mesh: jax.sharding.Mesh | None = None,
    loss_fn: gradients.LossFn | None = None,
    block_fn: Callable[[str], Any] | None = None,
    param_sharding: Any = None,
    seq_len: int = 8,
  ):
    """Traces the model once (shapes only) and prepares the projections.

    Args:
      model_apply: `model.apply`-like: (params, inputs [B, T], pad_mask [B, T])
        -> logits [B, T, V]. Ignored when `loss_fn` is given.
      params: the variables passed to `model_apply` (e.g. {"params": ...}).
      options: `EncoderOptions` (default: the defaults).
      config: alternatively a ConfigDict / mapping of `EncoderOptions` fields
        (e.g. `config.encoder`; job-only fields `batch_size`, `step` ignored).
      opt_state: optax state or `optimizer_correction.restore_second_moments`
        tree, for corrections other than 'none'.
      correction: a prebuilt `Correction` (overrides options/opt_state).
      mesh: device mesh with a "data" axis (default: all devices).
      loss_fn: (params, batch) -> per-example losses [B] (default: summed
        masked NLL of `model_apply`'s logits).
      block_fn: path -> block key (default: options.block_regex / layer groups).
      param_sharding: Sharding (or pytree) for params; default replicated.
      seq_len: sequence length of the abstract trace (kernel shapes only).
    """
    if options is not None and config is not None:
      raise ValueError("Pass options= or config=, not both.")
    if options is None:
      options = opts_lib.from_config(EncoderOptions, config, ignore=JOB_FIELDS)
    if loss_fn is None:
      if model_apply is None:
        raise ValueError("TrackStarEncoder needs model_apply= or loss_fn=.")
      loss_fn = lambda p, b: losses.example_losses(model_apply(p, b["inputs"], b["pad_mask"]), b)
    self.loss_fn = loss_fn
    self.options = options
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    if "data" not in self.mesh.axis_names:
      raise ValueError(f"The encoder mesh needs a 'data' axis, got axes {self.mesh.axis_names}.")
    paths = projection.select_paths(params, regex=options.param_regex)
    layouts = gradients.trace_layouts(loss_fn, params, _dummy_batch(seq_len), paths=paths)
    if block_fn is None:
      block_fn = projection.block_key_fn(
        block_regex=options.block_regex or projection.DEFAULT_BLOCK_REGEX,
        layers_per_group=int(options.layers_per_group),
      )
    self.plan = projection.ProjectionPlan.create(
      layouts, d_in=int(options.d_in), d_out=int(options.d_out), seed=int(options.seed), block_fn=block_fn
    )
    if correction is None:
      kind = str(options.correction)
      if kind == "auto" and opt_state is None:
        logging.warning(
          "TrackStarEncoder: no optimizer state given: encoding WITHOUT optimizer correction "
          "(pass opt_state=, or correction='none' to silence this)."
        )
        kind = "none"
      correction = oc.make_correction(
        kind=kind,
        layouts=layouts,
        opt_state=opt_state,
        eps=float(options.eps),
        bias_correction=bool(options.bias_correction),
        b2=options.b2,
      )
    self.correction = correction
    self.projector = gradients.GradientProjector(
      plan=self.plan,
      correction=correction,
      layer_mode=str(options.layer_mode),
      projection_dtype=str(options.projection_dtype),
      layer_kernel=str(options.layer_kernel),
      mesh=self.mesh,
    )
    replicated = NamedSharding(self.mesh, P())
    self._param_sharding = param_sharding if param_sharding is not None else replicated
    self.params = _place(params, self._param_sharding)
    specs = array_specs(self.projector, _kernel_specs(params, param_sharding))
    self.array_shardings = jax.tree.map(
      lambda sp: NamedSharding(self.mesh, sp), specs, is_leaf=lambda x: isinstance(x, P)
    )
    self.arrays = _place(self.projector.arrays, self.array_shardings)
    self._n_data = self.mesh.shape["data"]
    if self._n_data % jax.process_count():
      raise ValueError(
        f"The encoder mesh's 'data' axis ({self._n_data}) must split over the {jax.process_count()} processes"
        f" (each encodes its own rows): use a mesh whose 'data' size is a multiple of {jax.process_count()}"
        f" (mesh axes {dict(self.mesh.shape)})."
      )
    self._local_data = max(1, self._n_data // jax.process_count())
    self._fn = jax.jit(
      lambda params, arrays, batch: self.projector.phi(self.loss_fn, params, arrays, batch),
      out_shardings=NamedSharding(self.mesh, P("data", None)),
    )
    logging.info(
      "TrackStarEncoder: %d traced kernels in %d blocks, dim %d, correction %r, modes %s",
      len(layouts),
      len(self.plan.blocks),
      self.dim,
      correction.kind,
      sorted(set(self.projector.modes().values())),
    )

  @property
  def dim(self) -> int:
    return self.plan.dim

  @property
  def blocks(self) -> list[str]:
    return self.plan.blocks

  def modes(self) -> dict[str, str]:
    """Per traced kernel: 'fused' or 'layer' (per-example G for that layer)."""
    return self.projector.modes()

  def _prepare(self, batch: Mapping[str, Any]) -> tuple[dict[str, jax.Array], int]:
    missing = [k for k in BATCH_FIELDS if k not in batch]
    if missing:
      raise ValueError(f"Batch is missing fields {missing}; see trackstar_jax.losses for the batch convention.")
    rows = {k: np.asarray(batch[k]) for k in BATCH_FIELDS}
    b = rows["inputs"].shape[0]
    ids = np.asarray(batch["ids"]) if "ids" in batch else np.zeros((b,), np.int64)
    rows["ids"] = np.where(ids >= 0, 0, -1).astype(np.int32)
    # Padding rows: one real-looking token (so attention is well defined), ids -1, no loss tokens.
    rows = batch_lib.pad_rows(rows, b + (-b % self._local_data), fill={"pad_mask": True})
    return mesh_lib.shard_batch(rows, self.mesh), b

  def encode(self, batch: Mapping[str, Any]) -> jax.Array:
    """phi [B, d] float32 of this batch (numpy rows of this process).

    One process: exactly the B given rows. Several processes: the global
    [sum of padded per-process rows, d] array (use `encode_local`).
    """
    global_batch, b = self._prepare(batch)
    phi = self._fn(self.params, self.arrays, global_batch)
    if jax.process_count() == 1 and phi.shape[0] != b:
      phi = phi[:b]
    return phi

  def encode_local(self, batch: Mapping[str, Any]) -> np.ndarray:
    """phi [B_local, d] as numpy: this process's rows, in order, unpadded."""
    global_batch, b = self._prepare(batch)
    phi = self._fn(self.params, self.arrays, global_batch)
    shards = {}
    for s in phi.addressable_shards:
      shards.setdefault(s.index[0].start or 0, s)
    local = np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])
    return local[:b]

  def reference(self, batch: Mapping[str, Any]) -> jax.Array:
    """Brute-force phi (vmap(grad) per example): for tests and debugging."""
    rows = dict(batch)
    if "ids" in rows:
      rows["ids"] = np.where(np.asarray(rows["ids"]) >= 0, 0, -1).astype(np.int32)
    rows = {k: jnp.asarray(v) for k, v in rows.items() if k in BATCH_FIELDS + ("ids",)}
    params = jax.tree.map(lambda a: jnp.asarray(_host(a)), self.params)
    return gradients.reference_phi(self.loss_fn, params, rows, plan=self.plan, correction=self.correction)
