"""Model sharding from rules: specs, validation errors, optimizer-state shardings, and sharded = replicated runs."""

import re

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest
import ranking_helpers

from trackstar_jax import configs, optim, projection, sharding, training
from trackstar_jax import hessian as hessian_lib
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
  assert per_device < total / 7.5  # blocks split 8 ways, embeddings 4, norm scales replicated


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


# ----------------------------------------------------------------------------
# The jobs on a (data 2 x model 4) mesh = on (data 8): train, encode, fit_hessian, retrieve.

SHARDED = dict(mesh=(("data", 2), ("model", 4)), preset="fsdp_tp")


def _sharded(config, *, mesh=SHARDED["mesh"], preset=SHARDED["preset"]):
  config.mesh = mesh
  config.sharding.preset = preset
  return config


def _tree_close(a, b, **tol):
  fa, fb = projection.flatten_paths(a), projection.flatten_paths(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k, **tol)


def _sharded_workdir(trained, name):
  import os
  import shutil

  workdir = os.path.join(os.path.dirname(trained.workdir), name)
  os.makedirs(workdir)
  for f in ("tokenizer.model", "tokenizer.model.json"):
    shutil.copy(os.path.join(trained.workdir, f), workdir)
  return workdir


# Adam's normalized updates amplify float32 summation-order differences of near-zero gradients: after 4 steps
# at lr 1e-2, 1 element in ~1e5 differs by up to ~4e-6 (the rest by < 1e-7).
PARAM_TOL = dict(rtol=1e-5, atol=1e-5)


def test_sharded_training_gives_the_replicated_checkpoint(trained, monkeypatch):
  from trackstar_jax import checkpointing
  from trackstar_jax.jobs import train
  from trackstar_jax.jobs import workdir as workdir_lib

  ref = checkpointing.restore(trained.workdir)  # the fixture's run: mesh (data 8), replicated, 4 steps
  workdir = _sharded_workdir(trained, "sharded_train")
  config = _sharded(trained.config)
  seen = []
  make = training.make_train_step
  monkeypatch.setattr(training, "make_train_step", lambda *a, **kw: seen.append(kw) or make(*a, **kw))
  train.run(config, workdir)
  wi = projection.flatten_paths(seen[0]["param_sharding"])["params/block_0/mlp/wi/kernel"]
  assert wi.spec == P("data", "model") and wi.mesh.shape == {"data": 2, "model": 4}
  nu = projection.flatten_paths(seen[0]["opt_sharding"])["1/nu/params/block_0/mlp/wi/kernel"]
  assert nu.spec == P("data", "model")
  got = checkpointing.restore(workdir, step=4)
  _tree_close(got.params, ref.params, **PARAM_TOL)
  _tree_close(got.opt_state, ref.opt_state, rtol=1e-4, atol=1e-9)
  # Restored into the sharding (load_run with a mesh: config.sharding on it).
  run = workdir_lib.load_run(workdir, config=config, data=False, mesh=_mesh())
  query = projection.flatten_paths(run.params)["params/block_1/attn/query/kernel"]
  assert query.sharding.spec == P("data", "model", None)
  mu = projection.flatten_paths(run.opt_state)["1/mu/params/block_1/attn/query/kernel"]
  assert mu.sharding.spec == P("data", "model", None) and mu.addressable_shards[0].data.shape == (64, 1, 32)
  _tree_close(run.params, got.params, rtol=0, atol=0)


