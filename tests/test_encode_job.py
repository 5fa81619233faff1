"""The encode / retrieve launchers as real subprocesses: SIGKILL-resume and 2-process runs.

The shared tiny training run (conftest `trained`: configs/synthetic.py:runlocal=True,
4 steps) is copied for the module; the reference is an uninterrupted one-process `launch.encode`
(4 fake CPU devices) plus `launch.fit_hessian`. Every process runs under
`timeout` in its own process group (killed by that group's id).

  * `launch.encode` SIGKILLed at several points (right after start, and after
    k committed chunk markers) and restarted, then run to the end, leaves a
    store bitwise equal to the uninterrupted one.
  * `launch.encode` and `launch.retrieve` with 2 processes x 2 devices
    (jax.distributed on localhost, gloo) give the same store (ids exactly, phi to
    float32 rounding) and results as one process x 4 devices (the same per-device batch).
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib
from trackstar_jax.jobs import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic.py") + ":runlocal=True"
# 354 corpus rows in chunks of 8 (45 chunks); 4-row encoder batches, 2 per chunk.
OVERRIDES = dict(
  train__num_steps=4,
  train__eval_every=4,
  train__checkpoint_every=4,
  store__chunk_rows=8,
  store__dtype="float32",
  encoder__batch_size=4,
  hessian__train_sample=48,
  retrieve__k=4,
  retrieve__chunk_rows=100,
  retrieve__matmul_dtype="float32",
)
TIMEOUT_S = 120


def _flags(**extra) -> list[str]:
  items = {**OVERRIDES, **extra}
  return [f"--config={CONFIG}"] + [f"--config.{k.replace('__', '.')}={v}" for k, v in items.items()]


# XLA:CPU aborts a collective whose devices do not all arrive in time; on 2 loaded cores (CI runs 2 test
# workers, each with several processes of several fake devices) a device thread can be late (seen once: a
# Fatal "AwaitAndLogIfStuck" abort in fit_hessian's all-reduce). Wait longer rather than abort.
CPU_PATIENCE = "--xla_cpu_collective_call_terminate_timeout_seconds=600"


def _env(*, devices: int, process_id: int | None = None, port: int | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  env.update(
    PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CPU_PATIENCE}"
  )
  if process_id is not None:
    env.update(
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(process_id),
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
  return env


def _start(job: str, workdir: str, log: str, *, env: dict[str, str], **extra) -> subprocess.Popen:
  """`timeout python -m launch.<job>` in a new process group (exec'd: nothing inherited from this process)."""
  with open(log, "ab") as f:
    return subprocess.Popen(
      ["timeout", str(TIMEOUT_S), sys.executable, "-m", f"launch.{job}", f"--workdir={workdir}", *_flags(**extra)],
      cwd=REPO,
      env=env,
      stdout=f,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> None:
  with contextlib.suppress(ProcessLookupError):
    os.killpg(proc.pid, signal.SIGKILL)  # timeout and its python child: our own process group
  proc.wait()


def _tail(log: str) -> str:
  with open(log, errors="replace") as f:
    return f.read()[-4000:]


def _finish(procs: list[subprocess.Popen], logs: list[str]) -> None:
  """Waits for all; on any failure kills the rest and reports the logs."""
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S + 30)
  finally:
    for p in procs:
      if p.poll() is None:
        _kill(p)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, f"exit {p.returncode}:\n{_tail(log)}"


def _run(job: str, workdir: str, log: str, *, devices: int = 4, **extra) -> None:
  _finish([_start(job, workdir, log, env=_env(devices=devices), **extra)], [log])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _read_store(url: str) -> store_lib.Chunk:
  store = store_lib.open_store(url)
  store.require_complete()
  return store.read(0, store.num_rows)


@pytest.fixture(scope="module")
def encoded(trained):
  """(workdir, corpus ids, reference store url): encoded + Hessian by one uninterrupted process each."""
  workdir = trained.workdir
  root = os.path.dirname(workdir)
  corpus = workdir_lib.load_data(trained.config, workdir).corpus
  ref_url = os.path.join(root, "ref.zarr")
  logs = [os.path.join(root, "ref_encode.log"), os.path.join(root, "fit_hessian.log")]
  _finish(
    [
      _start("encode", workdir, logs[0], env=_env(devices=4), store__url=ref_url),
      _start("fit_hessian", workdir, logs[1], env=_env(devices=4)),
    ],
    logs,
  )  # <workdir>/hessian.npz
  ref = _read_store(ref_url)
  assert np.all(np.any(ref.phi != 0, axis=1)), "reference has all-zero (unwritten) rows"
  return workdir, np.asarray(corpus.ids), ref_url


def test_encode_survives_sigkill(encoded, tmp_path):
  workdir, corpus_ids, ref_url = encoded
  url, log = str(tmp_path / "killed.zarr"), str(tmp_path / "encode.log")
  ref = _read_store(ref_url)
  n_chunks = -(-len(corpus_ids) // OVERRIDES["store__chunk_rows"])
  assert n_chunks == 45
  # Kill points: the store directory appearing (startup / store creation), then twice after >= 3 more committed
  # chunks than the last kill left (relative: the pipelined job commits chunks in bursts between two polls).
  done_before = 0
  for more in (None, 3, 3):
    target = None if more is None else min(done_before + more, n_chunks - 1)
    proc = _start("encode", workdir, log, env=_env(devices=4), store__url=url)
    deadline = time.monotonic() + TIMEOUT_S
    try:
      while proc.poll() is None and time.monotonic() < deadline:
        if target is None and os.path.exists(url):
          break
        if (
          target is not None
          and os.path.exists(os.path.join(url, "meta.json"))
          and len(store_lib.open_store(url).completed_chunks()) >= target
        ):
          break
        time.sleep(0.01)
      assert proc.poll() is None, f"encode ended before the kill at {target} chunks:\n{_tail(log)}"
    finally:
      _kill(proc)
    if target is not None:
      done = store_lib.open_store(url).completed_chunks()
      assert done_before < target <= len(done) < n_chunks, (target, sorted(done))  # progress, and not finished
      done_before = len(done)
  _run("encode", workdir, log, store__url=url)
  got = _read_store(url)
  assert got.ids.dtype == ref.ids.dtype and got.phi.dtype == ref.phi.dtype == np.float32
  np.testing.assert_array_equal(got.ids, corpus_ids)
  np.testing.assert_array_equal(got.ids, ref.ids)
  assert np.array_equal(got.phi.view(np.uint32), ref.phi.view(np.uint32)), "phi not bitwise equal"
  with open(log) as f:  # each restart resumed: the last one had only the chunks the kills left
    assert f"this process: {n_chunks - done_before} pending of {n_chunks}" in f.read()


def test_two_process_encode_and_retrieve_match_one_process(encoded, tmp_path):
  workdir, corpus_ids, ref_url = encoded
  url = str(tmp_path / "two.zarr")
  for job, extra in (
    ("encode", dict(store__url=url)),
    ("retrieve", dict(store__url=url, retrieve__output=str(tmp_path / "two.jsonl"))),
  ):
    port = _free_port()
    logs = [str(tmp_path / f"{job}_{i}.log") for i in range(2)]
    procs = [_start(job, workdir, logs[i], env=_env(devices=2, process_id=i, port=port), **extra) for i in range(2)]
    _finish(procs, logs)
    with open(logs[1]) as f:
      assert "process 1/2, local devices 2, global devices 4" in f.read()
  got, ref = _read_store(url), _read_store(ref_url)
  np.testing.assert_array_equal(got.ids, corpus_ids)
  np.testing.assert_array_equal(got.ids, ref.ids)
  # Bitwise on the hosts CI ran on until 2026-12-02. On a 2-core AMD EPYC host the MLP blocks (exact Adam,
  # per layer) differ by a few float32 ulps between 1 and 2 processes, although the encode step's optimized
  # HLO (--xla_dump_to), the parameters, projections and corrections (gathered and compared) are the same;
  # turning off XNNPACK, oneDNN, YNN fusions or Eigen's threads changed nothing. A wrong row, slice or padding
  # would differ by far more than float32 rounding.
  np.testing.assert_allclose(got.phi, ref.phi, rtol=1e-5, atol=1e-6 * float(np.abs(ref.phi).max()))

  one_path = str(tmp_path / "one.jsonl")
  _run("retrieve", workdir, str(tmp_path / "retrieve_one.log"), store__url=ref_url, retrieve__output=one_path)
  one, two = results_lib.read_results(one_path), results_lib.read_results(str(tmp_path / "two.jsonl"))
  assert len(one) == len(two) == 60
  for a, b in zip(one, two):
    assert a["example_id"] == b["example_id"]
    assert a["proponent_ids"] == b["proponent_ids"] and len(a["proponent_ids"]) == 4
    assert a["opponent_ids"] == b["opponent_ids"]
    np.testing.assert_allclose(b["proponent_scores"], a["proponent_scores"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(b["opponent_scores"], a["opponent_scores"], rtol=0, atol=1e-5)
