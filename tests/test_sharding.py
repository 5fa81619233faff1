"""Model sharding from rules: specs, validation errors, optimizer-state shardings, and sharded = replicated runs."""

import re

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from trackstar_jax import configs, optim, projection, sharding, training
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.models import DecoderLM, TransformerConfig

TINY = TransformerConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, tied_embeddings=False)


def _abstract(cfg=TINY):
  return jax.eval_shape(lambda: training.init_params(DecoderLM(cfg), seq_len=8, seed=0))


def _mesh(data=2, model=4):
  return mesh_lib.make_mesh((("data", data), ("model", model)))


def _flat(tree):
  return projection.flatten_paths(tree)


def test_specs_first_match_wins_unmatched_replicated_and_padded_to_rank():
  rules = ((r"mlp/wi/kernel$", (None, "model")), (r"mlp/.*/kernel$", ("model",)))
  specs = _flat(sharding.param_specs(_abstract(), rules))
  assert specs["params/block_0/mlp/wi/kernel"] == P(None, "model")
  assert specs["params/block_1/mlp/wo/kernel"] == P("model", None)
  assert specs["params/block_0/attn/query/kernel"] == P(None, None, None)
  assert specs["params/final_norm/scale"] == P(None)


@pytest.mark.parametrize("preset", ["fsdp", "tp", "fsdp_tp"])
def test_presets_shard_every_matrix_of_decoder_lm(preset):
  mesh = _mesh()
  shardings = _flat(sharding.param_shardings(_abstract(), (), mesh, preset=preset))
  for path, s in shardings.items():
    matrix = "kernel" in path or "embedding" in path
    assert any(e is not None for e in s.spec) == matrix, (path, s.spec)
  # A tied model has no lm_head: the preset's rule for it may go unused.
  tied = TransformerConfig(**{**TINY.__dict__, "tied_embeddings": True})
  sharding.param_shardings(_abstract(tied), (), mesh, preset=preset)


def test_8b_preset_fits_the_paper_shape_on_a_pod_mesh():
  """The 8B shape's params split over a 2 x 4 mesh (abstract: no memory), each device holding 1/8 of each matrix."""
  shape = configs.MODEL_PRESETS["paper_8b"]
  cfg = TransformerConfig(vocab_size=32000, max_len=16, **shape)
  abstract = _abstract(cfg)
  shardings = sharding.param_shardings(abstract, (), _mesh(), preset="8b")
  total = per_device = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += a.size
    per_device += np.prod(s.shard_shape(a.shape))
  assert total > 6e9  # DecoderLM has no gated MLP: 6.2B at this vocabulary
  assert per_device < total / 7.9  # only the norm scales are replicated


def test_config_section_and_cli_style_rules():
  config = ml_collections.ConfigDict(dict(sharding=dict(preset="tp", rules=((r"lm_head/kernel$", (None, "data")),))))
  shardings = _flat(sharding.from_config(_abstract(), config, _mesh()))
  assert shardings["params/lm_head/kernel"].spec == P(None, "data")  # user rule first
  assert shardings["params/block_0/mlp/wi/kernel"].spec == P(None, "model")
  assert not sharding.is_sharded(configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=8))
  one_axis = sharding.normalize_rules([["mlp", ["model"]], ("attn", "model"), ("x", (("data", "model"), None))])
  assert one_axis == (("mlp", ("model",)), ("attn", ("model",)), ("x", (("data", "model"), None)))


# ----------------------------------------------------------------------------
# Bad input.


def test_mesh_that_does_not_divide_the_devices():
  with pytest.raises(ValueError, match=r"data=3, model=-1.*does not divide the 8 devices"):
    mesh_lib.make_mesh((("data", 3), ("model", -1)))
  with pytest.raises(ValueError, match=r"data=2, model=2\) needs 4 devices, but there are 8"):
    mesh_lib.make_mesh((("data", 2), ("model", 2)))


def test_rule_that_matches_no_parameter_names_it_and_lists_paths():
  with pytest.raises(ValueError, match=r"'mlp/w_in/kernel\$'.*matches no parameter.*params/block_0/attn/query/kernel"):
    sharding.param_specs(_abstract(), ((r"mlp/w_in/kernel$", (None, "model")),))
  with pytest.raises(ValueError, match=r"never used.*taken by the earlier.*'mlp/'"):
    sharding.param_specs(_abstract(), ((r"mlp/", ("model",)), (r"mlp/wi", (None, "model"))))


def test_dimension_not_divisible_by_its_mesh_axis():
  msg = (
    r"Sharding rule \('embed/embedding\$', \('model', None\)\) for parameter 'params/embed/embedding': axis 0"
    r" \(size 96\) of shape \(96, 32\) is split over mesh axis 'model' \(model=4.*not divisible"
  )
  odd = TransformerConfig(**{**TINY.__dict__, "vocab_size": 94})
  sharding.param_shardings(_abstract(), ((r"embed/embedding$", ("model", None)),), _mesh())  # 96 / 4: fine
  with pytest.raises(ValueError, match=msg.replace("96", "94")):
    sharding.param_shardings(_abstract(odd), ((r"embed/embedding$", ("model", None)),), _mesh())
  with pytest.raises(ValueError, match=r"split over mesh axis \('data', 'model'\) \(data=2 x model=4, 8 shards\)"):
    sharding.param_shardings(_abstract(), ((r"attn/query/kernel$", (None, ("data", "model"))),), _mesh())


