"""Tests of trackstar_jax.evaluation.tail_patch against hand-computed optimizer steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar_jax import losses
from trackstar_jax.evaluation import tail_patch as tp
from trackstar_jax.models import DecoderLM, TransformerConfig

V, T = 13, 8


def _examples(rng, n, *, query=False, first_id=0):
  """n random examples in the batch convention, right-padded to T."""
  inputs = np.zeros((n, T), np.int32)
  targets = np.zeros((n, T), np.int32)
  loss_mask = np.zeros((n, T), np.float32)
  for i in range(n):
    length = rng.integers(4, T + 1)  # tokens incl. BOS
    seq = np.concatenate([[1], rng.integers(3, V, size=length)])  # BOS=1
    inputs[i, :length] = seq[:-1][:length]
    targets[i, :length] = seq[1:][:length]
    if query:
      loss_mask[i, length - 2 : length] = 1.0  # the last two tokens are the "answer"
    else:
      loss_mask[i, :length] = 1.0
  return dict(
    inputs=inputs,
    targets=targets,
    loss_mask=loss_mask,
    pad_mask=inputs != 0,
    ids=np.arange(first_id, first_id + n, dtype=np.int64),
  )


@pytest.fixture(scope="module")
def setup():
  cfg = TransformerConfig(vocab_size=V, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=T)
  model = DecoderLM(cfg)
  params = model.init(jax.random.key(0), jnp.ones((1, T), jnp.int32))
  rng = np.random.default_rng(0)
  corpus = _examples(rng, 12, first_id=100)
  queries = _examples(rng, 5, query=True)
  return model, params, corpus, queries


def _adam_state(model, params, corpus, opt):
  """Optimizer state after two real training steps (non-trivial m, v, count)."""
  state = opt.init(params)
  for s in range(2):
    b = {k: jnp.asarray(corpus[k][4 * s : 4 * s + 4]) for k in tp.BATCH_KEYS}
    g = jax.grad(lambda p: losses.mean_token_loss(model.apply(p, b["inputs"], b["pad_mask"]), b))(params)
    u, state = opt.update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


@functools.cache
def _ref_fns(model):
  """Jitted brute-force references (no vmap), compiled once per model."""
  logp = jax.jit(lambda p, b: -losses.example_losses(model.apply(p, b["inputs"], b["pad_mask"]), b))
  grad = jax.jit(jax.grad(lambda p, b: losses.mean_token_loss(model.apply(p, b["inputs"], b["pad_mask"]), b)))
  return logp, grad


def _logp(model, params, ex, i):
  """log p(answer | prompt) of example i alone."""
  b = {k: jnp.asarray(ex[k][i : i + 1]) for k in tp.BATCH_KEYS}
  return float(_ref_fns(model)[0](params, b)[0])


def _grad(model, params, ex, i):
  """Gradient of the training loss (mean token NLL) on example i alone."""
  b = {k: jnp.asarray(ex[k][i : i + 1]) for k in tp.BATCH_KEYS}
  return _ref_fns(model)[1](params, b)


def _results(pairs):
  return [dict(example_id=q, proponent_ids=list(p)) for q, p in pairs]


def test_sgd_matches_hand_step(setup):
  model, params, corpus, queries = setup
  lr = 0.5
  out = tp.tail_patch(
    apply_fn=model.apply,
    params=params,
    opt_state=optax.sgd(lr).init(params),
    optimizer=optax.sgd(lr),
    query_examples=queries,
    corpus_examples=corpus,
    results=_results([(0, [100, 105]), (3, [111, 102])]),
    k=2,
    query_chunk=4,
  )
  for r, (q, props) in enumerate([(0, [0, 5]), (3, [11, 2])]):
    p0 = np.exp(_logp(model, params, queries, q))
    assert out["p0"][r] == pytest.approx(p0, rel=1e-5)
    for j, c in enumerate(props):
      new = jax.tree.map(lambda w, g: w - lr * g, params, _grad(model, params, corpus, c))
      p1 = np.exp(_logp(model, new, queries, q))
      assert out["delta_p"][r, j] == pytest.approx(p1 - p0, rel=2e-3, abs=1e-7)
      assert out["rel_delta_p"][r, j] == pytest.approx((p1 - p0) / p0, rel=2e-3, abs=1e-6)
  assert np.abs(out["delta_p"]).max() > 1e-4  # the step actually moves p


def test_adam_matches_hand_update_with_restored_state(setup):
  model, params, corpus, queries = setup
  b1, b2, eps, lr_train, lr_final = 0.9, 0.95, 1e-8, 1e-2, 3e-2
  params, state = _adam_state(model, params, corpus, optax.adam(lr_train, b1=b1, b2=b2, eps=eps))
  adam = state[0]
  assert int(adam.count) == 2
  out = tp.tail_patch(
    apply_fn=model.apply,
    params=params,
    opt_state=state,
    optimizer=optax.adam(lr_final, b1=b1, b2=b2, eps=eps),
    query_examples=queries,
    corpus_examples=corpus,
    results=_results([(1, [107, 103, 110])]),
    k=3,
    query_chunk=2,
  )
  t = 3
  p0 = np.exp(_logp(model, params, queries, 1))
  for j, c in enumerate([7, 3, 10]):
    g = _grad(model, params, corpus, c)

    def step(w, g, m, v):
      w, g, m, v = (np.asarray(x, np.float64) for x in (w, g, m, v))
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
      return (w - lr_final * mhat / (np.sqrt(vhat) + eps)).astype(np.float32)

    new = jax.tree.map(step, params, g, adam.mu, adam.nu)
    p1 = np.exp(_logp(model, new, queries, 1))
    assert out["delta_p"][0, j] == pytest.approx(p1 - p0, rel=2e-3, abs=1e-7)
  assert np.abs(out["delta_p"]).max() > 1e-4


def test_vmap_equals_loop_and_chunking(setup):
  model, params, corpus, queries = setup
  opt = optax.adamw(1e-2, weight_decay=0.1)
  params, state = _adam_state(model, params, corpus, opt)
  pairs = [(q, [100 + (3 * q + j) % 12 for j in range(4)]) for q in range(5)]
  out = tp.tail_patch(
    apply_fn=model.apply,
    params=params,
    opt_state=state,
    optimizer=opt,
    query_examples=queries,
    corpus_examples=corpus,
    results=_results(pairs),
    k=4,
    query_chunk=3,
  )  # 5 queries -> a padded second chunk
  for r, (q, props) in enumerate(pairs):
    lp0 = _logp(model, params, queries, q)
    for j, c in enumerate(props):
      ex = {k: jnp.asarray(corpus[k][c - 100]) for k in tp.BATCH_KEYS}
      new = tp.patched_params(model.apply, opt, params, state, ex)
      lp1 = _logp(model, new, queries, q)
      assert out["rel_delta_p"][r, j] == pytest.approx(np.expm1(lp1 - lp0), rel=1e-3, abs=1e-6)
  assert out["valid"].all()
  np.testing.assert_array_equal(out["query_ids"], np.arange(5))


def test_fewer_proponents_masked_and_summary(setup):
  model, params, corpus, queries = setup
  opt = optax.sgd(0.3)
  out = tp.tail_patch(
    apply_fn=model.apply,
    params=params,
    opt_state=opt.init(params),
    optimizer=opt,
    query_examples=queries,
    corpus_examples=corpus,
    results=_results([(0, [100, 101, 102]), (1, [104]), (2, [])]),
    k=3,
  )
  np.testing.assert_array_equal(out["valid"], [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert np.isnan(out["delta_p"][1, 1:]).all()
  s = tp.summarize(out, ks=(1, 3))
  d, r = out["delta_p"], out["rel_delta_p"]
  assert s["n"] == 3
  assert s["tail_patch@1"] == pytest.approx((d[0, 0] + d[1, 0]) / 2)
  assert s["tail_patch@3"] == pytest.approx((d[0].mean() + d[1, 0]) / 2)
  assert s["tail_patch_rel@3"] == pytest.approx((r[0].mean() + r[1, 0]) / 2)
  s1 = tp.summarize(out, ks=(1,), mask=np.array([False, True, False]))
  assert s1["n"] == 1 and s1["tail_patch@1"] == pytest.approx(d[1, 0])


def test_unknown_ids_error(setup):
  model, params, corpus, queries = setup
  opt = optax.sgd(0.1)
  kw = dict(
    apply_fn=model.apply,
    params=params,
    opt_state=opt.init(params),
    optimizer=opt,
    query_examples=queries,
    corpus_examples=corpus,
  )
  with pytest.raises(ValueError, match="query 42 has no row"):
    tp.tail_patch(results=_results([(42, [100])]), **kw)
  with pytest.raises(ValueError, match="proponent id 7 has no row"):
    tp.tail_patch(results=_results([(0, [7])]), **kw)