@pytest.mark.slow
def test_sharded_training_resumes_into_the_sharding(trained):
  import os
  import shutil

  from trackstar_jax import checkpointing
  from trackstar_jax.jobs import train

  ref = checkpointing.restore(trained.workdir)
  workdir = _sharded_workdir(trained, "sharded_resume")
  config = _sharded(trained.config)
  config.train.checkpoint_every = 2
  train.run(config, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  train.run(config, workdir)  # resumes from step 2, restored into the sharding
  _tree_close(checkpointing.restore(workdir, step=4).params, ref.params, **PARAM_TOL)


@pytest.mark.integration  # ~60 s: two encoders over 96 examples
def test_sharded_encoder_hessian_and_retrieval_match_data_parallel(trained):
  """load_encoder on (data 2 x model 4) with fsdp_tp: the phis, R^{-1/2} and top-k of (data 8)."""
  from trackstar_jax import api
  from trackstar_jax.jobs import workdir as workdir_lib

  rd = workdir_lib.load_data(trained.config, trained.workdir)
  corpus, queries = rd.corpus.select(np.arange(64)), rd.queries.select(np.arange(32))  # one batch shape: 1 compile
  out = {}
  for name in ("data8", "sharded"):
    config = _sharded(trained.config) if name == "sharded" else trained.config
    enc, _ = workdir_lib.load_encoder(config, trained.workdir, rd.tokenizer)
    if name == "sharded":  # params, projections and correction factors really are split
      kernel = projection.flatten_paths(enc.params)["params/block_0/attn/query/kernel"]
      assert kernel.sharding.spec == P("data", "model", None)
      assert kernel.addressable_shards[0].data.shape == (64, 1, 32)  # [128, 4, 32] over 2 x 4
      arrays = enc.arrays["block_0/attn/query/kernel"]
      assert arrays["p_in"].sharding.spec == P("data", None)  # the kernel's input axis (d_model)
      assert arrays["p_out"].sharding.spec == P("model", None, None)  # [H, Dh, d_out]: heads over model
    cp = api.encode(enc, corpus, batch_size=32)
    qp = api.encode(enc, queries, batch_size=32)
    # R from 96 rows in d = 1024 is rank-deficient: with the default damping (1e-3 x mean eig) the
    # sampled rows whiten to near-orthonormal and all their scores fall within ~6e-5 of each other, so
    # 1e-5 phi differences reorder ties (measured: 59% of top-5 ids differed). damping = 1 keeps R^{-1/2}
    # well conditioned (scores spread ~0.04, 5th/6th gap ~7e-4 >> the ~1e-6 mesh difference).
    # top_k_eig below the ranks of R_eval and R_train: lambda compares real eigenvalues, not rounding noise.
    h = api.fit_hessian(train_phi=cp, query_phi=qp, config=config.hessian, top_k_eig=16, damping=1.0)
    res = api.retrieve(corpus_phi=cp, corpus_ids=corpus.ids, query_phi=qp, hessian=h, k=5, matmul_dtype="float32")
    out[name] = (np.asarray(cp), np.asarray(qp), h, res)
  (c8, q8, h8, r8), (cs, qs, hs, rs) = out["data8"], out["sharded"]
  for got, ref in ((cs, c8), (qs, q8)):
    rel = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    assert rel.max() < 1e-5, rel.max()
  np.testing.assert_allclose(hs.inv_sqrt, h8.inv_sqrt, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rs.top_scores, r8.top_scores, rtol=1e-4, atol=1e-5)
  # Both top-5 lists are top-5s of one reference (a near-tie may come back in either order: CI saw
  # 1 of 160 ids swapped at rank 5), and their scores are the reference's.
  scores = np.asarray(hessian_lib.cosine_scores(q8, c8, hessian=h8))
  column = {int(i): j for j, i in enumerate(corpus.ids)}
  for res in (r8, rs):
    cols = np.vectorize(column.__getitem__)(res.top_ids)
    ranking_helpers.assert_is_top_k(cols, scores, atol=2e-5)
    np.testing.assert_allclose(res.top_scores, np.take_along_axis(scores, cols, axis=1), rtol=1e-4, atol=1e-5)


_TWO_PROCESS = """
import sys, numpy as np
from trackstar_jax import mesh as mesh_lib
mesh_lib.maybe_initialize_distributed()
import jax
sys.path.insert(0, "tests")
import conftest
from trackstar_jax.jobs import train
from trackstar_jax.jobs import workdir as workdir_lib
config = conftest.trained_config()
config.mesh, config.sharding.preset = (("data", 2), ("model", 4)), "fsdp_tp"
workdir, out, train_dir = sys.argv[1], sys.argv[2], sys.argv[3]
train.run(config, train_dir)  # the fixture's 4 steps, params and Adam state sharded over both processes
rd = workdir_lib.load_data(config, workdir)
enc, _ = workdir_lib.load_encoder(config, workdir, rd.tokenizer)
kernel = [l for p, l in jax.tree_util.tree_flatten_with_path(enc.params)[0] if "wi" in str(p)][0]
assert not kernel.is_fully_addressable and kernel.addressable_shards[0].data.shape == (64, 128), kernel.sharding
rows = np.arange(64).reshape(2, 32)[jax.process_index()]  # each process encodes its own rows
batch = {k: getattr(rd.corpus, k)[rows] for k in ("inputs", "targets", "loss_mask", "pad_mask", "ids")}
np.save(out, enc.encode_local(batch))
"""


@pytest.mark.integration  # ~60 s: two JAX processes training and encoding
def test_two_processes_times_four_devices_sharded_train_encode_retrieve_match_one_process(trained, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed, gloo), mesh (data 2 x model 4): the checkpoint after 4 steps,
  the phis and the top-k of (data 8) in one process."""
  import os
  import socket
  import subprocess
  import sys

  from trackstar_jax import api, checkpointing
  from trackstar_jax.jobs import workdir as workdir_lib

  train_dir = _sharded_workdir(trained, "sharded_train_2p")

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = []
  for i in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(
      PYTHONPATH=repo,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i),
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    cmd = [
      "timeout",
      "300",
      sys.executable,
      "-c",
      _TWO_PROCESS,
      trained.workdir,
      str(tmp_path / f"phi{i}.npy"),
      train_dir,
    ]
    procs.append(subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  logs = [p.communicate(timeout=330)[0].decode(errors="replace") for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  got = np.concatenate([np.load(tmp_path / f"phi{i}.npy") for i in range(2)])
  rd = workdir_lib.load_data(trained.config, trained.workdir)
  enc, _ = workdir_lib.load_encoder(trained.config, trained.workdir, rd.tokenizer)  # one process, data 8
  ref = np.asarray(
    enc.encode({k: getattr(rd.corpus, k)[:64] for k in ("inputs", "targets", "loss_mask", "pad_mask", "ids")})
  )
  rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
  assert rel.max() < 1e-5, rel.max()
  ckpt = checkpointing.restore(train_dir, step=4)
  _tree_close(ckpt.params, checkpointing.restore(trained.workdir).params, **PARAM_TOL)
  # Retrieval over those encodings (queries: the corpus rows' own phis; R well conditioned, as above).
  ids = rd.corpus.ids[:64]
  results = []
  for phi in (got, ref):
    h = api.fit_hessian(train_phi=phi, query_phi=phi[:32], config=trained.config.hessian, top_k_eig=16, damping=1.0)
    results.append(
      api.retrieve(corpus_phi=phi, corpus_ids=ids, query_phi=phi[32:], hessian=h, k=5, matmul_dtype="float32")
    )
  np.testing.assert_array_equal(results[0].top_ids, results[1].top_ids)
  np.testing.assert_allclose(results[0].top_scores, results[1].top_scores, rtol=1e-4, atol=1e-5)
