"""launch/compile_check.py: TPU topologies by name, the fits table, and a tiny ahead-of-time compile.

The compile test runs `launch.compile_check` in a subprocess (libtpu loads its TPU compiler into the
process) for a v5e-4 slice (v5e:2x2, 4 chips) with the tiny synthetic config and an FSDP mesh; it is
skipped, saying so, when libtpu is not installed (`pip install -e ".[tpu-aot]"`).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from trackstar_jax.jobs import compile_check as cc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_libtpu() -> bool:
  return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def test_topology_names():
  t = cc.parse_topology("v5p-256")
  assert (t.libtpu_name, t.chips, t.chip_config, t.hbm_bytes) == ("v5:4x4x8", 128, "megacore", 95 * 2**30)
  assert cc.parse_topology("v5p-512").chips == 256
  assert (cc.parse_topology("v5e-256").libtpu_name, cc.parse_topology("v5e-256").chips) == ("v5e:16x16", 256)
  assert cc.parse_topology("v4-8").libtpu_name == "v4:2x2x1"
  assert cc.parse_topology("v6e-4").hbm_bytes == 32 * 2**30
  with pytest.raises(ValueError, match="v5p-7.*not a slice shape.*known: v5p-8"):
    cc.parse_topology("v5p-7")
  with pytest.raises(ValueError, match="expected <v4|v5p|v5e|v6e>-<count>"):
    cc.parse_topology("tpu-v9")


def test_out_of_memory_messages_give_the_size():
  assert cc._oom_bytes("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 120.53G of 95.74G hbm.") == int(
    120.53 * 2**30
  )
  # libtpu 0.0.42's message for jnp.outer of 100k floats on one v5e chip:
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (37.29G) "
    "exceeds available HBM (15.75G)."
  )
  assert cc._is_oom(RuntimeError(msg)) and cc._oom_bytes(msg) == int(37.29 * 2**30)
  assert cc._oom_note(msg) == "compiler: out of memory (HLO temporaries need 37.3 GiB, HBM has 15.8 GiB)"
  assert cc._oom_note("RESOURCE_EXHAUSTED: Ran out of memory") == "compiler: out of memory (XLA gave no size)"
  assert cc._is_oom(RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory"))
  assert not cc._is_oom(RuntimeError("INVALID_ARGUMENT: bad sharding"))


def test_batch_search_stops_at_the_first_size_that_does_not_fit():
  topo = cc.parse_topology("v5e-4")  # 16 GiB
  sizes = {4: 1, 8: 2, 16: 8, 32: 17, 64: 40}  # GiB per device at each global batch

  class Compiled:
    def __init__(self, gib):
      self.gib = gib

    def memory_analysis(self):
      b = int(self.gib * 2**30)
      return type(
        "M", (), dict(argument_size_in_bytes=b, output_size_in_bytes=0, temp_size_in_bytes=0, alias_size_in_bytes=0)
      )

  row = cc.check_step(
    lambda b: Compiled(sizes[b]), topology=topo, step="train", batch=32, unit=4, search=True, max_rows=64
  )
  assert (row.fits, row.per_device_gib, row.largest_batch, row.largest_gib) == (False, 17.0, 16, 8.0)
  assert "**no**" in cc.format_table([row]) and "| 16 (8.000) |" in cc.format_table([row])

  def oom(b):
    if b > 8:
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 30.1G of 15.75G hbm.")
    return Compiled(sizes[b])

  row = cc.check_step(oom, topology=topo, step="train", batch=16, unit=4, search=True, max_rows=64)
  assert (row.fits, row.largest_batch, row.per_device_gib) == (False, 8, 30.1)
  assert "compiler: out of memory (30.1 GiB)" in row.note

  # Another refusal of the compiler (v5e-256's, for the per-host retrieval program) is the row's note;
  # a Python error of tracing (a bug of this project) is not swallowed.
  def refused(b):
    raise jax.errors.JaxRuntimeError(
      "INTERNAL: RET_CHECK failure (deepsea_compiler_base.cc:1879) device_count == ... On platforms with "
      "limited ICI routing device assignment should include all slice devices"
    )

  row = cc.check_step(refused, topology=topo, step="retrieve", batch=16, unit=4, search=True, max_rows=64)
  assert not row.fits and row.per_device_gib is None and row.largest_batch is None
  assert row.note.startswith("compile error: INTERNAL: RET_CHECK") and "all slice devices" in row.note
  with pytest.raises(TypeError):
    cc.check_step(lambda b: None + 1, topology=topo, step="train", batch=16, unit=4, search=False, max_rows=64)
  unsearched = cc.check_step(oom, topology=topo, step="train", batch=16, unit=4, search=False, max_rows=64)
  assert not unsearched.searched and "| not searched |" in cc.format_table([unsearched])


def _compile_check(
  tmp_path, *flags, topology="v5e-4", mesh="(('data',2),('model',2))", returncode: int = 0
) -> tuple[str, list[dict]]:
  """Runs launch.compile_check on the tiny synthetic config for a v5e slice; (stdout, table rows).

  Its exit status is 0 when every step fits, 1 when one does not.
  """
  out = tmp_path / "table.jsonl"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  env.update(PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])), JAX_PLATFORMS="cpu")
  cmd = [
    sys.executable,
    "-m",
    "launch.compile_check",
    f"--config={os.path.join(REPO, 'configs', 'synthetic.py')}:runlocal=True",
    f"--config.mesh={mesh}",
    "--config.sharding.preset=fsdp_tp",
    "--config.encoder.batch_size=8",
    f"--topology={topology}",
    "--queries=16",
    "--nosearch",
    f"--output={out}",
    *flags,
  ]
  proc = subprocess.run(["timeout", "540", *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=570)
  assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout + proc.stderr, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.skipif(not _has_libtpu(), reason='libtpu is not installed: pip install -e ".[tpu-aot]"')
@pytest.mark.parametrize(
  "steps",
  [
    ("train", "encode_adam"),  # default run: ~1 min on 2 busy cores
    ("retrieve",),  # the scan's two programs (norms, fused step) against StreamingTopK's current signatures
    pytest.param(("train", "encode_fused", "encode_adam", "hessian", "retrieve"), marks=pytest.mark.slow),
  ],
)
def test_tiny_config_compiles_for_a_v5e_slice(tmp_path, steps):
  stdout, rows = _compile_check(tmp_path, "--config.retrieve.chunk_rows=64", f"--steps={','.join(steps)}")
  assert tuple(r["step"] for r in rows) == steps
  for r in rows:
    assert r["topology"] == "v5e-4" and r["chips"] == 4 and r["hbm_gib"] == 16
    assert r["fits"] and 0 < r["per_device_gib"] < 1, r
  assert f"| v5e-4 | 4 | {steps[-1]} |" in stdout


@pytest.mark.skipif(not _has_libtpu(), reason='libtpu is not installed: pip install -e ".[tpu-aot]"')
def test_a_step_that_does_not_fit_says_so_with_the_numbers(tmp_path):
  """A 2^25-row retrieval chunk (~17 GiB of bf16 rows per chip) on 16 GiB v5e chips: the compiler refuses it.

  On v5e-16 (a 4 x 4 torus) with model 2, which no product of torus axes gives: the mesh splits an axis.
  """
  stdout, rows = _compile_check(
    tmp_path,
    f"--config.retrieve.chunk_rows={2**25}",
    "--steps=retrieve",
    topology="v5e-16",
    mesh="(('data',-1),('model',2))",
    returncode=1,
  )
  assert "splitting physical axes" in stdout
  (row,) = rows
  assert row["chips"] == 16 and not row["fits"] and row["per_device_gib"] > row["hbm_gib"], row
  assert re.search(r"out of memory \(HLO temporaries need [\d.]+ GiB, HBM has 15\.\d GiB\)", row["note"]), row
  assert "**no**" in stdout
