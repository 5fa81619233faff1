"""Optimizers: state types the optimizer correction relies on, schedules, updates."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from trackstar_jax import optim
from trackstar_jax.models import DecoderLM, TransformerConfig


def _cfg(**kw):
  c = dict(
    optimizer="adamw",
    learning_rate=1e-2,
    end_learning_rate_frac=0.1,
    warmup_steps=10,
    num_steps=100,
    weight_decay=0.01,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    grad_clip=1.0,
  )
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _params():
  cfg = TransformerConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, d_ff=128, max_len=8)
  return DecoderLM(cfg).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def _find(tree, cls):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


def _paths(tree):
  return {"/".join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_schedule_warmup_and_decay():
  for kind in ("cosine", "linear"):
    cfg = _cfg(schedule=kind)
    sched = optim.learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(float(sched(500)), 1e-3, rtol=1e-5)  # stays at the end value
    np.testing.assert_allclose(optim.final_learning_rate(cfg), 1e-3, rtol=1e-5)
    values = [float(sched(s)) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # monotone decay
  mid = float(optim.learning_rate_schedule(_cfg())(55))  # cosine midpoint
  np.testing.assert_allclose(mid, 1e-3 + 0.5 * (1e-2 - 1e-3), rtol=1e-4)
  with pytest.raises(ValueError, match="train.schedule"):
    optim.learning_rate_schedule(_cfg(schedule="bogus"))


def test_adamw_state_and_update_match_reference():
  params = _params()
  tx = optim.make_optimizer(_cfg(grad_clip=0.0, warmup_steps=0))
  state = tx.init(params)
  (adam,) = _find(state, optax.ScaleByAdamState)
  assert jax.tree.structure(adam.nu) == jax.tree.structure(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, state = tx.update(grads, state, params)
  # First Adam step with bias correction: m_hat / (sqrt(v_hat) + eps) = sign(g) = 1.
  lr = 1e-2
  for path, u in _paths(updates).items():
    p = _paths(params)[path]
    decay = 0.01 * p if (p.ndim >= 2 and "embed" not in path and "norm" not in path) else 0.0
    np.testing.assert_allclose(u, -lr * (1.0 + decay), rtol=1e-5, atol=1e-7, err_msg=path)
  (adam,) = _find(state, optax.ScaleByAdamState)
  nu = _paths(adam.nu)
  np.testing.assert_allclose(nu["params/block_0/mlp/wi/kernel"], (1 - 0.99) * 0.25, rtol=1e-6)


def test_adafactor_factors_every_block_matrix():
  params = _params()
  tx = optim.make_optimizer(_cfg(optimizer="adafactor", warmup_steps=0))
  state = tx.init(params)
  (fs,) = _find(state, optax.FactoredState)
  v_row, v_col, v = _paths(fs.v_row), _paths(fs.v_col), _paths(fs.v)
  for path, p in _paths(params).items():
    if "block_0/attn/" in path or "block_0/mlp/" in path:
      # Factored: full v is a dummy, rows/cols drop one of the two largest axes.
      assert v[path].shape == (1,), path
      assert v_row[path].size + v_col[path].size < p.size, path
      assert v_row[path].ndim == p.ndim - 1 and v_col[path].ndim == p.ndim - 1, path
    elif p.ndim == 1:  # norm scales: full second moments
      assert v[path].shape == p.shape, path
  assert v_row["params/block_0/mlp/wi/kernel"].shape == (64,)  # [64, 128]: rows
  assert v_col["params/block_0/mlp/wi/kernel"].shape == (128,)
  # A step runs and moves the parameters.
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
  (fs,) = _find(state, optax.FactoredState)
  assert float(jnp.min(_paths(fs.v_row)["params/block_0/mlp/wi/kernel"])) > 0


def test_constant_lr_copy_has_same_state_structure():
  params = _params()
  for name in ("adamw", "adafactor"):
    cfg = _cfg(optimizer=name)
    tx, tx_const = optim.make_optimizer(cfg), optim.make_optimizer(cfg, learning_rate=1e-3)
    s1, s2 = tx.init(params), tx_const.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    # Restored state of the scheduled optimizer drives the constant copy.
    grads = jax.tree.map(jnp.ones_like, params)
    _, s1 = tx.update(grads, s1, params)
    updates, _ = tx_const.update(grads, s1, params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
  # The constant rate is used at any step count.
  cfg = _cfg(grad_clip=0.0, weight_decay=0.0)
  tx_const = optim.make_optimizer(cfg, learning_rate=1e-3)
  p = {"w": jnp.ones((2, 2))}
  u, _ = tx_const.update({"w": jnp.ones((2, 2))}, tx_const.init(p), p)
  np.testing.assert_allclose(u["w"], -1e-3, rtol=1e-5)


def test_grad_clip_and_unknown_optimizer():
  p = {"w": jnp.zeros((3,))}
  tx = optim.make_optimizer(_cfg(optimizer="adafactor", grad_clip=1.0, weight_decay=0.0))
  clip_state = tx.init(p)[0]
  g = {"w": jnp.array([30.0, 40.0, 0.0])}
  clipped, _ = optax.clip_by_global_norm(1.0).update(g, clip_state)
  np.testing.assert_allclose(clipped["w"], [0.6, 0.8, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match="train.optimizer"):
    optim.make_optimizer(_cfg(optimizer="sgd"))


def test_weight_decay_mask():
  mask = _paths(optim.decay_mask(_params()))
  assert mask["params/block_0/mlp/wi/kernel"] and mask["params/block_0/attn/query/kernel"]
  assert not mask["params/embed/embedding"] and not mask["params/final_norm/scale"]


def test_adafactor_second_moment_matches_documented_formula():
  """V = v_row (bcast over d0) * v_col (bcast over d1) / mean_d1(v_row); update = -lr g / sqrt(V)."""
  cfg = _cfg(
    optimizer="adafactor",
    grad_clip=0.0,
    weight_decay=0.0,
    warmup_steps=0,
    schedule="constant",
    adafactor_clipping_threshold=1e9,
  )
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((40, 64)), "q": jnp.zeros((64, 3, 32))}  # q: d0 = 0 (64), d1 = 2 (32)
  grads = {k: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for k, p in params.items()}
  tx = optim.make_optimizer(cfg)
  updates, state = tx.update(grads, tx.init(params), params)
  (fs,) = _find(state, optax.FactoredState)
  for name, d0, d1 in (("w", 1, 0), ("q", 0, 2)):
    g2 = np.asarray(grads[name], np.float64) ** 2 + 1e-30
    v_row, v_col = np.asarray(fs.v_row[name]), np.asarray(fs.v_col[name])
    np.testing.assert_allclose(v_row, g2.mean(axis=d0), rtol=1e-5)  # first step: no EMA history
    np.testing.assert_allclose(v_col, g2.mean(axis=d1), rtol=1e-5)
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    v = np.expand_dims(v_row, d0) * np.expand_dims(v_col, d1) / np.expand_dims(v_row.mean(axis=reduced_d1), (d0, d1))
    want = -1e-2 * np.asarray(grads[name]) / np.sqrt(v)
    np.testing.assert_allclose(np.asarray(updates[name]), want, rtol=1e-4, err_msg=name)
