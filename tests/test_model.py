"""DecoderLM: shapes, causality, padding invariance, parameter naming."""

import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax.models import DecoderLM, TransformerConfig


def _model(**kw):
  cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, **kw)
  return DecoderLM(cfg), cfg


def test_shapes_and_param_count():
  for tied in (True, False):
    model, cfg = _model(tied_embeddings=tied)
    tokens = jnp.ones((3, 10), jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    assert model.apply(params, tokens).shape == (3, 10, 50)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == cfg.num_params()


def test_param_paths_match_default_regex():
  import re

  from trackstar_jax import configs

  model, _ = _model()
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  paths = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  regex = re.compile(configs.base_config(dataset="x", model="tiny", seq_len=8).encoder.param_regex)
  traced = sorted(p for p in paths if regex.search(p))
  assert len(traced) == 2 * 6  # q, k, v, out, wi, wo per block
  assert "params/block_0/attn/query/kernel" in traced
  assert not any("embed" in p or "norm" in p for p in traced)


def test_causal_and_right_padding_invariance():
  model, _ = _model()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 50, (2, 12)), jnp.int32)
  params = model.init(jax.random.key(1), tokens)
  full = model.apply(params, tokens)
  # Changing a later token leaves earlier logits unchanged.
  changed = tokens.at[:, 8].set(7)
  np.testing.assert_allclose(model.apply(params, changed)[:, :8], full[:, :8], atol=1e-5)
  # Right padding with a pad mask leaves real-token logits unchanged.
  pad_mask = jnp.arange(12)[None] < jnp.array([[8], [12]])
  padded = jnp.where(pad_mask, tokens, 0)
  out = model.apply(params, padded, pad_mask)
  np.testing.assert_allclose(out[0, :8], full[0, :8], atol=1e-5)
  # Left padding with a pad mask gives the same logits as the unpadded sequence.
  left = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), tokens[:1, :8]], axis=1)
  left_mask = jnp.arange(12)[None] >= 4
  np.testing.assert_allclose(model.apply(params, left, left_mask)[0, 4:], full[0, :8], atol=1e-4)
