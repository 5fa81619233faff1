"""Layer registry: subclasses, layer types registered by name, malformed calls (Linen)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trackstar_jax import gradients, layer_registry, losses, projection
from trackstar_jax import optimizer_correction as oc

V, T = 24, 6


def batch(b=3, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, V, (b, T)).astype(np.int32)
  return dict(
    inputs=inputs, targets=np.roll(inputs, -1, 1), loss_mask=np.ones((b, T), np.float32), pad_mask=np.ones((b, T), bool)
  )


def phi_and_reference(model, paths):
  params = model.init(jax.random.key(0), jnp.ones((1, T), jnp.int32))
  loss_fn = lambda p, b: losses.example_losses(model.apply(p, b["inputs"]), b)
  b = batch()
  layouts = gradients.trace_layouts(loss_fn, params, b, paths=paths)
  plan = projection.ProjectionPlan.create(layouts, d_in=3, d_out=4, seed=0, block_fn=lambda p: "all")
  corr = oc.make_correction(kind="none", layouts=layouts)
  proj = gradients.GradientProjector(plan=plan, correction=corr)
  phi = jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, b)
  return phi, gradients.reference_phi(loss_fn, params, b, plan=plan, correction=corr), layouts


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


class Doubled(nn.Dense):
  """Overrides __call__ around super(): the Dense call inside is traced, once."""

  def __call__(self, x):
    return 2.0 * super().__call__(x) + 1.0


class Plain(nn.Dense):
  """No override: read as nn.Dense."""


class Model(nn.Module):
  head: type

  @nn.compact
  def __call__(self, tokens):
    return self.head(V, name="head")(jnp.tanh(nn.Embed(V, 8)(tokens)))


@pytest.mark.parametrize("head", [Doubled, Plain])
def test_linen_subclasses(head):
  phi, ref, _ = phi_and_reference(Model(head), ["params/head/kernel"])
  assert rel(phi, ref) < 1e-4


class Matmul(nn.Module):
  """A user layer type: y = einsum('btd,dk->btk', x, w)."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], self.features))
    return jnp.einsum("btd,dk->btk", x, w)


class MatmulModel(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return Matmul(V, name="proj")(nn.Embed(V, 8)(tokens))


def test_register_layer_by_dotted_name():
  model = MatmulModel()
  with pytest.raises(ValueError, match=r"(?s)not kernels.*Module types in the model:.*Matmul"):
    phi_and_reference(model, ["params/proj/w"])
  name = f"{Matmul.__module__}.{Matmul.__qualname__}"
  layer_registry.register_layer(
    name, layer_registry.LayerType(kernel_name=lambda m: "w", read=lambda m, args, kwargs: (args[0], "btd,dk->btk"))
  )
  try:
    phi, ref, layouts = phi_and_reference(model, ["params/proj/w"])
    assert layouts == {"proj/w": projection.KernelLayout((8, V), (0,))} and rel(phi, ref) < 1e-4
  finally:
    del layer_registry._REGISTRY[name]  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "eq,match",
  [
    ("btd,dk", "explicit output"),
    ("btd,d...->bt...", "ellipsis"),
    ("btd,bdk->btk", "not a per-example linear map"),
    ("btd,dk->tk", "not a per-example linear map"),
  ],
)
def test_malformed_calls(eq, match):
  with pytest.raises(ValueError, match=match):
    layer_registry.equation_labels(eq, x_ndim=3, name="layer")
  labels = layer_registry.equation_labels("...d,NDH->...NH".replace("D", "d"), x_ndim=3, name="layer")
  assert labels.in_axes == (1,) and len(labels.out_labels) == 2
