r"""Runs one launcher as N cooperating JAX processes on this host (multi-host, simulated on one machine).

  python -m launch.local_multiprocess --num_processes=2 --devices_per_process=4 -- \
      python -m launch.encode --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.local_multiprocess --num_processes=2 --platform=cuda --gpus=0,1,2,3 -- \
      python -m launch.train --config=configs/lama.py:model=small --workdir=/tmp/ts_lama

Every process gets JAX_COORDINATOR_ADDRESS (127.0.0.1:<a free port>), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `trackstar_jax.mesh.maybe_initialize_distributed` reads, plus its devices:
`--platform=cpu` sets JAX_PLATFORMS=cpu, `--xla_force_host_platform_device_count` and gloo CPU
collectives; `--platform=cuda` gives process i its own slice of `--gpus` in CUDA_VISIBLE_DEVICES.
Output lines are prefixed with `[pI]` (or written to `--process_logs/process_I.log`).

The first process to fail ends the run: the others are sent SIGTERM (SIGKILL after
`--grace_s`), and this launcher exits with the failed process's code (128 + signal for a
signal). Ctrl-C / SIGTERM to the launcher is passed on the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags, logging

NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "How many JAX processes to start.", lower_bound=1)
PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "cuda"], "cpu: fake CPU devices; cuda: GPUs of this host.")
DEVICES = flags.DEFINE_integer("devices_per_process", 4, "CPU devices per process (--platform=cpu).", lower_bound=1)
GPUS = flags.DEFINE_list("gpus", [], "--platform=cuda: GPU ids to split evenly over the processes (default: 0..N-1).")
PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
PROCESS_LOGS = flags.DEFINE_string(
  "process_logs", "", "Write process I's output to <process_logs>/process_I.log instead of stdout."
)
GRACE_S = flags.DEFINE_float("grace_s", 10.0, "Seconds between SIGTERM and SIGKILL when stopping the others.")

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(
  base: dict[str, str],
  *,
  process_id: int,
  num_processes: int,
  port: int,
  platform: str,
  devices_per_process: int = 1,
  gpus: Sequence[str] = (),
) -> dict[str, str]:
  """The environment of process `process_id`: coordinator, process index and its devices."""
  env = {k: v for k, v in base.items() if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  env.update(
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id)
  )
  if platform == "cpu":
    flags_ = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).split()
    env.update(
      JAX_PLATFORMS="cpu",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # cross-process CPU all-reduce
      XLA_FLAGS=" ".join(flags_ + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
    )
  else:
    gpus = list(gpus) or [str(i) for i in range(num_processes)]
    if len(gpus) % num_processes:
      raise ValueError(f"--gpus={','.join(gpus)}: {len(gpus)} GPUs do not split evenly over {num_processes} processes.")
    per = len(gpus) // num_processes
    env.pop("JAX_PLATFORMS", None)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[process_id * per : (process_id + 1) * per])
  return env


def _pump(stream, prefix: bytes, sink) -> None:
  for line in iter(stream.readline, b""):
    sink.write(prefix + line)
    sink.flush()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM every live process group, then SIGKILL what is left after `grace_s`."""
  live = [p for p in procs if p.poll() is None]
  for p in live:
    _signal_group(p, signal.SIGTERM)
  deadline = time.time() + grace_s
  for p in live:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      _signal_group(p, signal.SIGKILL)
      p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
  with contextlib.suppress(ProcessLookupError):
    os.killpg(p.pid, sig)  # each child leads its own process group (start_new_session)


def exit_code(returncode: int) -> int:
  """A Popen return code as a shell exit status (killed by signal s: 128 + s)."""
  return 128 - returncode if returncode < 0 else returncode


def run(
  command: Sequence[str],
  *,
  num_processes: int,
  platform: str = "cpu",
  devices_per_process: int = 1,
  gpus: Sequence[str] = (),
  port: int = 0,
  process_logs: str = "",
  grace_s: float = 10.0,
) -> int:
  """Starts `command` as `num_processes` JAX processes; returns 0 or the first failure's exit status."""
  if not command:
    raise ValueError("No command given: put it after `--`, e.g. `-- python -m launch.encode --config=...`.")
  port = port or free_port()
  procs, pumps, logs = [], [], []
  stop_requested = []

  def on_signal(signum, frame):
    del frame
    stop_requested.append(signum)

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(num_processes):
      env = process_env(
        dict(os.environ),
        process_id=i,
        num_processes=num_processes,
        port=port,
        platform=platform,
        devices_per_process=devices_per_process,
        gpus=gpus,
      )
      if process_logs:
        os.makedirs(process_logs, exist_ok=True)
        logs.append(open(os.path.join(process_logs, f"process_{i}.log"), "ab"))  # noqa: SIM115 (closed below)
        out = logs[-1]
      else:
        out = subprocess.PIPE
      p = subprocess.Popen(list(command), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(p)
      if not process_logs:
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ".encode(), sys.stdout.buffer), daemon=True)
        t.start()
        pumps.append(t)
    logging.info("started %d processes (coordinator 127.0.0.1:%d): %s", num_processes, port, " ".join(command))
    status = 0
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        status = exit_code(code)
        logging.error("process %d exited with status %d: stopping the other processes.", i, status)
        break
      if stop_requested:
        status = 128 + stop_requested[0]
        logging.error("got signal %d: stopping the processes.", stop_requested[0])
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.2)
    _stop(procs, grace_s)
    for t in pumps:
      t.join(timeout=5)
    return status
  finally:
    _stop(procs, 0.0)  # on an exception while starting: no orphans
    for f in logs:
      f.close()
    for s, h in old.items():
      signal.signal(s, h)


def main(argv):
  sys.exit(
    run(
      argv[1:],
      num_processes=NUM_PROCESSES.value,
      platform=PLATFORM.value,
      devices_per_process=DEVICES.value,
      gpus=GPUS.value,
      port=PORT.value,
      process_logs=PROCESS_LOGS.value,
      grace_s=GRACE_S.value,
    )
  )


if __name__ == "__main__":
  app.run(main)
