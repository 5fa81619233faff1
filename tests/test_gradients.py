"""Fused projected gradients == brute-force vmap(grad) reference, every correction."""

from batch_helpers import random_batch
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar_jax import gradients, losses, projection
from trackstar_jax import optimizer_correction as oc
from trackstar_jax.models.transformer import DecoderLM, TransformerConfig

V, T = 40, 8


class Custom(nn.Module):
  """Multi-axis DenseGeneral and Einsum kernels, incl. a shared (head) axis and '...'."""

  @nn.compact
  def __call__(self, tokens, pad_mask=None):
    x = nn.Embed(V, 8, name="embed")(tokens)  # [B, T, 8]
    h = jnp.tanh(nn.DenseGeneral((2, 3), name="dg_in")(x))  # kernel [8, 2, 3]
    x = x + nn.DenseGeneral(8, axis=(-2, -1), name="dg_out")(h)  # kernel [2, 3, 8]
    e = jnp.tanh(nn.Einsum((8, 2, 5), "btd,dhk->bthk", name="ein_split")(x))  # kernel [8, 2, 5]
    e = jnp.tanh(nn.Einsum((2, 5, 4), "...hk,hkj->...hj", use_bias=False, name="ein_shared")(e))  # [2, 5, 4]
    x = x + nn.Einsum((2, 4, 8), "bthj,hjd->btd", name="ein_merge")(e)  # kernel [2, 4, 8]
    return nn.Dense(V, name="head")(x)


CUSTOM_REGEX = r"(dg_|ein_|head).*kernel$"
CUSTOM_BLOCKS = r"(?P<kind>dg|ein|head)"


def make_batch(b, seed=0):
  return random_batch(b, vocab=V, seq_len=T, seed=seed)


def setup_model(which):
  if which == "decoder":
    model = DecoderLM(TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=T))
    regex, block_fn = r"block_\d+/(attn|mlp)/.*/kernel$", projection.block_key_fn()
  else:
    model = Custom()
    regex, block_fn = CUSTOM_REGEX, projection.block_key_fn(block_regex=CUSTOM_BLOCKS)
  params = model.init(jax.random.key(0), jnp.ones((1, T), jnp.int32))
  # Non-trivial kernels everywhere (biases too) so gradients are not degenerate.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  loss_fn = lambda p, b: losses.example_losses(model.apply(p, b["inputs"], b["pad_mask"]), b)
  batch = make_batch(3)
  layouts = gradients.trace_layouts(loss_fn, params, batch, paths=projection.select_paths(params, regex=regex))
  plan = projection.ProjectionPlan.create(layouts, d_in=3, d_out=4, seed=7, block_fn=block_fn)
  return params, loss_fn, batch, layouts, plan


def random_state(kind, params, layouts, seed=1):
  rng = np.random.default_rng(seed)
  positive = lambda x: jnp.asarray(rng.uniform(0.2, 3.0, np.shape(x)), jnp.float32)
  if kind == "none":
    return None
  if kind in ("adam", "adam_rank1_exact"):
    state = optax.adam(1e-3).init(params)
    return jax.tree.map(lambda x: positive(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  if kind == "rank1_nu":  # nu rank-1 on each traced kernel's matrix view
    state = optax.scale_by_adam().init(params)

    def nu(path, x):
      layout = layouts.get(projection.canonical_path(projection.keypath_str(path)))
      if layout is None:
        return positive(x)
      r, c = rng.uniform(0.2, 3.0, layout.n), rng.uniform(0.2, 3.0, layout.m)
      mat = np.outer(r, c).reshape([layout.shape[a] for a in layout.in_axes + layout.out_axes])
      inv = np.argsort(layout.in_axes + layout.out_axes)
      return jnp.asarray(mat.transpose(inv), jnp.float32)

    return state._replace(nu=jax.tree_util.tree_map_with_path(nu, state.nu))
  if kind == "adafactor":
    state = optax.adafactor(1e-3, min_dim_size_to_factor=4).init(params)
    return jax.tree.map(lambda x: positive(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  raise ValueError(kind)


CASES = [
  ("decoder", "none"),
  ("decoder", "adam"),
  ("decoder", "adafactor"),
  ("custom", "none"),
  ("custom", "adam"),
  ("custom", "adafactor"),
]


@pytest.mark.parametrize("which,kind", CASES)
def test_fused_matches_reference(which, kind):
  params, loss_fn, batch, layouts, plan = setup_model(which)
  corr = oc.make_correction(kind=kind, layouts=layouts, opt_state=random_state(kind, params, layouts))
  proj = gradients.GradientProjector(plan=plan, correction=corr)
  phi = jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)
  ref = gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=corr)
  assert phi.shape == (3, plan.dim) and np.all(np.isfinite(phi))
  rel = float(jnp.linalg.norm(phi - ref) / jnp.linalg.norm(ref))
  assert rel < 1e-4, (which, kind, rel, proj.modes())
  if kind == "adafactor" and which == "custom":  # both paths are exercised
    assert set(proj.modes().values()) == {"fused", "layer"}, proj.modes()


@pytest.mark.parametrize("which", ["decoder", "custom"])
def test_forced_per_layer_mode_matches_reference(which):
  params, loss_fn, batch, layouts, plan = setup_model(which)
  corr = oc.make_correction(kind="adafactor", layouts=layouts, opt_state=random_state("adafactor", params, layouts))
  proj = gradients.GradientProjector(plan=plan, correction=corr, layer_mode="layer")
  phi = jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)
  ref = gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=corr)
  assert float(jnp.linalg.norm(phi - ref) / jnp.linalg.norm(ref)) < 1e-4


