"""Kronecker projection: determinism, layouts, blocks, inner products in expectation."""

import jax.numpy as jnp
import numpy as np
import pytest

from trackstar_jax import projection


def test_matrices_deterministic_and_path_dependent():
  a = projection.projection_matrices("params/block_0/mlp/wi/kernel", n=20, m=30, d_in=4, d_out=5, seed=3)
  b = projection.projection_matrices("block_0/mlp/wi/kernel", n=20, m=30, d_in=4, d_out=5, seed=3)
  c = projection.projection_matrices("block_0/mlp/wo/kernel", n=20, m=30, d_in=4, d_out=5, seed=3)
  d = projection.projection_matrices("block_0/mlp/wi/kernel", n=20, m=30, d_in=4, d_out=5, seed=4)
  assert a[0].shape == (20, 4) and a[1].shape == (30, 5) and a[0].dtype == np.float32
  assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # 'params/' prefix is not hashed
  assert not np.allclose(a[0], c[0]) and not np.allclose(a[0], d[0])
  assert not np.allclose(a[0][:, :4], a[1][:20, :4])  # P_in and P_out are independent draws
  # Variance 1/d: E[P P^T] = I.
  big_in, _ = projection.projection_matrices("x/kernel", n=50, m=2, d_in=400, d_out=1, seed=0)
  np.testing.assert_allclose(np.var(big_in), 1 / 400, rtol=0.05)


def test_inner_products_preserved_in_expectation():
  """E<Phi(A), Phi(B)> = <A, B> for a block of two matrices, over 400 seeds.

  Tolerance: 5 standard errors of the sample mean (a false failure has
  probability < 1e-6); the mean of |<Phi(A),Phi(B)>| bias check uses the
  same estimate of the spread.
  """
  rng = np.random.default_rng(0)
  shapes = [(6, 5), (4, 7)]
  ga = [rng.standard_normal(s) for s in shapes]
  gb = [g + 0.5 * rng.standard_normal(g.shape) for g in ga]
  true = sum(np.sum(x * y) for x, y in zip(ga, gb))
  vals = []
  for seed in range(400):
    pa, pb = 0.0, 0.0
    for i, (g1, g2) in enumerate(zip(ga, gb)):
      p_in, p_out = projection.projection_matrices(
        f"m{i}/kernel", n=g1.shape[0], m=g1.shape[1], d_in=3, d_out=2, seed=seed
      )
      pa = pa + p_in.T @ g1 @ p_out
      pb = pb + p_in.T @ g2 @ p_out
    vals.append(np.sum(pa * pb))
  vals = np.asarray(vals)
  stderr = vals.std() / np.sqrt(len(vals))
  assert abs(vals.mean() - true) < 5 * stderr, (vals.mean(), true, stderr)
  assert stderr < 0.2 * abs(true)  # the test has power: the spread is small relative to the value


def test_select_paths_and_error_lists_paths():
  tree = {
    "params": {
      "block_0": {"attn": {"query": {"kernel": np.zeros((2, 3))}}, "attn_norm": {"scale": np.zeros(2)}},
      "embed": {"embedding": np.zeros((4, 2))},
    }
  }
  assert projection.select_paths(tree, regex=r"block_\d+/(attn|mlp)/.*/kernel$") == ["params/block_0/attn/query/kernel"]
  with pytest.raises(ValueError, match=r"(?s)matches no parameter.*params/embed/embedding"):
    projection.select_paths(tree, regex=r"mlp")


def test_kernel_layout_matrix_view():
  k = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  lay = projection.KernelLayout((2, 3, 4), (0, 2))
  assert (lay.n, lay.m, lay.out_axes) == (8, 3, (1,))
  np.testing.assert_array_equal(lay.as_matrix(jnp.asarray(k)), k.transpose(0, 2, 1).reshape(8, 3))
  with pytest.raises(ValueError):
    projection.KernelLayout((2, 3), (0, 1))


def test_blocks_layer_groups_and_project():
  paths = [
    f"params/block_{i}/{kind}/{name}/kernel" for i in range(4) for kind, name in (("attn", "query"), ("mlp", "wi"))
  ]
  layouts = {p: projection.KernelLayout((3, 5), (0,)) for p in paths}
  plan = projection.ProjectionPlan.create(
    layouts, d_in=2, d_out=2, seed=0, block_fn=projection.block_key_fn(layers_per_group=2)
  )
  assert plan.blocks == ["0/attn", "0/mlp", "1/attn", "1/mlp"] and plan.dim == 16
  assert plan.block_of["block_3/mlp/wi/kernel"] == 3 and plan.block_of["block_2/attn/query/kernel"] == 2
  rng = np.random.default_rng(1)
  grads = {projection.canonical_path(p): rng.standard_normal((2, 3, 5)).astype(np.float32) for p in paths}
  phi = np.asarray(plan.project(grads))
  want = 0.0
  for p in ("block_2/mlp/wi/kernel", "block_3/mlp/wi/kernel"):
    p_in, p_out = plan.matrices(p)
    want = want + np.einsum("na,bnm,mc->bac", p_in, grads[p], p_out)
  np.testing.assert_allclose(phi[:, 12:16], want.reshape(2, 4), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="block regex"):
    projection.ProjectionPlan.create({"head/kernel": projection.KernelLayout((3, 5), (0,))}, d_in=2, d_out=2, seed=0)
