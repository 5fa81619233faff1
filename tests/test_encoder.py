"""TrackStarEncoder: invariance to batch size, device count and process count; loss masks."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trackstar_jax import configs
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.encoder import TrackStarEncoder
from trackstar_jax.models.transformer import DecoderLM, TransformerConfig

V, T = 40, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoder_config(correction="adam"):
  cfg = configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=T).encoder
  cfg.d_in, cfg.d_out, cfg.seed, cfg.correction = 3, 4, 0, correction
  return cfg


def make_model():
  model = DecoderLM(TransformerConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=T))
  params = model.init(jax.random.key(0), jnp.ones((1, T), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  state = optax.adam(1e-3).init(params)
  state = jax.tree.map(
    lambda x: rng.uniform(0.2, 3.0, x.shape).astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
  )
  return model, params, state


def make_examples(n, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, V, (n, T)).astype(np.int32)
  lengths = rng.integers(3, T + 1, n)
  pad = np.arange(T)[None] < lengths[:, None]
  inputs = np.where(pad, inputs, 0)
  targets = np.where(np.arange(T)[None] < lengths[:, None] - 1, np.roll(inputs, -1, 1), 0)
  loss_mask = (np.arange(T)[None] < lengths[:, None] - 1).astype(np.float32)
  return dict(inputs=inputs, targets=targets, loss_mask=loss_mask, pad_mask=pad, ids=np.arange(n, dtype=np.int64))


def rows(ex, lo, hi):
  return {k: v[lo:hi] for k, v in ex.items()}


@pytest.fixture(scope="module")
def setup():
  model, params, state = make_model()
  enc = TrackStarEncoder(model_apply=model.apply, params=params, config=encoder_config(), opt_state=state)
  return model, params, state, enc


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_batch_size_invariance_and_reference(setup):
  _, _, _, enc = setup
  ex = make_examples(32)
  ref = np.asarray(enc.reference(ex))
  assert enc.dim == 4 * 3 * 4 and enc.blocks == ["0/attn", "0/mlp", "1/attn", "1/mlp"]
  for bs in (1, 7, 32):
    phi = np.concatenate([np.asarray(enc.encode(rows(ex, i, i + bs))) for i in range(0, 32, bs)])
    assert phi.shape == (32, enc.dim)
    assert rel(phi, ref) < 1e-4, bs
  local = enc.encode_local(rows(ex, 0, 7))
  assert isinstance(local, np.ndarray) and local.shape == (7, enc.dim) and rel(local, ref[:7]) < 1e-4


def test_device_count_invariance(setup):
  model, params, state, enc8 = setup
  ex = make_examples(7, seed=1)
  want = np.asarray(enc8.encode(ex))
  for n in (1, 2):
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:n])
    enc = TrackStarEncoder(model_apply=model.apply, params=params, config=encoder_config(), opt_state=state, mesh=mesh)
    assert rel(enc.encode(ex), want) < 1e-5, n


def test_pallas_layer_kernel_over_a_mesh_matches_einsums(setup):
  """Exact Adam per layer with `scaled_projection` (Pallas' interpreter here), over 8 and 1 devices."""
  model, params, state, enc8 = setup
  ex = make_examples(7, seed=4)
  cfg = encoder_config()
  cfg.layer_mode = "layer"
  want = None
  for n in (8, 1):
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:n])
    encs = {}
    for kernel in ("xla", "pallas"):
      cfg.layer_kernel = kernel
      encs[kernel] = TrackStarEncoder(model_apply=model.apply, params=params, config=cfg, opt_state=state, mesh=mesh)
    assert set(encs["pallas"].projector.layer_kernels().values()) == {"pallas"}
    got = np.asarray(encs["pallas"].encode(ex))
    want = np.asarray(encs["xla"].encode(ex)) if want is None else want
    assert rel(got, want) < 1e-5, n
  assert rel(want, enc8.encode(ex)) < 1e-5  # and both equal the default (fused) encoding
  with pytest.raises(ValueError, match="layer_kernel must be auto.xla.pallas"):
    cfg.layer_kernel = "triton"
    TrackStarEncoder(model_apply=model.apply, params=params, config=cfg, opt_state=state)


