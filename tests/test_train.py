"""Training: the job (resume equivalence, config checks, launcher), its step and batches, query accuracy."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trackstar_jax import checkpointing, lm_eval, training
from trackstar_jax.data import batching, world
from trackstar_jax.jobs import train
from trackstar_jax.models import DecoderLM, TransformerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import synthetic  # noqa: E402


def _config(**train_overrides):
  c = synthetic.get_config("runlocal=True")
  c.world.n_entities = 20
  c.world.n_facts = 20
  c.world.max_frequency = 5
  c.world.n_distractors = 20
  c.tokenizer.vocab_size = 200
  c.model.d_model = 32
  c.model.n_heads = 2
  c.model.d_ff = 64
  c.model.n_layers = 1
  c.train.num_steps = 6
  c.train.warmup_steps = 2
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.eval_every = 4
  c.train.checkpoint_every = 3
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def _dataset(config):
  fd = world.generate_world(**world.world_params(config.world))
  return types.SimpleNamespace(
    corpus=fd.corpus, queries=fd.queries, name="synthetic_facts", fingerprint=fd.fingerprint()
  )


def _params(workdir):
  return checkpointing.restore_params(workdir)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_restart_resumes_to_identical_params(tmp_path, optimizer):
  config = _config(optimizer=optimizer)
  ds = _dataset(config)
  full = str(tmp_path / "full")
  out = train.run(config, full, dataset=ds)
  assert out["step"] == 6 and np.isfinite(out["loss"])
  # Interrupted after step 3 (checkpoint), then restarted with a larger num_steps target.
  part = str(tmp_path / "part")
  short = _config(optimizer=optimizer, num_steps=3)
  train.run(short, part, dataset=ds)
  assert checkpointing.latest_step(part) == 3
  out2 = train.run(config, part, dataset=ds)
  assert out2["step"] == 6
  a, b = _params(full), _params(part)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  # The step-3 checkpoint of the uninterrupted run (saved asynchronously while
  # training went on with donated buffers) equals the interrupted run's.
  for x, y in zip(
    jax.tree.leaves(checkpointing.restore_params(full, step=3)),
    jax.tree.leaves(checkpointing.restore_params(part, step=3)),
  ):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  moved = max(
    float(np.abs(np.asarray(x) - np.asarray(y)).max())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(checkpointing.restore_params(part, step=3)))
  )
  assert moved > 1e-4  # steps 4-6 really trained
  # Metrics log: training rows and eval rows, steps 2, 4, 6 (+ evals at 4 and the end).
  rows = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
  assert [r["step"] for r in rows if "query_accuracy" in r] == [4, 6]
  assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
  with open(os.path.join(full, "config.json")) as f:
    assert json.load(f)["train"]["optimizer"] == optimizer
  meta = checkpointing.load_meta(full)
  assert meta["dataset"]["fingerprint"] == ds.fingerprint and meta["tokenizer_path"].endswith("tokenizer.model")


def test_resume_with_incompatible_config_refuses(tmp_path):
  config = _config(num_steps=3)
  ds = _dataset(config)
  workdir = str(tmp_path / "w")
  train.run(config, workdir, dataset=ds)
  bad = _config(num_steps=6)
  bad.model.d_model = 64
  bad.train.optimizer = "adafactor"
  bad.world.seed = 1
  with pytest.raises(ValueError, match=r"(?s)model.d_model.*train.optimizer.*world.seed.*dataset fingerprint"):
    train.run(bad, workdir, dataset=_dataset(bad))
  ok = _config(num_steps=4, log_every=1, learning_rate=1e-3)  # free fields may change
  assert train.run(ok, workdir, dataset=ds)["step"] == 4


def test_train_batches_follow_step():
  ex = batching.Examples(
    inputs=np.arange(10, dtype=np.int32)[:, None].repeat(3, 1),
    targets=np.zeros((10, 3), np.int32),
    loss_mask=np.ones((10, 3), np.float32),
    pad_mask=np.ones((10, 3), bool),
    ids=np.arange(10, dtype=np.int64),
  )
  it = training.train_batches(ex, batch_size=4, seed=1, start_step=0)
  first = [next(it)["ids"] for _ in range(9)]  # 3 batches per epoch (last padded)
  for start in (0, 2, 3, 5):
    again = training.train_batches(ex, batch_size=4, seed=1, start_step=start)
    for want in first[start:]:
      np.testing.assert_array_equal(next(again)["ids"], want)
  epoch0 = np.concatenate(first[:3])
  assert sorted(epoch0[epoch0 >= 0]) == list(range(10)) and (epoch0 == -1).sum() == 2
  assert not np.array_equal(np.concatenate(first[3:6]), epoch0)  # reshuffled each epoch


def test_query_accuracy_against_brute_force():
  model = DecoderLM(TransformerConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=6))
  params = model.init(jax.random.key(0), jnp.ones((1, 6), jnp.int32))
  rng = np.random.default_rng(0)
  n, t = 11, 6
  inputs = rng.integers(1, 12, (n, t)).astype(np.int32)
  pad_mask = np.arange(t)[None] < rng.integers(3, t + 1, (n, 1))
  pred = np.asarray(jnp.argmax(jax.jit(model.apply)(params, jnp.asarray(inputs), jnp.asarray(pad_mask)), -1))
  loss_mask = np.zeros((n, t), np.float32)
  loss_mask[:, 1] = 1.0
  loss_mask[:, 2] = 1.0
  targets = pred.copy()
  wrong = np.array([1, 4, 7])
  targets[wrong, 2] = (pred[wrong, 2] + 1) % 12  # a wrong answer token
  targets[:, 0] = (pred[:, 0] + 1) % 12  # outside the loss mask: ignored
  ex = batching.Examples(
    inputs=inputs, targets=targets, loss_mask=loss_mask, pad_mask=pad_mask, ids=np.arange(n, dtype=np.int64)
  )
  freqs = np.array([1, 1, 2, 3, 5, 9, 10, 50, 2, 3, 1])
  res = lm_eval.query_accuracy(model.apply, params, ex, batch_size=4, frequencies=freqs)
  want = np.ones(n, bool)
  want[wrong] = False
  np.testing.assert_array_equal(res["correct"], want)
  assert res["accuracy"] == pytest.approx(8 / 11)
  assert res["count_by_frequency"] == {"1": 3, "2": 2, "3-9": 4, "10+": 2, ">=3": 6}
  assert res["by_frequency"]["1"] == pytest.approx(2 / 3)  # row 1 wrong
  assert res["by_frequency"]["3-9"] == pytest.approx(3 / 4)  # row 4 wrong
  assert res["by_frequency"]["10+"] == pytest.approx(1 / 2)  # row 7 wrong
  assert res["by_frequency"][">=3"] == pytest.approx(4 / 6)
  with pytest.raises(ValueError, match="frequencies"):
    lm_eval.query_accuracy(model.apply, params, ex, batch_size=4, frequencies=freqs[:3])


def test_greedy_decode_matches_argmax_chain():
  model = DecoderLM(TransformerConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8))
  params = model.init(jax.random.key(1), jnp.ones((1, 8), jnp.int32))
  prompt = [1, 5, 3]
  got = lm_eval.greedy_decode(model.apply, params, prompt, max_len=8, max_new_tokens=4)
  seq = list(prompt)
  for _ in range(4):  # brute force: unpadded forward of the growing sequence
    logits = jax.jit(model.apply)(params, jnp.asarray([seq], jnp.int32))
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert got == seq[3:]


def _launch(config_arg, workdir, timeout):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's `python -m launch.train` gets
  cmd = [sys.executable, "-m", "launch.train", f"--config={config_arg}", f"--workdir={workdir}"]
  return subprocess.run(["timeout", str(timeout)] + cmd, cwd=REPO, env=env, capture_output=True, text=True)


def _final_accuracy(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if "query_accuracy" in r][-1]


def test_launcher_runlocal(tmp_path):
  """`python -m launch.train` end to end (TFDS dataset, tokenizer, checkpoints); then a no-op restart."""
  workdir = str(tmp_path / "w")
  proc = _launch("configs/synthetic.py:runlocal=True", workdir, 240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpointing.latest_step(workdir) == 20
  assert "ETA" in proc.stderr and "tokens/s" in proc.stderr
  assert "orbax" not in proc.stderr.lower().replace("orbax-checkpoint", "")  # INFO spam filtered
  assert _final_accuracy(workdir)["step"] == 20
  again = _launch("configs/synthetic.py:runlocal=True", workdir, 240)  # already done: evaluates only
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already reaches num_steps" in again.stderr


@pytest.mark.slow
def test_synthetic_default_config_learns_facts(tmp_path):
  """The default synthetic config answers >= 90% of facts stated >= 3 times, in < 3 min on CPU."""
  import time  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "w")
  t0 = time.perf_counter()
  proc = _launch("configs/synthetic.py", workdir, 600)
  wall = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = _final_accuracy(workdir)
  print(f"wall {wall:.1f}s, final accuracy {final}")
  assert final["query_accuracy/freq_>=3"] >= 0.9, final
  assert wall < 180, f"training took {wall:.0f}s (> 3 min)"


def test_train_step_invariant_to_device_count():
  """Data-parallel over 8 devices == one device (global mean loss over masked tokens)."""
  from trackstar_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from trackstar_jax import optim  # pylint: disable=g-import-not-at-top

  config = _config()
  model = DecoderLM(TransformerConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8))
  tx = optim.make_optimizer(config.train)
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 9, (16, 1))
  batch = dict(
    inputs=rng.integers(1, 30, (16, 8)).astype(np.int32),
    targets=rng.integers(1, 30, (16, 8)).astype(np.int32),
    pad_mask=np.arange(8)[None] < lengths,
  )
  batch["loss_mask"] = batch["pad_mask"].astype(np.float32)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = mesh_lib.make_mesh(devices=devices)
    repl = mesh_lib.replicated(mesh)
    params = training.init_params(model, seq_len=8, seed=0, sharding=repl)
    opt_state = jax.jit(tx.init, out_shardings=repl)(params)
    step = training.make_train_step(model.apply, tx, mesh)
    for _ in range(2):
      params, opt_state, metrics = step(params, opt_state, mesh_lib.shard_batch(batch, mesh))
    results.append((jax.device_get(params), float(metrics["loss"])))
  (p1, l1), (p8, l8) = results
  assert l1 == pytest.approx(l8, rel=1e-5)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_progress_rates_and_eta():
  from trackstar_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top

  now = [0.0]
  p = progress_lib.Progress(total=100, start=20, name="train", clock=lambda: now[0])
  now[0] = 5.0
  p.update(21, items=999)  # first (compiling) step
  p.mark()
  now[0] = 15.0
  p.update(41, items=2000)
  steps_s, items_s = p.rates()
  assert steps_s == pytest.approx(2.0) and items_s == pytest.approx(200.0)
  assert p.eta() == pytest.approx(59 / 2.0)
  line = p.line()
  assert "41/100" in line and "ETA 29.5s" in line and "200 tokens/s" in line
  assert progress_lib.format_seconds(3725) == "1h02m05s" and progress_lib.format_seconds(65) == "1m05s"
  assert progress_lib.format_seconds(float("inf")) == "?"
  assert p.due(every_s=10.0) and not p.due(every_s=10.0)
