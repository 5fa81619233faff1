"""A local server for a test module (the GCS and S3 emulators): started, waited for, stopped.

  with local_server.running(cmd, name="moto_server", log_path=root / "x.log", ready=lambda: urlopen(url)) as proc:
    ...  # `ready()` returned without an OSError; the server is killed (its process group) on exit

`free_port()` is a port nobody listens on (also usable as a closed endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd: list[str], *, name: str, log_path, ready: Callable[[], object], timeout_s: float = 60) -> Iterator:
  """Runs `cmd` in its own process group, output to `log_path`, once `ready()` no longer raises OSError."""
  with open(log_path, "wb") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      deadline = time.monotonic() + timeout_s
      while True:
        try:
          ready()
          break
        except OSError:
          if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as f:
              pytest.fail(f"{name} did not start:\n{f.read()[-3000:]}")
          time.sleep(0.2)
      yield proc
    finally:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
