"""scaled_projection: (G * S) P_out per example == NumPy, tiles, padding of d_out, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trackstar_jax import mesh as mesh_lib
from trackstar_jax import scaled_projection


@pytest.mark.parametrize("b,k,l,z", [(3, 64, 128, 4), (2, 48, 80, 16), (1, 16, 256, 24), (2, 64, 128, 256)])
def test_scale_project_matches_numpy(b, k, l, z):
  rng = np.random.default_rng(0)
  g = rng.standard_normal((b, k, l)).astype(np.float32)
  s = rng.uniform(0.1, 3.0, (k, l)).astype(np.float32)
  p = rng.standard_normal((l, z)).astype(np.float32)
  h = scaled_projection.scale_project(jnp.asarray(g), jnp.asarray(s), jnp.asarray(p), interpret=True)
  want = np.einsum("bkl,kl,lz->bkz", g.astype(np.float64), s, p)
  assert h.shape == (b, k, z) and h.dtype == jnp.float32
  np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_sharded_over_the_batch_equals_one_device():
  rng = np.random.default_rng(1)
  g, s, p = rng.standard_normal((8, 32, 64)), rng.uniform(0.1, 3.0, (32, 64)), rng.standard_normal((64, 16))
  g, s, p = (jnp.asarray(a, jnp.float32) for a in (g, s, p))
  one = scaled_projection.scale_project(g, s, p, interpret=True)
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:8])
  many = jax.jit(lambda *a: scaled_projection.sharded_scale_project(*a, mesh=mesh, interpret=True))(g, s, p)
  np.testing.assert_allclose(many, one, rtol=1e-6, atol=1e-6)


def test_tiles_and_refusals():
  assert scaled_projection.tiles(2048, 8192, 64, examples=2) == (64, 128)
  assert scaled_projection.tiles(2048, 8192, 64, examples=4) == (64, 64)  # the default at the 1B shape (run E3)
  # Wide d_out: smaller tiles, as Triton's shared memory allows (run D5: (64, 128) at d_out 256 asked for 294,912 bytes).
  assert scaled_projection.shared_memory_bytes(1, 64, 128, 256, 2) == 294912
  assert scaled_projection.shared_memory_bytes(4, 64, 128, 64, 2) == 245760  # D1's failed 4-example setting
  assert scaled_projection.tiles(2048, 8192, 256) == (64, 64)
  assert scaled_projection.tiles(2048, 8192, 256, examples=2) == (64, 64)
  assert scaled_projection.tiles(2048, 8192, 1 << 14) is None  # no tile fits: the einsum path
  assert scaled_projection.tiles(48, 80) == (16, 16)
  assert scaled_projection.tiles(8, 128) is None  # K below Triton's 16: the einsum path
  with pytest.raises(ValueError, match="does not tile"):
    scaled_projection.scale_project(jnp.zeros((1, 8, 32)), jnp.zeros((8, 32)), jnp.zeros((32, 16)), interpret=True)
  with pytest.raises(ValueError, match="do not match"):
    scaled_projection.scale_project(jnp.zeros((1, 16, 32)), jnp.zeros((16, 16)), jnp.zeros((32, 16)), interpret=True)
  two_axes = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
  assert not scaled_projection.mesh_supported(two_axes) and scaled_projection.mesh_supported(None)
  assert scaled_projection.mesh_supported(jax.sharding.AbstractMesh((4, 1), ("data", "model")))


def test_auto_takes_the_kernel_for_bf16_on_gpus_only():
  assert scaled_projection.auto_chooses(jnp.bfloat16, "gpu")
  assert not scaled_projection.auto_chooses(jnp.float32, "gpu")
  assert not scaled_projection.auto_chooses(jnp.bfloat16, "cpu")
  assert not scaled_projection.auto_chooses(jnp.bfloat16, "tpu")
  assert scaled_projection.auto_chooses(jnp.bfloat16, "gpu", d_out=scaled_projection.AUTO_MAX_D_OUT)
  assert not scaled_projection.auto_chooses(jnp.bfloat16, "gpu", d_out=256)  # run D6: 20x slower than at 128


@pytest.mark.parametrize("examples", [1, 2, 4])
def test_examples_per_program_give_the_same_projection(examples):
  rng = np.random.default_rng(2)
  g, s, p = rng.standard_normal((4, 32, 64)), rng.uniform(0.1, 3.0, (32, 64)), rng.standard_normal((64, 8))
  g, s, p = (jnp.asarray(a, jnp.float32) for a in (g, s, p))
  want = np.einsum("bkl,kl,lz->bkz", np.asarray(g, np.float64), s, p)
  h = scaled_projection.scale_project(g, s, p, interpret=True, examples=examples)
  np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_examples_per_program_default_and_refusal():
  assert scaled_projection.examples_per_program(16) == 4
  assert scaled_projection.examples_per_program(6) == 2
  assert scaled_projection.examples_per_program(3) == 1  # an odd batch: one example per program
  with pytest.raises(ValueError, match="does not divide"):
    scaled_projection.examples_per_program(6, 4)