@pytest.mark.parametrize("which", ["decoder", "custom"])
def test_adam_rank1_is_exact_on_rank1_nu(which):
  params, loss_fn, batch, layouts, plan = setup_model(which)
  state = random_state("rank1_nu", params, layouts)
  rank1 = oc.make_correction(kind="adam_rank1", layouts=layouts, opt_state=state)
  exact = oc.make_correction(kind="adam", layouts=layouts, opt_state=state)
  proj = gradients.GradientProjector(plan=plan, correction=rank1)
  assert set(proj.modes().values()) == {"fused"}
  phi = jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)
  ref = gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=exact)
  assert float(jnp.linalg.norm(phi - ref) / jnp.linalg.norm(ref)) < 1e-4
  # On a general nu the rank-1 fit is an approximation: it must differ.
  general = oc.make_correction(kind="adam", layouts=layouts, opt_state=random_state("adam", params, layouts))
  ref2 = gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=general)
  approx = oc.make_correction(kind="adam_rank1", layouts=layouts, opt_state=random_state("adam", params, layouts))
  proj2 = gradients.GradientProjector(plan=plan, correction=approx)
  phi2 = jax.jit(lambda p, a, b: proj2.phi(loss_fn, p, a, b))(params, proj2.arrays, batch)
  assert float(jnp.linalg.norm(phi2 - ref2) / jnp.linalg.norm(ref2)) > 1e-3


def test_padding_rows_encode_to_zero():
  params, loss_fn, batch, layouts, plan = setup_model("decoder")
  batch = dict(batch, ids=np.array([0, -1, 2]))
  proj = gradients.GradientProjector(plan=plan, correction=oc.make_correction(kind="none", layouts=layouts))
  phi = jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)
  assert float(jnp.abs(phi[1]).max()) == 0.0 and float(jnp.abs(phi[0]).max()) > 0


def test_call_labels_of_layers():
  params, loss_fn, batch, layouts, plan = setup_model("custom")
  assert layouts["dg_in/kernel"].in_axes == (0,)
  assert layouts["dg_out/kernel"].in_axes == (0, 1)
  assert layouts["ein_split/kernel"].in_axes == (0,)
  assert layouts["ein_shared/kernel"].in_axes == (0, 1)  # h shared: a row axis
  assert layouts["ein_merge/kernel"].in_axes == (0, 1)
  assert plan.blocks == ["dg", "ein", "head"]


def test_traced_param_that_is_not_a_layer_kernel_errors():
  class Raw(nn.Module):
    @nn.compact
    def __call__(self, tokens, pad_mask=None):
      w = self.param("kernel", nn.initializers.normal(), (8, V))
      return nn.Embed(V, 8)(tokens) @ w

  model = Raw()
  params = model.init(jax.random.key(0), jnp.ones((1, T), jnp.int32))
  loss_fn = lambda p, b: losses.example_losses(model.apply(p, b["inputs"]), b)
  with pytest.raises(ValueError, match="not kernels of nn.Dense"):
    gradients.trace_layouts(loss_fn, params, make_batch(1), paths=["params/kernel"])


@pytest.mark.parametrize("which", ["decoder", "custom"])
def test_pallas_scale_project_matches_reference(which):
  """Exact Adam's per-layer path with the scaling fused into P_out's matmul (Pallas' interpreter on CPU)."""
  params, loss_fn, batch, layouts, plan = setup_model(which)
  corr = oc.make_correction(kind="adam", layouts=layouts, opt_state=random_state("adam", params, layouts))
  phis = {}
  for kernel in ("xla", "pallas"):
    proj = gradients.GradientProjector(plan=plan, correction=corr, layer_mode="layer", layer_kernel=kernel)
    phis[kernel] = jax.jit(lambda p, a, b, proj=proj: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)
    kernels = proj.layer_kernels()  # as traced
  # The decoder's kernels (16 x 16, 16 x 32, ...) tile; the custom model's (8 x 6, 6 x 8, ...) are too small.
  tiled = {p for p, k in kernels.items() if k == "pallas"}
  assert tiled == (set(kernels) if which == "decoder" else set()), kernels
  ref = gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=corr)
  rel = float(jnp.linalg.norm(phis["pallas"] - ref) / jnp.linalg.norm(ref))
  assert rel < 1e-4, rel
  np.testing.assert_allclose(phis["pallas"], phis["xla"], rtol=1e-5, atol=1e-6 * float(jnp.abs(ref).max()))
  if which == "custom":  # nothing tiled: the same computation
    np.testing.assert_array_equal(phis["pallas"], phis["xla"])
