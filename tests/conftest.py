"""pytest setup: 8 fake CPU devices (set before jax is imported anywhere), and one shared trained workdir."""

import dataclasses
import fcntl
import os
import shutil
import sys

import pytest

# A late fake-device thread on loaded CI cores must not abort a collective (see test_encode_job.CPU_PATIENCE).
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")

# The training fields of the shared workdir (configs/synthetic.py:runlocal=True, 4 steps). Later stages'
# fields (encoder, hessian, store, retrieve, evaluate) are free: tests override them on a copy of the config.
TRAINED_STEPS = 4


def trained_config():
  """The config the shared workdir was trained with (a fresh, unlocked copy)."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config("runlocal=True")
  config.train.num_steps = TRAINED_STEPS
  config.train.eval_every = TRAINED_STEPS
  config.train.checkpoint_every = TRAINED_STEPS
  return config


@dataclasses.dataclass
class Trained:
  config: object  # a fresh copy of `trained_config()` per module
  workdir: str  # this module's own copy of the trained workdir (write into it freely)


@pytest.fixture(scope="session")
def _trained_master(tmp_path_factory):
  """Trains the shared workdir once per test run, also across pytest-xdist workers (a file lock)."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained_synthetic"
  root.mkdir(parents=True, exist_ok=True)
  with open(root / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / "DONE").exists():
      from trackstar_jax.jobs import train  # pylint: disable=g-import-not-at-top

      if (root / "w").exists():  # an interrupted earlier attempt
        shutil.rmtree(root / "w")
      train.run(trained_config(), str(root / "w"))
      (root / "DONE").write_text("ok")
  return root


@pytest.fixture(scope="module")
def trained(_trained_master, tmp_path_factory) -> Trained:
  """A module-private copy of the shared trained workdir (and its TFDS build beside it, in ../tfds)."""
  dst = tmp_path_factory.mktemp("trained")
  shutil.copytree(_trained_master / "w", dst / "w")
  shutil.copytree(_trained_master / "tfds", dst / "tfds")
  return Trained(config=trained_config(), workdir=str(dst / "w"))
