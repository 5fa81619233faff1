"""R accumulation, the lambda rule, damped R^{-1/2}, save/load, unit encodings."""

import ml_collections
import numpy as np
import pytest

from trackstar_jax import hessian
from trackstar_jax import mesh as mesh_lib


def cfg(**kw):
  base = dict(mixed=True, top_k_eig=2, damping=1e-3, block_diagonal=False, dtype="float32")
  return ml_collections.ConfigDict(dict(base, **kw))


def test_second_moment_sharded_batches_and_padding():
  rng = np.random.default_rng(0)
  phi = rng.standard_normal((40, 16)).astype(np.float32)
  mesh = mesh_lib.make_mesh()
  acc = hessian.SecondMoment(16, mesh=mesh)
  for i in range(0, 40, 8):
    batch = mesh_lib.shard_batch({"phi": phi[i : i + 8]}, mesh)["phi"]
    valid = np.arange(i, i + 8) < 37  # the last 3 rows are padding
    acc.update(batch, valid=valid)
  assert acc.count == 37
  np.testing.assert_allclose(acc.result(), phi[:37].T @ phi[:37] / 37, rtol=1e-5, atol=1e-6)
  r_blocks, n = hessian.second_moment(phi, n_blocks=4, block_diagonal=True)
  full = phi.T @ phi / 40
  for b in range(4):
    np.testing.assert_allclose(r_blocks[b], full[4 * b : 4 * b + 4, 4 * b : 4 * b + 4], rtol=1e-5, atol=1e-6)


def test_lambda_rule_hand_computed():
  # k = 2: sigma_train[2nd] = 3, sigma_eval[2nd] = 1 -> lam = 3 / (1 + 3) = 0.75.
  lam = hessian.mixing_lambda([5.0, 3.0, 1.0], [0.5, 4.0, 1.0], k=2)
  assert lam == pytest.approx(0.75)
  assert lam * 1.0 == pytest.approx((1 - lam) * 3.0)
  # Through fit_hessian with diagonal phis (eigenvalues are the mean squares).
  train = np.diag(np.sqrt([5.0, 3.0, 1.0])).astype(np.float32) * np.sqrt(3)  # R_train = diag(5, 3, 1)
  evals = np.diag(np.sqrt([0.5, 4.0, 1.0])).astype(np.float32) * np.sqrt(3)  # R_eval = diag(0.5, 4, 1)
  h = hessian.fit_hessian(train_phi=train, eval_phi=evals, config=cfg(damping=0.0))
  assert h.lam == pytest.approx(0.75, rel=1e-5)
  r = 0.75 * np.diag([0.5, 4.0, 1.0]) + 0.25 * np.diag([5.0, 3.0, 1.0])
  np.testing.assert_allclose(h.inv_sqrt, np.diag(np.diag(r) ** -0.5), rtol=1e-5, atol=1e-6)
  assert hessian.fit_hessian(train_phi=train, config=cfg(mixed=False, damping=0.0)).lam == 0.0
  with pytest.raises(ValueError, match="eval_phi"):
    hessian.fit_hessian(train_phi=train, config=cfg())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inverse_sqrt_whitens(dtype):
  rng = np.random.default_rng(1)
  a = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
  r = (a.T @ a / 200).astype(np.float32)
  inv, sigma = hessian.inverse_sqrt(r, damping=1e-7, dtype=dtype)
  np.testing.assert_allclose(inv @ r @ inv, np.eye(12), atol=1e-3)
  # Damping: (R + eta mean(eig) I)^{-1/2}.
  inv_d, _ = hessian.inverse_sqrt(r, damping=0.5, dtype=dtype)
  damped = r + 0.5 * np.mean(np.linalg.eigvalsh(r)) * np.eye(12)
  np.testing.assert_allclose(inv_d @ damped @ inv_d, np.eye(12), atol=1e-4)
  with pytest.raises(ValueError, match="never bf16"):
    hessian.inverse_sqrt(r, damping=0.1, dtype="bfloat16")