def test_padding_rows_and_ids(setup):
  _, _, _, enc = setup
  ex = make_examples(5, seed=2)
  ex["ids"][3] = -1
  phi = np.asarray(enc.encode(ex))
  assert np.all(phi[3] == 0) and np.all(np.abs(phi[[0, 1, 2, 4]]).max(axis=1) > 0)


def test_query_prompt_tokens_are_context_only(setup):
  model, params, _, enc = setup
  ex = make_examples(4, seed=3)
  ex["pad_mask"][:] = True
  ex["inputs"] = np.where(ex["inputs"] == 0, 5, ex["inputs"])
  query = dict(ex, loss_mask=np.zeros((4, T), np.float32))
  query["loss_mask"][:, T - 3 :] = 1.0  # only the target tokens' losses count
  phi = np.asarray(enc.encode(query))
  # Changing the prompt positions' targets (their losses are masked) changes nothing ...
  other = dict(query, targets=np.where(query["loss_mask"] > 0, query["targets"], (query["targets"] + 7) % V))
  assert rel(enc.encode(other), phi) < 1e-6
  # ... while the encoding is not that of the full-sequence loss ...
  assert rel(enc.encode(dict(query, loss_mask=np.ones((4, T), np.float32))), phi) > 1e-2

  # ... and it equals a hand-written target-only loss's reference encoding.
  def target_only(p, b):
    logp = jax.nn.log_softmax(model.apply(p, b["inputs"], b["pad_mask"]), -1)
    tok = jnp.take_along_axis(logp[:, T - 3 :], b["targets"][:, T - 3 :, None], -1)[..., 0]
    return -jnp.sum(tok, axis=-1)

  hand = TrackStarEncoder(loss_fn=target_only, params=params, config=encoder_config(), correction=enc.correction)
  assert rel(hand.reference(query), phi) < 1e-4


def test_regex_matching_nothing_lists_paths(setup):
  model, params, state, _ = setup
  cfg = encoder_config("none")
  cfg.param_regex = r"no_such_layer"
  with pytest.raises(ValueError, match=r"(?s)matches no parameter.*block_0/attn/query/kernel"):
    TrackStarEncoder(model_apply=model.apply, params=params, config=cfg)


def test_unknown_correction_kind(setup):
  model, params, state, _ = setup
  with pytest.raises(ValueError, match="Unknown encoder.correction"):
    TrackStarEncoder(model_apply=model.apply, params=params, config=encoder_config("sgd"), opt_state=state)


_WORKER = textwrap.dedent("""
    import os, sys
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.join(sys.argv[4], "tests")); sys.path.insert(0, sys.argv[4])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=pid)
    import numpy as np
    import test_encoder as te
    from trackstar_jax import projection
    from trackstar_jax.encoder import TrackStarEncoder
    model, params, state = te.make_model()
    enc = TrackStarEncoder(model_apply=model.apply, params=params, config=te.encoder_config(), opt_state=state)
    ex = te.make_examples(6)
    phi = enc.encode_local(te.rows(ex, 3 * pid, 3 * pid + 3))  # each process: its 3 rows
    p_in, p_out = projection.projection_matrices("params/block_1/mlp/wo/kernel", n=32, m=16, d_in=3, d_out=4, seed=0)
    np.savez(os.path.join(out, "proc%d.npz" % pid), phi=phi, p_in=p_in, p_out=p_out)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(setup, tmp_path):
  _, _, _, enc = setup
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [
    subprocess.Popen(
      ["timeout", "120", sys.executable, str(script), str(i), port, str(tmp_path), REPO],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  logs = [p.communicate()[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  got = [np.load(tmp_path / f"proc{i}.npz") for i in range(2)]
  from trackstar_jax import projection

  p_in, p_out = projection.projection_matrices("block_1/mlp/wo/kernel", n=32, m=16, d_in=3, d_out=4, seed=0)
  for g in got:  # bit-identical projections in every process (and here)
    assert np.array_equal(g["p_in"], p_in) and np.array_equal(g["p_out"], p_out)
  phi = np.concatenate([g["phi"] for g in got])
  assert phi.shape == (6, enc.dim)
  assert rel(phi, enc.encode(make_examples(6))) < 1e-5
