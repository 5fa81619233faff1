"""Every experiment config loads, and runs in its `runlocal` variant."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from trackstar_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
LAMA_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "lama_trex")


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_variants_load(path):
  module = _load(path)
  assert "python -m launch." in module.__doc__  # the launch command is in the docstring
  for arg in (None, "runlocal=True"):
    c = module.get_config(arg)
    assert c.model.preset in configs.MODEL_PRESETS
    assert c.model.max_len == c.seq_len
    assert isinstance(c.mesh, tuple)
    assert c.encoder.d_in * c.encoder.d_out <= 2**16
  with pytest.raises(ValueError, match="Unknown config argument"):
    module.get_config("nonsense=1")


def test_runlocal_overrides_shrink_the_job():
  full, local = _load(CONFIG_FILES[0]).get_config(), _load(CONFIG_FILES[0]).get_config("runlocal=True")
  assert local.train.num_steps < full.train.num_steps


@pytest.mark.skipif(not os.path.isdir(LAMA_DIR), reason="../shared/data/lama_trex not present")
def test_lama_runlocal_trains(tmp_path):
  """configs/lama.py:runlocal=True on one relation: the real builder, tokenizer and training loop."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TFDS_DATA_DIR=str(tmp_path / "tfds"))
  cmd = [
    "timeout",
    "600",
    sys.executable,
    "-m",
    "launch.train",
    "--config=configs/lama.py:runlocal=True",
    f"--config.manual_dir={LAMA_DIR}",
    "--config.lama_relations=('P20',)",
    "--config.train.num_steps=4",
    "--config.train.eval_every=4",
    "--config.tokenizer.vocab_size=512",
    f"--workdir={tmp_path / 'w'}",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "query accuracy" in proc.stderr and os.path.isdir(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("value", ["Ture", "on", "y", "2", "", "off"])
def test_config_argument_booleans_are_strict(value):
  with pytest.raises(ValueError, match=f"runlocal={value!r} is not a boolean: use one of true/false/1/0/yes/no"):
    configs.parse_arg(f"runlocal={value}", runlocal=False)
  with pytest.raises(ValueError, match="not a boolean"):
    _load(CONFIG_FILES[0]).get_config(f"runlocal={value}")


def test_config_argument_booleans_accepted_and_hinted():
  for value, expect in [
    ("True", True),
    ("TRUE", True),
    ("1", True),
    ("yes", True),
    ("Yes", True),
    ("false", False),
    ("False", False),
    ("0", False),
    ("no", False),
    ("NO", False),
  ]:
    assert configs.parse_arg(f"runlocal={value}", runlocal=not expect).runlocal is expect, value
  with pytest.raises(ValueError, match="Did you mean 'true'"):
    configs.parse_arg("runlocal=Ture", runlocal=False)
  with pytest.raises(ValueError, match="did you mean 'runlocal'"):
    configs.parse_arg("runlocl=1", runlocal=False)
  with pytest.raises(ValueError, match="is not a int"):
    configs.parse_arg("n=ten", n=3)


@pytest.mark.parametrize(
  "arg, hint",
  [
    ("--config.retrieve.kk=5", "section 'retrieve' has no field 'kk'. Did you mean --config.retrieve.k?"),
    ("--config.retrive.k=5", "no section or field 'retrive'. Did you mean --config.retrieve.k?"),
    ("--config.seqlen=4", "Did you mean --config.seq_len?"),
    ("--config.seq_len.x=3", "'seq_len' is a field (int), not a section"),
    ("--noconfig.retrieve.normalise", "Did you mean --config.retrieve.normalize?"),
  ],
)
def test_check_overrides_refuses_unknown_paths(arg, hint):
  argv = ["launch/retrieve.py", "--config=configs/synthetic.py:runlocal=True", arg, "--workdir=/tmp/w"]
  with pytest.raises(ValueError, match="Unknown config override") as e:
    configs.check_overrides(argv=argv)  # the config is loaded from argv's --config
  assert hint in str(e.value) and arg in str(e.value)
  with pytest.raises(ValueError, match="Unknown config override"):  # an explicit config, the default file
    configs.check_overrides(argv=["x", arg], config=_load(CONFIG_FILES[0]).get_config())
  with pytest.raises(ValueError, match="Unknown config override"):
    configs.check_overrides(argv=["x", arg], default_file=CONFIG_FILES[0])


def test_check_overrides_accepts_known_paths_and_checks_config_args():
  good = [
    "x",
    "--config",
    "configs/synthetic.py",
    "--config.retrieve.k=5",
    "--config.model.d_model",
    "64",
    "--noconfig.retrieve.normalize",
    "--config.lama_relations=('P20',)",
    "--config.train=None",
    "--workdir=/w",
  ]
  configs.check_overrides(argv=good)
  configs.check_overrides(argv=["x", "--workdir=/w"])  # no overrides: nothing to load
  with pytest.raises(ValueError, match="not a boolean"):
    configs.check_overrides(argv=["x", "--config=configs/synthetic.py:runlocal=Ture", "--config.seq_len=3"])