def test_block_diagonal_fit_apply_and_save_load(tmp_path):
  rng = np.random.default_rng(2)
  phi = rng.standard_normal((64, 8)).astype(np.float32)
  h = hessian.fit_hessian(
    train_phi=[phi[:30], (phi[30:], np.ones(34, bool))], eval_phi=phi[:10], config=cfg(block_diagonal=True), n_blocks=2
  )
  assert np.shape(h.inv_sqrt) == (2, 4, 4) and h.dim == 8 and 0 < h.lam < 1
  psi = np.asarray(h.apply(phi[:5]))
  for b in range(2):
    np.testing.assert_allclose(
      psi[:, 4 * b : 4 * b + 4], phi[:5, 4 * b : 4 * b + 4] @ h.inv_sqrt[b], rtol=1e-5, atol=1e-6
    )
  h.save(str(tmp_path / "h.npz"))
  h2 = hessian.Hessian.load(str(tmp_path / "h.npz"))
  np.testing.assert_array_equal(h2.inv_sqrt, h.inv_sqrt)
  assert h2.lam == h.lam and h2.meta == h.meta and h2.meta["n_train"] == 64
  with pytest.raises(ValueError, match="dim 8"):
    h.apply(phi[:, :4])


def test_unit_encode_and_cosine_scores():
  rng = np.random.default_rng(3)
  q, z = rng.standard_normal((3, 6)), rng.standard_normal((5, 6))
  z[4] = 0.0
  h = hessian.fit_hessian(train_phi=z[:4].astype(np.float32), config=cfg(mixed=False, damping=0.1))
  e = np.asarray(hessian.unit_encode(z, h))
  np.testing.assert_allclose(np.linalg.norm(e[:4], axis=1), 1.0, rtol=1e-5)
  assert np.all(e[4] == 0)
  psi_q, psi_z = q @ h.inv_sqrt, z @ h.inv_sqrt
  want = (psi_q / np.linalg.norm(psi_q, axis=1, keepdims=True)) @ (
    psi_z / np.maximum(np.linalg.norm(psi_z, axis=1, keepdims=True), 1e-12)
  ).T
  np.testing.assert_allclose(hessian.cosine_scores(q, z, hessian=h), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "other_npz", "nan"])
def test_damaged_hessian_file_says_what_to_rerun(tmp_path, damage):
  path = tmp_path / "wd" / "hessian.npz"
  path.parent.mkdir()
  inv = np.eye(8, dtype=np.float32) * (np.nan if damage == "nan" else 1.0)
  hessian.Hessian(inv_sqrt=inv, lam=0.5, meta={"n_train": 3}).save(str(path))
  raw = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(raw[: len(raw) // 2])
  elif damage == "flip":  # inside inv_sqrt's data: the zip CRC check fails
    i = raw.index(b"\x00\x00\x80\x3f")  # a float32 1.0
    path.write_bytes(raw[:i] + b"\x00\x00\x80\x40" + raw[i + 4 :])
  elif damage == "garbage":
    path.write_bytes(b"not a zip file at all")
  elif damage == "other_npz":
    np.savez(str(path), x=np.zeros(3))
  with pytest.raises(hessian.HessianFileError) as e:
    hessian.Hessian.load(str(path))
  msg = str(e.value)
  assert str(path) in msg and "python -m launch.fit_hessian" in msg and f"--workdir={tmp_path / 'wd'}" in msg, msg
  want = {
    "truncate": "truncated or corrupt",
    "flip": "truncated or corrupt",
    "garbage": "truncated or corrupt",
    "other_npz": "lacks ['inv_sqrt', 'lam', 'meta']",
    "nan": "non-finite",
  }[damage]
  assert want in msg, msg
  with pytest.raises(FileNotFoundError, match="launch.fit_hessian"):
    hessian.Hessian.load(str(tmp_path / "nothing.npz"))


def test_fewer_rows_than_dimensions_is_warned(caplog):
  """R from N < d rows: scores among the sampled rows tie; the fit says so (and fits anyway)."""
  rng = np.random.default_rng(3)
  phi = rng.standard_normal((12, 16)).astype(np.float32)
  with caplog.at_level("WARNING"):
    hessian.fit_hessian(train_phi=phi[:6], eval_phi=phi[6:9], config=cfg())  # 9 rows in d = 16
  assert "R is fit from 9 rows in dimension 16" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):  # block-diagonal: the block's dimension counts (8 rows >= 4)
    hessian.fit_hessian(train_phi=phi[:8], config=cfg(mixed=False, block_diagonal=True), n_blocks=4)
  assert "R is fit from" not in caplog.text
