"""Flax NNX models: fused projected gradients == brute-force vmap(grad), with real NNX optimizer states."""

from batch_helpers import random_batch
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar_jax import configs, gradients, layer_registry, losses, nnx_adapter, projection
from trackstar_jax import optimizer_correction as oc
from trackstar_jax.encoder import TrackStarEncoder
from trackstar_jax.models.nnx_lm import NnxLM
from trackstar_jax.models.transformer import TransformerConfig

V, T = 40, 8
REGEX = r"block_\d+/(attn|mlp)/.*/kernel$"
CFG = TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=T)


def make_batch(b, seed=0):
  return random_batch(b, vocab=V, seq_len=T, seed=seed)


def train(model, tx, steps=3):
  """A few real optimizer steps (so the second moments are those of real gradients)."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    def loss(model):
      return jnp.mean(losses.example_losses(model(batch["inputs"], batch["pad_mask"]), batch))

    optimizer.update(model, nnx.grad(loss)(model))

  for i in range(steps):
    step(model, optimizer, make_batch(4, seed=10 + i))
  return optimizer


TXS = {
  "none": None,
  "adam": optax.adam(1e-2),
  "adam_rank1": optax.adam(1e-2),
  "adafactor": optax.adafactor(1e-2, min_dim_size_to_factor=4),
}


@pytest.fixture(scope="module")
def trained():
  out = {}
  for kind in ("adam", "adafactor"):
    model = NnxLM(CFG, rngs=nnx.Rngs(0))
    out[kind] = (model, train(model, TXS[kind]))
  out["none"] = out["adam_rank1"] = out["adam"]
  return out


def setup(model):
  apply_fn, params = nnx_adapter.functional(model=model, call=NnxLM.call)
  loss_fn = lambda p, b: losses.example_losses(apply_fn(p, b["inputs"], b["pad_mask"]), b)
  batch = make_batch(3)
  layouts = gradients.trace_layouts(loss_fn, params, batch, paths=projection.select_paths(params, regex=REGEX))
  plan = projection.ProjectionPlan.create(layouts, d_in=3, d_out=4, seed=7, block_fn=projection.block_key_fn())
  return params, loss_fn, batch, layouts, plan


def encode(plan, corr, loss_fn, params, batch):
  proj = gradients.GradientProjector(plan=plan, correction=corr)
  phi = jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)
  return phi, proj.modes()


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_every_nnx_layer_type_is_traced(trained):
  params, _, _, layouts, plan = setup(trained["adam"][0])
  want = {
    f"block_{i}/{name}/kernel"
    for i in range(2)
    for name in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/gate", "mlp/wi", "mlp/wo")
  }
  assert set(layouts) == want  # LinearGeneral, Einsum ('...' and multi-axis), Linear; no bias/norm/embedding
  assert layouts["block_0/attn/query/kernel"] == projection.KernelLayout((16, 2, 8), (0,))
  assert layouts["block_0/attn/out/kernel"] == projection.KernelLayout((2, 8, 16), (0, 1))
  assert plan.blocks == ["0/attn", "0/mlp", "1/attn", "1/mlp"]
  # The adapter's params are the module's own values, under its attribute paths.
  np.testing.assert_array_equal(params["block_1"]["mlp"]["wi"]["kernel"], trained["adam"][0].block_1.mlp.wi.kernel[...])


@pytest.mark.parametrize("kind", ["none", "adam", "adam_rank1", "adafactor"])
def test_fused_matches_reference(trained, kind):
  model, optimizer = trained[kind]
  params, loss_fn, batch, layouts, plan = setup(model)
  corr = oc.make_correction(kind=kind, layouts=layouts, opt_state=optimizer.opt_state)
  phi, modes = encode(plan, corr, loss_fn, params, batch)
  ref = gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=corr)
  assert phi.shape == (3, plan.dim) and np.all(np.isfinite(phi)) and float(jnp.abs(phi).max(axis=1).min()) > 0
  err = rel(phi, ref)
  print(f"nnx {kind}: rel err {err:.2e}, modes {sorted(set(modes.values()))}")
  assert err < 1e-4, (kind, err, modes)
  if kind == "adam":
    assert set(modes.values()) == {"layer"}  # element-wise nu: per-layer G inside the backward pass
  if kind in ("adam_rank1", "adafactor"):
    assert "fused" in set(modes.values())
  if kind != "none":  # the correction is real: it changes the encoding
    none = oc.make_correction(kind="none", layouts=layouts)
    assert rel(gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=none), ref) > 1e-2


def test_nnx_optimizer_state_paths_are_param_paths(trained):
  model, optimizer = trained["adam"]
  params, _, _, layouts, _ = setup(model)
  found = oc.find_second_moments(optimizer.opt_state)
  assert set(found.adam) == set(projection.flatten_paths(params))  # no '.../value' suffixes
  nu = found.adam["block_0/mlp/wi/kernel"][0]
  assert float(np.std(nu)) > 0.1 * float(np.mean(nu)) > 0  # real, non-constant second moments
  # The optimizer itself, and the raw optax state of nnx.state(model, nnx.Param), work too.
  a = oc.make_correction(kind="adam", layouts=layouts, opt_state=optimizer)
  raw = optax.adam(1e-2).init(nnx.state(model, nnx.Param))
  raw = raw[:1] if isinstance(raw, tuple) and not hasattr(raw, "_fields") else raw
  assert set(oc.find_second_moments(raw).adam) == set(found.adam)
  b = oc.make_correction(kind="adam", layouts=layouts, opt_state=optimizer.opt_state)
  for p in layouts:
    np.testing.assert_array_equal(a.elementwise(p), b.elementwise(p))
  fstate = trained["adafactor"][1].opt_state
  assert set(oc.find_second_moments(fstate).factored) == set(projection.flatten_paths(params))


def test_graphdef_and_state_entry_point_and_module_untouched(trained):
  model, _ = trained["adam"]
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  params, loss_fn, batch, layouts, plan = setup(model)
  corr = oc.make_correction(kind="none", layouts=layouts)
  phi, _ = encode(plan, corr, loss_fn, params, batch)
  graphdef, *states = nnx.split(model, nnx.Param, ...)
  apply2, params2 = nnx_adapter.functional(graphdef=graphdef, state=states, call=NnxLM.call)
  loss2 = lambda p, b: losses.example_losses(apply2(p, b["inputs"], b["pad_mask"]), b)
  phi2, _ = encode(plan, corr, loss2, params2, batch)
  np.testing.assert_array_equal(phi2, phi)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  # The NNX layer classes are restored after tracing.
  assert not any(hasattr(c.__call__, "trackstar_original") for c in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum))
  with pytest.raises(ValueError, match="model= or graphdef="):
    nnx_adapter.functional()


def test_encoder_on_nnx_model(trained):
  model, optimizer = trained["adam"]
  apply_fn, params = nnx_adapter.functional(model=model, call=NnxLM.call)
  cfg = configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=T).encoder  # default regexes
  cfg.d_in, cfg.d_out, cfg.seed, cfg.correction = 3, 4, 0, "adam"
  enc = TrackStarEncoder(model_apply=apply_fn, params=params, config=cfg, opt_state=optimizer.opt_state)
  assert enc.blocks == ["0/attn", "0/mlp", "1/attn", "1/mlp"] and len(enc.plan.layouts) == 14
  batch = make_batch(5, seed=3)
  assert rel(enc.encode(batch), enc.reference(batch)) < 1e-4


def test_public_api_takes_the_nnx_module(trained):
  """tsj.build_encoder(model=<nnx.Module>): params read from the module (or given as a State / pure dict)."""
  import trackstar_jax as tsj

  model, optimizer = trained["adam"]
  kw = dict(d_in=3, d_out=4, correction="adam")
  enc = tsj.build_encoder(model=model, opt_state=optimizer.opt_state, call=NnxLM.call, seq_len=T, **kw)
  apply_fn, params = nnx_adapter.functional(model=model, call=NnxLM.call)
  ref = TrackStarEncoder(model_apply=apply_fn, params=params, config=kw, opt_state=optimizer.opt_state, seq_len=T)
  batch = make_batch(4, seed=5)
  phi = np.asarray(enc.encode(batch))
  np.testing.assert_array_equal(phi, np.asarray(ref.encode(batch)))
  assert rel(phi, enc.reference(batch)) < 1e-4
  # The default call, model(inputs), gives the same phi for a causal LM (padding comes after every real token).
  default = tsj.build_encoder(model=model, opt_state=optimizer, seq_len=T, **kw).encode(batch)
  assert rel(default, phi) < 1e-5
  # params= as an nnx.State or a pure dict replaces the module's values; the module is untouched.
  zeroed = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  enc0 = tsj.build_encoder(model=model, params=zeroed, correction="none", d_in=3, d_out=4, seq_len=T)
  assert (
    float(jnp.abs(enc0.encode(batch)).max()) == 0.0
  )  # all-zero params (the given ones, not the module's): every kernel input is 0
  assert float(jnp.abs(model.block_0.mlp.wi.kernel[...]).max()) > 0
  with pytest.raises(ValueError, match=r"do not match the parameters of the NNX module NnxLM: missing \['block_0"):
    tsj.build_encoder(model=model, params={"w": jnp.zeros(3)}, correction="none")
  with pytest.raises(ValueError, match="call= is for Flax NNX modules"):
    tsj.build_encoder(apply_fn=apply_fn, params=params, call=NnxLM.call, correction="none")
  with pytest.raises(ValueError, match="Flax Linen module .* or a Flax NNX module, got object"):
    tsj.build_encoder(model=object(), params=params)
  with pytest.raises(ValueError, match="needs params="):
    tsj.build_encoder(apply_fn=apply_fn, correction="none")


class RawDense(nnx.Module):
  """A matmul on a bare nnx.Param: not a registered layer type."""

  def __init__(self, n, m, *, rngs):
    self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), (n, m)))

  def __call__(self, x):
    return x @ self.w[...]


class RawLM(nnx.Module):
  def __init__(self, *, rngs):
    self.embed = nnx.Embed(V, 8, rngs=rngs)
    self.proj = RawDense(8, V, rngs=rngs)

  def __call__(self, tokens):
    return self.proj(self.embed(tokens))


def test_model_without_traceable_kernels_lists_layer_types():
  apply_fn, params = nnx_adapter.functional(model=RawLM(rngs=nnx.Rngs(0)))
  loss_fn = lambda p, b: losses.example_losses(apply_fn(p, b["inputs"], b["pad_mask"]), b)
  with pytest.raises(ValueError, match=r"(?s)\['proj/w'\].*Module types in the model: (.*)\. Registered:.*nnx") as e:
    gradients.trace_layouts(loss_fn, params, make_batch(1), paths=["proj/w"])
  found = str(e.value).split("Module types in the model: ")[1].split(". Registered")[0].split(", ")
  assert {t.rsplit(".", 1)[-1] for t in found} == {"RawLM", "RawDense", "Embed"}, found
  assert "flax.nnx.nn.linear.Linear" in str(e.value).split("Registered:")[1]


def test_subclass_calling_super_is_traced_through_its_base():
  class Scaled(nnx.Linear):  # a user subclass calling super(): read as nnx.Linear, tapped once
    def __call__(self, x):
      return 2.0 * super().__call__(x)

  class Tiny(nnx.Module):
    def __init__(self, *, rngs):
      self.embed = nnx.Embed(V, 8, rngs=rngs)
      self.head = Scaled(8, V, rngs=rngs)

    def __call__(self, tokens):
      return self.head(self.embed(tokens))

  apply_fn, params = nnx_adapter.functional(model=Tiny(rngs=nnx.Rngs(1)))
  loss_fn = lambda p, b: losses.example_losses(apply_fn(p, b["inputs"], b["pad_mask"]), b)
  batch = make_batch(3)
  layouts = gradients.trace_layouts(loss_fn, params, batch, paths=["head/kernel"])
  plan = projection.ProjectionPlan.create(layouts, d_in=3, d_out=4, seed=0, block_fn=lambda p: "all")
  corr = oc.make_correction(kind="none", layouts=layouts)
  phi, _ = encode(plan, corr, loss_fn, params, batch)
  assert rel(phi, gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=corr)) < 1e-4
  assert layer_registry.lookup(Scaled) is layer_registry.lookup(nnx.Linear)
