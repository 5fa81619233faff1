"""Bounded waits on remote storage: gs:// without credentials or network fails in bounded time, with a clear message.

Network rule: the gcs driver and its credentials lookup are pointed at 127.0.0.1 only
(TENSORSTORE_GCS_HTTP_URL, GCE_METADATA_ROOT), at a port that is closed or that
accepts connections and never answers.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from trackstar_jax import remote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent(
  """
    import socket, sys, time
    mode = sys.argv[1]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    if mode == "silent":
      s.listen(64)  # connections are accepted by the kernel and never answered
    else:
      s.close()  # connection refused
    import os
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{port}"
    from trackstar_jax import results, store
    ops = {
        "open_store": lambda: store.open_store("gs://no-such-bucket/enc.zarr"),
        "write_results": lambda: results.write_results("gs://no-such-bucket/r.jsonl", []),
        "read_results": lambda: results.read_results("gs://no-such-bucket/r.jsonl"),
    }
    for name, op in ops.items():
      t = time.time()
      try:
        op()
        print(name, "NO ERROR", flush=True)
      except Exception as e:  # report the type and message
        print(name, f"{time.time() - t:.1f}", type(e).__name__, str(e).replace(chr(10), " "), flush=True)
    """
)


@pytest.mark.parametrize("mode", ["silent", "closed"])
def test_gcs_without_credentials_or_network_fails_in_bounded_time(tmp_path, mode):
  script = tmp_path / "probe.py"
  script.write_text(_SCRIPT)
  env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("GOOGLE_")}
  env.update(
    PYTHONPATH=REPO,
    HOME=str(tmp_path),
    CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
    TRACKSTAR_REMOTE_TIMEOUT_S="3",
    GCE_METADATA_ROOT="127.0.0.1:9",
    GCE_METADATA_HOST="127.0.0.1:9",
    NO_PROXY="*",
    no_proxy="*",
    JAX_PLATFORMS="cpu",
  )
  t = time.time()
  try:
    r = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=90)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"gs:// operations still waiting after {time.time() - t:.0f} s: {e.stdout!r}")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = {line.split(" ", 1)[0]: line for line in r.stdout.splitlines()}
  assert set(lines) == {"open_store", "write_results", "read_results"}, r.stdout
  for name, line in lines.items():
    _, seconds, error, msg = line.split(" ", 3)
    assert float(seconds) < 20, line  # bound 3 s (+ transfer time); never the TensorStore default of forever
    assert error == "RemoteTimeoutError", line
    url = "gs://no-such-bucket/enc.zarr" if name == "open_store" else "gs://no-such-bucket/r.jsonl"
    assert url in msg and "credentials" in msg and "network" in msg and "bucket" in msg, line
    assert "TRACKSTAR_REMOTE_TIMEOUT_S" in msg, line
  assert time.time() - t < 60


def test_local_urls_are_never_bounded_and_remote_ones_are():
  assert remote.is_remote("gs://b/x") and remote.is_remote("s3://b/x")
  assert not any(map(remote.is_remote, ["/tmp/x", "file:///tmp/x", "memory://x", "rel/path"]))
  assert remote.timeout_s(2_000_000) == remote.TIMEOUT_S + 2.0


class _NeverDone:
  cancelled = False

  def result(self, timeout=None):
    assert timeout is not None, "a remote wait must be bounded"
    time.sleep(min(timeout, 0.05))
    raise TimeoutError

  def cancel(self):
    self.cancelled = True


def test_wait_cancels_and_names_url(monkeypatch):
  monkeypatch.setattr(remote, "TIMEOUT_S", 0.01)
  f = _NeverDone()
  with pytest.raises(remote.RemoteTimeoutError, match=r"Reading gs://bkt/a did not finish within 0 s.*credentials"):
    remote.wait(f, url="gs://bkt/a", what="Reading")
  assert f.cancelled
