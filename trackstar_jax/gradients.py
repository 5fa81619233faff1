"""Projected per-example gradients: the fused path and the brute-force reference.

Fused path (any Flax Linen or NNX model, unmodified). For a linear layer y = x W,
an example's kernel gradient is G = sum_t x_t delta_t^T (x: layer inputs,
delta: loss gradient w.r.t. the layer outputs, t over tokens and any other
non-kernel axes), so its projection needs only the projected factors:

  P_in^T G P_out = (X P_in)^T (Delta P_out)        [d_in, d_out]

`layer_registry.intercept` wraps every `__call__` of a registered linear
layer (Linen `nn.Dense` / `DenseGeneral` / `Einsum`, NNX `nnx.Linear` /
`LinearGeneral` / `Einsum`, gemma's `Einsum`; see layer_registry.py for how
their inputs, kernel paths and einsum labels are read) whose kernel is traced:

* forward: records X P_in (corrections folded in) — a [B, T, d_in] residual
  instead of the [B, T, n] input a training step keeps for its weight
  gradient;
* the output passes through an identity `custom_vjp` "tap" that also takes a
  zero accumulator z_b [B, d_in, d_out] of its block; its backward rule
  receives Delta (the output cotangent), passes it on unchanged, and returns
  (X P_in)^T (Delta P_out) as the cotangent of z_b.

One `jax.grad` of sum_b L(z_b) w.r.t. the accumulators then yields every
example's Phi_b at once: examples do not interact in the forward pass, so the
cotangent of row b is example b's own delta. Neither parameter gradients nor
any n x m per-example matrix are formed, and only activation gradients are
back-propagated (no weight-gradient matmuls), so the work is at most that of
a training step. Why intercept rather than `Module.perturb`: perturb needs the
model to call `self.perturb` (editing the model) and materializes Delta as a
[B, T, m] gradient output for every layer at once; the tap consumes Delta in
place and keeps only [B, d_in, d_out].

Corrections (see optimizer_correction.py) are products of factors over kernel
axes. Factors over input axes only (output axes only) are folded into P_in
(P_out): Adafactor on 2-axis kernels and adam_rank1 cost nothing extra. A
factor coupling input and output axes (Adafactor on a [D, H, Dh] kernel: a
per-head factor) adds the coupled output axes to X P_in ([B, T, H, d_in]).
When that would exceed the input's own size (an element-wise Adam nu), the
layer runs "per-layer": its tap keeps X, and its backward rule forms
G = X^T Delta [B, n, m] for this layer only, multiplies by 1/sqrt(V),
projects and discards it before the next layer's backward runs.

Reference path: `jax.vmap(jax.grad(loss))` over examples w.r.t. the traced
kernels, element-wise correction, then `ProjectionPlan.project`. Any JAX loss.

Public API:
  trace_layouts(loss_fn, params, batch, *, paths) -> {path: KernelLayout}
  GradientProjector(plan=, correction=, layer_mode="auto", projection_dtype="auto", layer_kernel="auto", mesh=None)
    .arrays (pytree to pass into jit), .phi(loss_fn, params, arrays, batch)
  reference_phi(loss_fn, params, batch, *, plan, correction) -> [B, d]
where loss_fn(params, batch) -> per-example losses [B].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax import layer_registry, projection, scaled_projection
from trackstar_jax import optimizer_correction as oc

CallLabels = layer_registry.CallLabels
_INNER_JIT_HINT = (
  "jax.jit / nn.jit inside the model may have replayed a cached trace, in which the layer calls do not run"
  " (gemma's Transformer.__call__ is nn.jit-ed): call the model under `jax.disable_jit()` inside model_apply"
  " (trackstar_jax.models.gemma_lm.model_apply does), so that its layers run under the encoder's trace."
)
LossFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]


def trace_layouts(
  loss_fn: LossFn, params: Any, batch: Mapping[str, Any], *, paths: Sequence[str]
) -> dict[str, projection.KernelLayout]:
  """Matrix layouts of the traced kernels, from one abstract (shape-only) call.

  Raises:
    ValueError: a traced parameter is not the kernel of an intercepted
      registered layer call (the message lists the layer types met), or its
      shape differs from the call's.
  """
  shapes = {projection.canonical_path(p): tuple(np.shape(l)) for p, l in projection.flatten_paths(params).items()}
  wanted = {projection.canonical_path(p) for p in paths}
  found: dict[str, projection.KernelLayout] = {}

  def record(path, labels, x, y):
    sizes = dict(zip(labels.x, x.shape)) | dict(zip(labels.y, y.shape))
    shape = tuple(sizes[l] for l in labels.k)
    if shape != shapes[path]:
      raise ValueError(
        f"Traced kernel {path!r}: parameter shape {shapes[path]} but the layer call uses {shape}"
        " (layers under nn.scan/vmap are not supported by the fused path)."
      )
    layout = projection.KernelLayout(shape, labels.in_axes)
    if found.setdefault(path, layout) != layout:
      raise ValueError(f"Traced kernel {path!r} is called with different matrix layouts.")
    return y

  seen = {}

  def run(params, batch):
    with layer_registry.intercept(paths=wanted, on_call=record) as active:
      try:
        return loss_fn(params, batch)
      finally:
        seen.update(active.seen)

  jax.eval_shape(run, params, batch)
  missing = sorted(wanted - set(found))
  if missing:
    types = ", ".join(seen) or "none (no Linen module call, no NNX module under layer_registry.nnx_module_paths)"
    raise ValueError(
      f"Parameters {missing} match encoder.param_regex but are not kernels of nn.Dense/DenseGeneral/Einsum calls"
      " (or of another registered linear layer) seen in the forward pass: exclude them via encoder.param_regex"
      " (or use reference_phi), or register their layer type with layer_registry.register_layer."
      f" Module types in the model: {types}. Registered: {', '.join(layer_registry.registered_names())}."
      f" If the layers are there, an inner {_INNER_JIT_HINT}"
    )
  return {p: found[p] for p in sorted(found, key=list(shapes).index)}


@dataclasses.dataclass(frozen=True)
class _LayerStatic:
  block: int
  mode: str  # "fused" | "layer"
  factor_axes: tuple[tuple[int, ...], ...]  # factors not folded into P
  factor_sides: tuple[str, ...]  # "x" | "y": which projected factor applies it
  projection_dtype: str  # "auto" | "float32"
  layout: projection.KernelLayout
  layer_kernel: str = "xla"  # layer mode: "xla" (einsums) | "pallas" (`scaled_projection`) | "auto" (per call)


def _fold(factor: oc.Factor, group_axes: tuple[int, ...]) -> jax.Array:
  """A factor over some of `group_axes` as a multiplier of P [*group_shape, d]."""
  values = jnp.asarray(factor.values, jnp.float32)
  values = jnp.expand_dims(values, [i for i, a in enumerate(group_axes) if a not in factor.axes])
  return values[..., None]


class GradientProjector:
  """Fused per-example projected gradients for a plan and a correction."""

  def __init__(
    self,
    *,
    plan: projection.ProjectionPlan,
    correction: oc.Correction,
    layer_mode: str = "auto",
    projection_dtype: str = "auto",
    layer_kernel: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
  ):
    if layer_mode not in ("auto", "fused", "layer"):
      raise ValueError(f"encoder.layer_mode must be auto|fused|layer, got {layer_mode!r}.")
    if projection_dtype not in ("auto", "float32"):
      raise ValueError(f"encoder.projection_dtype must be auto|float32, got {projection_dtype!r}.")
    if layer_kernel not in ("auto", "xla", "pallas"):
      raise ValueError(f"encoder.layer_kernel must be auto|xla|pallas, got {layer_kernel!r}.")
    self.plan = plan
    self.mesh = mesh
    self._traced: dict[str, str] = {}
    self.static: dict[str, _LayerStatic] = {}
    arrays = {}
    for path, layout in plan.layouts.items():
      p_in, p_out = plan.matrices(path)
      factors = correction.get(path)
      in_set, out_set = set(layout.in_axes), set(layout.out_axes)
      # A factor spanning input and output axes stays unfolded: on the x side
      # it keeps its output axes in X P_in, on the delta side its input axes in
      # Delta P_out; pick the smaller, and fall back to the per-layer path when
      # either would exceed the layer's own input / output width.
      sides, couple_out, couple_in = [], set(), set()
      for f in factors:
        f_in, f_out = set(f.axes) & in_set, set(f.axes) & out_set
        if not f_in or not f_out:
          sides.append("fold")
        elif (
          math.prod(layout.shape[a] for a in f_out) * plan.d_in <= math.prod(layout.shape[a] for a in f_in) * plan.d_out
        ):
          sides.append("x")
          couple_out |= f_out
        else:
          sides.append("y")
          couple_in |= f_in
      mode = layer_mode
      if mode == "auto":
        fits = (
          math.prod(layout.shape[a] for a in couple_out) * plan.d_in <= layout.n
          and math.prod(layout.shape[a] for a in couple_in) * plan.d_out <= layout.m
        )
        mode = "fused" if fits else "layer"
      in_shape = tuple(layout.shape[a] for a in layout.in_axes)
      out_shape = tuple(layout.shape[a] for a in layout.out_axes)
      p_in = jnp.asarray(p_in).reshape(in_shape + (plan.d_in,))
      p_out = jnp.asarray(p_out).reshape(out_shape + (plan.d_out,))
      rest, rest_sides = [], []
      for f, side in zip(factors, sides):
        if list(f.axes) != sorted(f.axes):
          raise ValueError(f"Correction factor axes must be increasing, got {f.axes} for {path!r}.")
        if mode == "fused" and set(f.axes) <= in_set:
          p_in = p_in * _fold(f, layout.in_axes)
        elif mode == "fused" and set(f.axes) <= out_set:
          p_out = p_out * _fold(f, layout.out_axes)
        else:
          rest.append(f)
          rest_sides.append("x" if side == "fold" else side)
      kernel = "xla"
      if mode == "layer" and _scale_project_fits(layer_kernel, rest, layout, plan.d_out, mesh):
        kernel = layer_kernel
      self.static[path] = _LayerStatic(
        plan.block_of[path], mode, tuple(f.axes for f in rest), tuple(rest_sides), projection_dtype, layout, kernel
      )
      arrays[path] = dict(p_in=p_in, p_out=p_out, factors=tuple(jnp.asarray(f.values, jnp.float32) for f in rest))
    self.arrays = arrays

  def modes(self) -> dict[str, str]:
    return {p: s.mode for p, s in self.static.items()}

  def layer_kernels(self) -> dict[str, str]:
    """Per layer-mode kernel, how it scales and projects G: "pallas" (`scaled_projection`) or "xla"
    (einsums) as the last trace of `phi` ran it; before any trace, the choice ("auto": Pallas on a GPU
    with bf16 operands and d_out <= `scaled_projection.AUTO_MAX_D_OUT`)."""
    return {p: self._traced.get(p, s.layer_kernel) for p, s in self.static.items() if s.mode == "layer"}

  def phi(self, loss_fn: LossFn, params: Any, arrays: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """phi [B, d] float32 of every example of `batch` (call inside jit).

    Rows with `batch["ids"] < 0` (padding) contribute no loss: phi = 0.
    """
    plan = self.plan
    b = (batch["inputs"] if "inputs" in batch else jax.tree.leaves(batch)[0]).shape[0]
    zs = [jnp.zeros((b, plan.d_in, plan.d_out), jnp.float32) for _ in plan.blocks]

    def total_loss(zs):
      tapped = set()

      def on_call(path, labels, x, y):
        tapped.add(path)
        st = self.static[path]
        arr = arrays[path]
        if x.shape[0] != b:
          raise ValueError(f"Layer {path!r}: input leading axis {x.shape[0]} is not the batch size {b}.")
        if st.mode == "fused":
          return _fused_tap(labels, st, arr, jax.lax.stop_gradient(x), y, zs[st.block])
        use = _use_pallas(st, _compute_dtype(x, st.projection_dtype), arr["p_out"].shape[-1])
        self._traced[path] = "pallas" if use else "xla"
        return _layer_tap(labels, st, arr, jax.lax.stop_gradient(x), y, zs[st.block], pallas=use, mesh=self.mesh)

      with layer_registry.intercept(paths=set(self.static), on_call=on_call):
        losses = loss_fn(params, batch)
      if tapped != set(self.static):  # trace time only
        raise ValueError(
          f"Traced layers {sorted(set(self.static) - tapped)} were not called in this trace of the loss: an inner"
          f" {_INNER_JIT_HINT}"
        )
      if "ids" in batch:
        losses = jnp.where(batch["ids"] >= 0, losses, 0.0)
      return jnp.sum(losses)

    grads = jax.grad(total_loss)(zs)
    return plan.assemble(grads)


def _compute_dtype(a: jax.Array, projection_dtype: str):
  """Operand dtype of the projection matmuls (accumulation is always float32).

  "auto": the activations' dtype on accelerators (a bf16 model projects with
  bf16 operands at tensor-core speed; P is then P rounded to bf16, the same
  matrix for every example), float32 on CPU (no bf16 x bf16 -> f32 dots).
  "float32": always float32 (matches the float32 reference exactly).
  """
  if projection_dtype == "float32" or jax.default_backend() == "cpu":
    return jnp.float32
  return jnp.promote_types(a.dtype, jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32


def _mm(eq: str, *operands, dtype) -> jax.Array:
  return jnp.einsum(eq, *[o.astype(dtype) for o in operands], preferred_element_type=jnp.float32)


def _factor_labels(labels: CallLabels, axes_list) -> list[str]:
  return ["".join(labels.k[a] for a in axes) for axes in axes_list]


def _fused_tap(labels: CallLabels, st: _LayerStatic, arr, x, y, z):
  in_l, out_l = labels.in_labels, labels.out_labels
  pure_in = "".join(l for l in in_l if l not in labels.y)
  f_l = _factor_labels(labels, st.factor_axes)
  x_side = [i for i, side in enumerate(st.factor_sides) if side == "x"]
  y_side = [i for i, side in enumerate(st.factor_sides) if side == "y"]
  couple_out = "".join(l for l in out_l if any(l in f_l[i] for i in x_side))
  couple_in = "".join(l for l in pure_in if any(l in f_l[i] for i in y_side))
  keep = "".join(l for l in labels.x if l not in pure_in or l in couple_in) + couple_out
  xp_eq = ",".join([labels.x] + [f_l[i] for i in x_side] + [in_l + "Y"]) + "->" + keep + "Y"
  dtype = _compute_dtype(x, st.projection_dtype)
  xp = _mm(xp_eq, x, *[arr["factors"][i] for i in x_side], arr["p_in"], dtype=dtype)
  dp_keep = "".join(l for l in labels.y if l not in out_l or l in couple_out) + couple_in
  dp_eq = ",".join([labels.y] + [f_l[i] for i in y_side] + [out_l + "Z"]) + "->" + dp_keep + "Z"
  phi_eq = f"{keep}Y,{dp_keep}Z->{labels.x[0]}YZ"
  y_factors = tuple(arr["factors"][i] for i in y_side)

  @jax.custom_vjp
  def tap(y, z, xp, p_out, y_factors):
    del z, xp, p_out, y_factors
    return y

  def fwd(y, z, xp, p_out, y_factors):
    del z
    return y, (xp, p_out, y_factors)

  def bwd(res, dy):
    xp, p_out, y_factors = res
    dp = _mm(dp_eq, dy, *y_factors, p_out, dtype=dtype)
    phi = jnp.einsum(phi_eq, xp, dp)  # float32: the per-example sum over tokens
    return dy, phi, None, None, None

  tap.defvjp(fwd, bwd)
  return tap(y, z, xp, arr["p_out"], y_factors)


def _broadcast(values: jax.Array, labels: str, target: str) -> jax.Array:
  """values over `labels` (in target order) expanded to broadcast over `target`."""
  return jnp.expand_dims(values, [i for i, l in enumerate(target) if l not in labels])


def _scale_project_fits(layer_kernel: str, factors, layout: projection.KernelLayout, d_out: int, mesh) -> bool:
  """Whether `scaled_projection` can take this layer: one elementwise factor over the whole kernel (exact
  Adam), a kernel that tiles within shared memory at this d_out, a mesh that shards the batch only."""
  return (
    layer_kernel != "xla"
    and len(factors) == 1
    and tuple(factors[0].axes) == tuple(range(len(layout.shape)))
    and scaled_projection.tiles(layout.n, layout.m, d_out) is not None  # one example per program at least
    and scaled_projection.mesh_supported(mesh)
  )


def _use_pallas(st: _LayerStatic, dtype, d_out: int) -> bool:
  if st.layer_kernel != "auto":
    return st.layer_kernel == "pallas"
  return scaled_projection.auto_chooses(dtype, jax.default_backend(), d_out)


def _layer_tap(labels: CallLabels, st: _LayerStatic, arr, x, y, z, *, pallas: bool = False, mesh=None):
  ex = labels.x[0]
  g_eq = f"{labels.x},{labels.y}->{ex}{labels.k}"
  f_l = _factor_labels(labels, st.factor_axes)
  phi_eq = f"{ex}{labels.k},{labels.in_labels}Y,{labels.out_labels}Z->{ex}YZ"

  @jax.custom_vjp
  def tap(y, z, x, arrays):
    del z, x, arrays
    return y

  def fwd(y, z, x, arrays):
    del z
    return y, (x, arrays)

  def bwd(res, dy):
    x, arrays = res
    dtype = _compute_dtype(x, st.projection_dtype)
    if pallas:  # G in the operand dtype from the matmul library; scaling fused into P_out's matmul
      lay = st.layout
      g = jnp.einsum(g_eq, x.astype(dtype), dy.astype(dtype), preferred_element_type=dtype)
      p_in = arrays["p_in"].reshape(lay.n, -1)
      h = scaled_projection.sharded_scale_project(
        lay.as_matrix(g),
        lay.as_matrix(arrays["factors"][0]),
        arrays["p_out"].reshape(lay.m, -1).astype(dtype),
        mesh=mesh,
        interpret=jax.default_backend() != "gpu",
      )
      return dy, _mm("bKZ,KY->bYZ", h, p_in, dtype=dtype), None, None
    g = _mm(g_eq, x, dy, dtype=dtype)  # [B, *kernel] float32: this layer only
    for f, fl in zip(arrays["factors"], f_l):
      g = g * _broadcast(f, fl, ex + labels.k)
    phi = _mm(phi_eq, g, arrays["p_in"], arrays["p_out"], dtype=dtype)
    return dy, phi, None, None

  tap.defvjp(fwd, bwd)
  return tap(y, z, x, arr)


def reference_phi(
  loss_fn: LossFn, params: Any, batch: Mapping[str, Any], *, plan: projection.ProjectionPlan, correction: oc.Correction
) -> jax.Array:
  """Brute force: vmap(grad) per example, element-wise correction, projection."""
  traced = {p: l for p, l in projection.flatten_paths(params).items() if projection.canonical_path(p) in plan.layouts}

  def merged(tr):
    def pick(kp, leaf):
      return tr.get(projection.keypath_str(kp), leaf)

    return jax.tree_util.tree_map_with_path(pick, params)

  def one(tr, row):
    row1 = jax.tree.map(lambda a: a[None], row)
    loss = loss_fn(merged(tr), row1)[0]
    if "ids" in row:
      loss = jnp.where(row["ids"] >= 0, loss, 0.0)
    return loss

  matrices = {p: plan.matrices(p) for p in plan.layouts}

  @jax.jit
  def run(traced, batch):
    grads = jax.vmap(jax.grad(one), in_axes=(None, 0))(traced, batch)
    corrected = {projection.canonical_path(p): correction.apply(p, g) for p, g in grads.items()}
    return plan.project(corrected, matrices=matrices)

  return run(traced, {k: jnp.asarray(v) for k, v in batch.items()})
