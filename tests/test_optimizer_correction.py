"""Second moments found by type/structure; corrections vs optax's own update rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar_jax import optimizer_correction as oc
from trackstar_jax import projection

PARAMS = {
  "params": {
    "block_0": {
      "mlp": {"wi": {"kernel": jnp.ones((40, 36))}},
      "attn": {"query": {"kernel": jnp.ones((40, 4, 36))}, "out": {"kernel": jnp.ones((4, 36, 40))}},
    },
    "norm": {"scale": jnp.ones((40,))},
  }
}
LAYOUTS = {
  "block_0/mlp/wi/kernel": projection.KernelLayout((40, 36), (0,)),
  "block_0/attn/query/kernel": projection.KernelLayout((40, 4, 36), (0,)),
  "block_0/attn/out/kernel": projection.KernelLayout((4, 36, 40), (0, 1)),
}


def randomize(state, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (
      jnp.asarray(rng.uniform(0.1, 2.0, x.shape), jnp.float32)
      if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim
      else x
    ),
    state,
  )


def grads(seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), PARAMS)


@pytest.mark.parametrize("min_dim", [8, 1000])  # factored / unfactored
def test_adafactor_matches_optax_update(min_dim):
  tx = optax.scale_by_factored_rms(min_dim_size_to_factor=min_dim)
  state = randomize(tx.init(PARAMS))
  state = state._replace(count=jnp.asarray(2**30, jnp.int32))  # decay_rate_t ~ 1 - 6e-8: V is the state
  g = grads()
  update, _ = tx.update(g, state, PARAMS)
  corr = oc.make_correction(kind="adafactor", layouts=LAYOUTS, opt_state=(optax.EmptyState(), state))
  flat_g, flat_u = projection.flatten_paths(g), projection.flatten_paths(update)
  for path in LAYOUTS:
    np.testing.assert_allclose(corr.apply(path, flat_g["params/" + path]), flat_u["params/" + path], rtol=1e-5)
  want_factored = min_dim == 8
  assert all((len(corr.get(p)) == 2) == want_factored for p in LAYOUTS)


def test_adam_with_bias_correction_by_hand():
  state = randomize(optax.scale_by_adam().init(PARAMS))._replace(count=jnp.asarray(3, jnp.int32))
  nu = state.nu["params"]["block_0"]["mlp"]["wi"]["kernel"]
  g = grads()["params"]["block_0"]["mlp"]["wi"]["kernel"]
  corr = oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=state, eps=1e-3, bias_correction=True, b2=0.9)
  want = g / (np.sqrt(nu / (1 - 0.9**3)) + 1e-3)
  np.testing.assert_allclose(corr.apply("params/block_0/mlp/wi/kernel", g), want, rtol=1e-6)
  plain = oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=state, eps=1e-3)
  np.testing.assert_allclose(plain.apply("block_0/mlp/wi/kernel", g), g / (np.sqrt(nu) + 1e-3), rtol=1e-6)
  with pytest.raises(ValueError, match="b2"):
    oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=state, bias_correction=True)


def _nested_states():
  adamw = optax.adamw(1e-3)
  mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  return {
    "chain": optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-3)),
    "inject": optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, b2=0.95),
    "masked": optax.chain(optax.masked(optax.scale_by_adam(), mask), optax.scale(-1.0)),
    "multisteps": optax.MultiSteps(adamw, every_k_schedule=2),
    "multi_transform": optax.multi_transform(
      {"a": optax.adam(1e-3), "f": optax.adafactor(1e-3)},
      lambda p: jax.tree.map(lambda x: "a" if x.ndim == 2 else "f", p),
    ),
  }


@pytest.mark.parametrize("name", sorted(_nested_states()))
def test_second_moments_found_by_type_anywhere(name):
  tx = _nested_states()[name]
  state = randomize(tx.init(PARAMS))
  found = oc.find_second_moments(state)
  kind = "auto" if name == "multi_transform" else "adam"
  corr = oc.make_correction(kind=kind, layouts=LAYOUTS, opt_state=state, bias_correction=name == "inject")
  assert set(corr.factors) == set(LAYOUTS)
  if name == "multi_transform":
    assert "block_0/mlp/wi/kernel" in found.adam and "block_0/attn/query/kernel" in found.factored
  if name == "inject":  # b2 read from inject_hyperparams
    assert found.adam["block_0/mlp/wi/kernel"][2]["b2"] == pytest.approx(0.95)


def test_unknown_optimizer_state_errors():
  state = optax.sgd(0.1, momentum=0.9).init(PARAMS)
  with pytest.raises(ValueError, match=r"(?s)holds none of the supported.*TraceState.*ScaleByAdamState"):
    oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=state)
  with pytest.raises(ValueError, match="Unknown encoder.correction"):
    oc.make_correction(kind="rmsprop", layouts=LAYOUTS, opt_state=state)
  assert oc.make_correction(kind="none", layouts=LAYOUTS).get("block_0/mlp/wi/kernel") == ()


def test_shape_mismatch_and_missing_param_name_paths():
  state = randomize(optax.scale_by_adam().init(PARAMS))
  bad = dict(LAYOUTS, **{"block_0/mlp/wi/kernel": projection.KernelLayout((36, 40), (0,))})
  with pytest.raises(ValueError, match=r"block_0/mlp/wi/kernel.*\(40, 36\).*\(36, 40\)"):
    oc.make_correction(kind="adam", layouts=bad, opt_state=state)
  extra = dict(LAYOUTS, **{"block_9/mlp/wi/kernel": projection.KernelLayout((40, 36), (0,))})
  with pytest.raises(ValueError, match="block_9/mlp/wi/kernel"):
    oc.make_correction(kind="adam", layouts=extra, opt_state=state)
  fstate = randomize(optax.scale_by_factored_rms(min_dim_size_to_factor=8).init(PARAMS))
  bad = dict(LAYOUTS, **{"block_0/mlp/wi/kernel": projection.KernelLayout((40, 30), (0,))})
  with pytest.raises(ValueError, match="v_row for parameter 'block_0/mlp/wi/kernel'"):
    oc.make_correction(kind="adafactor", layouts=bad, opt_state=fstate)


def test_rank1_fit_is_exact_for_rank1_nu():
  r, c = np.random.default_rng(0).uniform(0.5, 2, 40), np.random.default_rng(1).uniform(0.5, 2, 36)
  state = optax.scale_by_adam().init(PARAMS)
  nu = jax.tree.map(lambda x: x, state.nu)
  nu["params"]["block_0"]["mlp"]["wi"]["kernel"] = jnp.asarray(np.outer(r, c), jnp.float32)
  state = randomize(state)._replace(
    nu=jax.tree.map(lambda a, b: b if b.shape == (40, 36) else a, randomize(state).nu, nu)
  )
  exact = oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=state, eps=0.0)
  fit = oc.make_correction(kind="adam_rank1", layouts=LAYOUTS, opt_state=state, eps=0.0)
  g = grads()["params"]["block_0"]["mlp"]["wi"]["kernel"]
  np.testing.assert_allclose(fit.apply("block_0/mlp/wi/kernel", g), exact.apply("block_0/mlp/wi/kernel", g), rtol=1e-5)
  assert [f.axes for f in fit.get("block_0/attn/out/kernel")] == [(0, 1), (2,)]


def test_partial_restore_from_checkpoint(tmp_path):
  from trackstar_jax import checkpointing

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-1e-3))
  state = randomize(tx.init(PARAMS))
  manager = checkpointing.make_manager(str(tmp_path))
  checkpointing.save(manager, step=5, params=PARAMS, opt_state=state, meta={}, wait=True)
  step, raw = oc.restore_second_moments(str(tmp_path), paths=list(LAYOUTS))
  assert step == 5
  flat = projection.flatten_paths(raw)
  assert not any("/mu/" in p for p in flat)  # first moments are not read
  assert not any("norm" in p for p in flat)  # nor untraced parameters
  want = oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=state)
  got = oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=raw)
  for p in LAYOUTS:
    np.testing.assert_array_equal(got.elementwise(p), want.elementwise(p))
  with pytest.raises(FileNotFoundError, match="step 7"):
    oc.restore_second_moments(str(tmp_path), step=7)


def _save(tmp_path, tx):
  from trackstar_jax import checkpointing

  manager = checkpointing.make_manager(str(tmp_path))
  checkpointing.save(manager, step=5, params=PARAMS, opt_state=randomize(tx.init(PARAMS)), meta={}, wait=True)


def test_param_regex_matching_nothing_is_refused_with_the_available_paths(tmp_path):
  _save(tmp_path, optax.adamw(1e-3))
  with pytest.raises(
    ValueError,
    match=r"encoder.param_regex 'layer_\\\\d\+/kernel\$' matches none of the 4 "
    r"parameters",
  ) as e:
    oc.restore_second_moments(str(tmp_path), paths=r"layer_\d+/kernel$")
  assert "params/block_0/mlp/wi/kernel" in str(e.value) and "Fix encoder.param_regex" in str(e.value)
  with pytest.raises(ValueError, match=r"block_7/mlp/wi/kernel.*Parameters that have them.*block_0/mlp/wi/kernel"):
    oc.restore_second_moments(str(tmp_path), paths=["block_7/mlp/wi/kernel"])
  _, raw = oc.restore_second_moments(str(tmp_path), paths=r"block_\d+/(attn|mlp)/.*/kernel$")  # a regex that matches
  assert set(oc.find_second_moments(raw).adam) == set(LAYOUTS)


def test_wrong_correction_names_the_ones_the_checkpoint_supports():
  adam = randomize(optax.adamw(1e-3).init(PARAMS))
  with pytest.raises(
    ValueError,
    match=r"correction='adafactor' needs Adafactor's factored.*Adam's nu for 4 param"
    r".*supports encoder.correction in \{'none', 'adam', 'adam_rank1', 'auto'\}",
  ):
    oc.make_correction(kind="adafactor", layouts=LAYOUTS, opt_state=adam)
  fact = randomize(optax.adafactor(1e-3, min_dim_size_to_factor=8).init(PARAMS))
  with pytest.raises(
    ValueError,
    match=r"correction='adam' needs Adam's.*supports encoder.correction in "
    r"\{'none', 'adafactor', 'auto'\}",
  ):
    oc.make_correction(kind="adam", layouts=LAYOUTS, opt_state=fact)
  assert oc.supported_kinds(oc.find_second_moments(optax.sgd(0.1).init(PARAMS))) == ("none",)


@pytest.mark.parametrize("name", sorted(_nested_states()))
def test_second_moments_restored_from_a_user_layout(tmp_path, name):
  """Every nested optax state saved the user's way (one item `state` = {params, opt_state}) and partially
  restored from "state/opt_state": the same correction as the in-memory state, no first moments read."""
  import orbax.checkpoint as ocp

  from trackstar_jax import checkpoint_layout

  state = randomize(_nested_states()[name].init(PARAMS))
  mgr = ocp.CheckpointManager(str(tmp_path), item_names=("state",))
  mgr.save(2, args=ocp.args.Composite(state=ocp.args.PyTreeSave(dict(params=PARAMS, opt_state=state))))
  mgr.wait_until_finished()
  where = checkpoint_layout.locate(str(tmp_path), "state/opt_state")
  raw = oc.restore_second_moments_at(where, paths=list(LAYOUTS))
  assert not any("/mu/" in p for p in projection.flatten_paths(raw))
  kind = "auto" if name == "multi_transform" else "adam"
  want = oc.make_correction(kind=kind, layouts=LAYOUTS, opt_state=state)
  got = oc.make_correction(kind=kind, layouts=LAYOUTS, opt_state=raw)
  for p in LAYOUTS:
    np.testing.assert_array_equal(got.elementwise(p), want.elementwise(p))
  with pytest.raises(ValueError, match=r"no key 'opt' at the top level; the keys there are \['opt_state', 'params'\]"):
    oc.restore_second_moments_at(checkpoint_layout.locate(str(tmp_path), "state/opt"), paths=list(LAYOUTS))
