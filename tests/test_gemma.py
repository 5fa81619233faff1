"""The Gemma 3 architecture (gemma.gm.nn, random weights, toy size): fused == vmap(grad), real optax states.

Skipped where gemma is not installed (see trackstar_jax/models/gemma_lm.py for the light install), unless
TRACKSTAR_REQUIRE_GEMMA=1 (.ci/run's gemma stage: a broken install must fail there, not skip).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

try:
  from gemma import gm

  _ = gm.nn.Transformer  # (imports kauldron)
except ImportError as e:  # pragma: no cover
  if os.environ.get("TRACKSTAR_REQUIRE_GEMMA") == "1":
    raise
  pytest.skip(f"gemma.gm.nn is not importable: {e}", allow_module_level=True)

from batch_helpers import random_batch

from trackstar_jax import gradients, losses, projection
from trackstar_jax import optimizer_correction as oc
from trackstar_jax.models import gemma_lm

pytestmark = pytest.mark.gemma
V, T = 40, 8


def make_batch(b, seed=0):
  return random_batch(b, vocab=V, seq_len=T, seed=seed, zero_padding=True)


TXS = {"adam": optax.adam(1e-2), "adafactor": optax.adafactor(1e-2, min_dim_size_to_factor=4)}


@pytest.fixture(scope="module")
def model():
  model = gemma_lm.tiny_gemma3(vocab_size=V)
  params = model.init(jax.random.key(0), jnp.ones((1, T), jnp.int32))
  apply_fn = gemma_lm.model_apply(model)
  loss_fn = lambda p, b: losses.example_losses(apply_fn(p, b["inputs"], b["pad_mask"]), b)
  return params, loss_fn


@pytest.fixture(scope="module")
def trained(model):
  """(params, opt_state) after a few real optimizer steps, per optimizer."""
  params0, loss_fn = model
  out = {}
  for kind, tx in TXS.items():
    params, state = params0, tx.init(params0)

    @jax.jit
    def step(params, state, batch, tx=tx):
      grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for i in range(3):
      params, state = step(params, state, make_batch(4, seed=10 + i))
    out[kind] = (params, state)
  out["none"] = out["adam_rank1"] = out["adam"]
  return out


def plan_for(params, loss_fn, batch):
  layouts = gradients.trace_layouts(
    loss_fn, params, batch, paths=projection.select_paths(params, regex=gemma_lm.PARAM_REGEX)
  )
  block_fn = projection.block_key_fn(block_regex=gemma_lm.BLOCK_REGEX)
  return layouts, projection.ProjectionPlan.create(layouts, d_in=3, d_out=4, seed=7, block_fn=block_fn)


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_gemma_matrices_are_traced(model):
  params, loss_fn = model
  layouts, plan = plan_for(params, loss_fn, make_batch(2))
  want = {
    f"layer_{i}/{name}"
    for i in range(2)
    for name in ("attn/q_einsum/w", "attn/kv_einsum/w", "attn/attn_vec_einsum/w", "mlp/gating_einsum", "mlp/linear")
  }
  assert set(layouts) == want
  assert layouts["layer_0/attn/q_einsum/w"] == projection.KernelLayout((2, 16, 8), (1,))  # 'BTD,NDH->BTNH'
  assert layouts["layer_0/attn/kv_einsum/w"] == projection.KernelLayout((2, 1, 16, 8), (2,))  # 'BSD,CKDH->CBSKH'
  assert layouts["layer_0/attn/attn_vec_einsum/w"] == projection.KernelLayout((2, 8, 16), (0, 1))
  assert layouts["layer_0/mlp/gating_einsum"] == projection.KernelLayout((2, 32, 16), (2,))  # '...F,NHF->...NH'
  assert plan.blocks == ["0/attn", "0/mlp", "1/attn", "1/mlp"]


@pytest.mark.parametrize("kind", ["none", "adam", "adam_rank1", "adafactor"])
def test_fused_matches_reference(model, trained, kind):
  _, loss_fn = model
  params, state = trained[kind]
  batch = make_batch(3)
  layouts, plan = plan_for(params, loss_fn, batch)
  corr = oc.make_correction(kind=kind, layouts=layouts, opt_state=state)
  proj = gradients.GradientProjector(plan=plan, correction=corr)
  phi = jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)
  ref = gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=corr)
  assert phi.shape == (3, plan.dim) and np.all(np.isfinite(phi)) and float(jnp.abs(phi).max(axis=1).min()) > 0
  err = rel(phi, ref)
  print(f"gemma {kind}: rel err {err:.2e}, modes {sorted(set(proj.modes().values()))}")
  assert err < 1e-4, (kind, err, proj.modes())
  if kind == "adam":  # element-wise nu: per-layer G where Delta P_out with the input axes would be larger
    assert "layer" in set(proj.modes().values())
  if kind in ("adam_rank1", "adafactor"):
    assert "fused" in set(proj.modes().values())
  if kind != "none":  # real, non-trivial second moments: the correction changes the encoding
    none = oc.make_correction(kind="none", layouts=layouts)
    assert rel(gradients.reference_phi(loss_fn, params, batch, plan=plan, correction=none), ref) > 1e-2


def test_nn_jit_cache_without_disable_jit_is_an_error(model):
  """gemma's nn.jit replays cached traces without the layer calls: caught, not silently zero."""
  params, _ = model
  raw = gemma_lm.tiny_gemma3(vocab_size=V)
  loss_fn = lambda p, b: losses.example_losses(raw.apply(p, b["inputs"]).logits, b)
  batch = make_batch(3)
  with pytest.raises(ValueError, match=r"(?s)(not called|not kernels).*nn\.jit.*disable_jit"):
    layouts, plan = plan_for(params, loss_fn, batch)  # first trace: may still run the layers ...
    proj = gradients.GradientProjector(plan=plan, correction=oc.make_correction(kind="none", layouts=layouts))
    jax.jit(lambda p, a, b: proj.phi(loss_fn, p, a, b))(params, proj.arrays, batch)  # ... the second replays