def test_spec_longer_than_rank_and_unknown_axis_and_malformed_rules():
  with pytest.raises(ValueError, match=r"3 spec entries but parameter 'params/block_0/mlp/wi/kernel' has shape"):
    sharding.param_specs(_abstract(), ((r"mlp/wi/kernel$", (None, "model", None)),))
  with pytest.raises(ValueError, match=r"names mesh axis 'modle', but the mesh has axes \{'data': 2, 'model': 4\}"):
    sharding.param_shardings(_abstract(), ((r"mlp/wi/kernel$", (None, "modle")),), _mesh())
  with pytest.raises(ValueError, match="expected a pair"):
    sharding.normalize_rules(("mlp/wi", (None, "model")))
  with pytest.raises(ValueError, match="does not compile"):
    sharding.normalize_rules((("mlp/(", ()),))
  with pytest.raises(ValueError, match=re.escape("Unknown sharding preset 'fdsp'")):
    sharding.param_specs(_abstract(), (), preset="fdsp")


# ----------------------------------------------------------------------------
# Optimizer state.


def _opt_leaves(state, shardings):
  return {k: (getattr(v, "shape", None), s.spec) for (k, v), s in zip(_flat(state).items(), jax.tree.leaves(shardings))}


@pytest.mark.parametrize(
  "make",
  [
    lambda: optim.make_optimizer(dict(optimizer="adamw", num_steps=10)),
    lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    lambda: optax.MultiSteps(optax.chain(optax.clip(1.0), optax.masked(optax.adam(1e-3), optim.decay_mask)), 2),
  ],
  ids=["chain", "inject_hyperparams", "multisteps_masked"],
)
def test_adam_moments_are_sharded_like_their_params(make):
  abstract, mesh = _abstract(), _mesh()
  pshard = sharding.param_shardings(abstract, (), mesh, preset="fsdp_tp")
  state = jax.eval_shape(make().init, abstract)
  leaves = _opt_leaves(state, sharding.opt_state_shardings(state, pshard, mesh))
  want = {k: s.spec for k, s in _flat(pshard).items()}
  moments = [k for k in leaves if re.search(r"(mu|nu|acc_grads)/.*params/", k)]
  assert moments
  for k in moments:
    param = "params/" + k.split("params/", 1)[1]
    assert leaves[k][1] == want[param], k
  for k, (shape, spec) in leaves.items():
    if shape == ():
      assert all(e is None for e in spec), k  # counts, hyperparameters


def test_adafactor_factored_moments_keep_the_sharding_of_the_kept_axes():
  # Attention kernels [64, 2, 32]: their two largest axes reach adafactor_min_dim_size_to_factor (32).
  cfg = TransformerConfig(vocab_size=96, d_model=64, n_layers=1, n_heads=2, d_ff=128, max_len=16, tied_embeddings=False)
  abstract, mesh = _abstract(cfg), _mesh(4, 2)
  optimizer = optim.make_optimizer(dict(optimizer="adafactor", num_steps=10))
  pshard = sharding.param_shardings(abstract, (), mesh, preset="fsdp_tp")
  state = jax.eval_shape(optimizer.init, abstract)
  with_shapes = sharding.with_shardings(abstract, pshard)
  leaves = _opt_leaves(state, sharding.opt_state_shardings(state, with_shapes, mesh))
  # wi [64, 128] spec (data, model): d0 = 1, d1 = 0; v_row drops d0 -> [64] (data), v_col drops d1 -> [128] (model).
  assert leaves["1/v_row/params/block_0/mlp/wi/kernel"] == ((64,), P("data"))
  assert leaves["1/v_col/params/block_0/mlp/wi/kernel"] == ((128,), P("model"))
  # query [64, 2, 32] spec (data, model, None): d0 = 0, d1 = 2; v_row [2, 32] (model, None), v_col [64, 2] (data, model).
  assert leaves["1/v_row/params/block_0/attn/query/kernel"] == ((2, 32), P("model", None))
  assert leaves["1/v_col/params/block_0/attn/query/kernel"] == ((64, 2), P("data", "model"))
  assert leaves["1/v/params/block_0/mlp/wi/kernel"] == ((1,), P())  # the dummy
  # From NamedShardings alone (no shapes) the dropped axis of wi's v_row is ambiguous: replicated, never wrong.
  bare = _opt_leaves(state, sharding.opt_state_shardings(state, pshard, mesh))
  assert bare["1/v_row/params/block_0/mlp/wi/kernel"] == ((64,), P())
  # The placement is usable: optimizer.init under jit with these out_shardings.
  params = training.init_params(DecoderLM(cfg), seq_len=8, seed=0, sharding=pshard)
  placed = training.init_opt_state(optimizer, params, sharding=sharding.opt_state_shardings(state, with_shapes, mesh))
  assert projection.flatten_paths(placed)["1/v_col/params/block_0/mlp/wi/kernel"].sharding.spec == P("model")
