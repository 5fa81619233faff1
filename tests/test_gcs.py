"""The pipeline on gs:// against a local GCS emulator: encode (SIGKILLed, resumed), fit_hessian, retrieve, evaluate.

The emulator (`tests/gcs_emulator.py`, over `gcp-storage-emulator` from PyPI) runs
on 127.0.0.1 for the module; the jobs reach it through STORAGE_EMULATOR_HOST
(translated by `trackstar_jax.remote` to TensorStore's TENSORSTORE_GCS_HTTP_URL),
with no credentials: HOME and CLOUDSDK_CONFIG are empty folders, the GCE metadata
server is a closed local port. Nothing leaves the machine.

  * `launch.encode` into gs://, SIGKILLed once some chunks are committed, then run
    again: the store on gs:// is bitwise equal to an uninterrupted local one, and the
    restart encoded only the chunks the kill left.
  * `launch.fit_hessian`, `launch.retrieve` and `launch.evaluate` read and write
    their inputs and outputs on gs:// (Hessian, results + metadata, tables, job
    configs), and nothing is written to a local path named like the URL.
"""

import os
import subprocess
import sys
import time
import urllib.request

import local_server
import numpy as np
import pytest
import test_encode_job as jobs  # the launcher helpers (flags, process groups, kill, logs)

from trackstar_jax import fileio
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "trackstar-test"
# test_encode_job's small settings, with 8 x 8 projection blocks (dim 256: quick Hessian eigendecompositions).
OVERRIDES = dict(jobs.OVERRIDES, encoder__d_in=8, encoder__d_out=8)
TIMEOUT_S = 300  # per job; the machine may be shared


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """{environment for the jobs}: the emulator serving BUCKET; this process reaches it too."""
  try:
    import gcp_storage_emulator  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator, in the [test] extra)")
  root = tmp_path_factory.mktemp("gcs")
  port = local_server.free_port()
  endpoint = f"http://127.0.0.1:{port}"
  emulator = [
    "timeout",
    "900",
    sys.executable,
    os.path.join(REPO, "tests", "gcs_emulator.py"),
    f"--port={port}",
    "--bucket",
    BUCKET,
  ]
  isolated = dict(
    HOME=str(root / "home"),
    CLOUDSDK_CONFIG=str(root / "gcloud"),
    GCE_METADATA_ROOT=f"127.0.0.1:{local_server.free_port()}",  # closed: no metadata-server credentials
    GCE_METADATA_HOST=f"127.0.0.1:{local_server.free_port()}",
    NO_PROXY="*",
    no_proxy="*",
    TRACKSTAR_REMOTE_TIMEOUT_S="30",
  )
  env = {
    k: v for k, v in jobs._env(devices=4).items() if not k.lower().endswith("_proxy") and not k.startswith("GOOGLE_")
  }
  env.update(isolated, STORAGE_EMULATOR_HOST=f"127.0.0.1:{port}")  # the jobs take the client libraries' variable
  env.pop("TENSORSTORE_GCS_HTTP_URL", None)

  def ready():
    urllib.request.urlopen(endpoint + "/", timeout=2).read()

  with (
    local_server.running(emulator, name="the GCS emulator", log_path=root / "emulator.log", ready=ready),
    pytest.MonkeyPatch.context() as mp,
  ):
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)
    mp.setenv("GCE_METADATA_ROOT", isolated["GCE_METADATA_ROOT"])
    mp.setenv("GCE_METADATA_HOST", isolated["GCE_METADATA_HOST"])
    yield env


def _start(job: str, workdir: str, log: str, env: dict[str, str], *flags: str, **overrides) -> subprocess.Popen:
  """`timeout python -m launch.<job>` with plain `flags` and config `overrides`, in its own process group."""
  config = [f"--config={jobs.CONFIG}"] + [
    f"--config.{k.replace('__', '.')}={v}" for k, v in {**OVERRIDES, **overrides}.items()
  ]
  with open(log, "ab") as f:
    return subprocess.Popen(
      ["timeout", str(TIMEOUT_S), sys.executable, "-m", f"launch.{job}", f"--workdir={workdir}", *config, *flags],
      cwd=REPO,
      env=env,
      stdout=f,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )


def _run(job: str, workdir: str, log: str, env: dict[str, str], *flags: str, **overrides) -> None:
  jobs._finish([_start(job, workdir, log, env, *flags, **overrides)], [log])


@pytest.mark.integration
def test_pipeline_on_gcs_survives_sigkill(trained, gcs, tmp_path):
  workdir, env = trained.workdir, gcs
  url, ref_url = f"gs://{BUCKET}/run/encodings.zarr", str(tmp_path / "ref.zarr")
  log, ref_log = str(tmp_path / "encode.log"), str(tmp_path / "ref.log")
  n_chunks, target = 45, 5

  ref = _start("encode", workdir, ref_log, jobs._env(devices=4), store__url=ref_url)  # local, meanwhile
  proc = _start("encode", workdir, log, env, store__url=url)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while proc.poll() is None and time.monotonic() < deadline:
      if fileio.exists(f"{url}/meta.json") and len(store_lib.open_store(url).completed_chunks()) >= target:
        break
      time.sleep(0.05)
    assert proc.poll() is None, f"encode ended before the kill at {target} chunks:\n{jobs._tail(log)}"
  finally:
    jobs._kill(proc)
  done = store_lib.open_store(url).completed_chunks()
  assert target <= len(done) < n_chunks, sorted(done)
  jobs._finish([_start("encode", workdir, log, env, store__url=url), ref], [log, ref_log])  # resume
  with open(log) as f:
    assert f"this process: {n_chunks - len(done)} pending of {n_chunks}" in f.read()  # resumed, not redone
  got, want = jobs._read_store(url), jobs._read_store(ref_url)
  corpus_ids = want.ids
  np.testing.assert_array_equal(got.ids, corpus_ids)
  assert got.phi.dtype == want.phi.dtype == np.float32
  assert np.array_equal(got.phi.view(np.uint32), want.phi.view(np.uint32)), "phi on gs:// not bitwise equal"

  out = f"gs://{BUCKET}/run"
  gs = dict(store__url=url, hessian__path=f"{out}/hessian.npz", retrieve__output=f"{out}/results.jsonl")
  _run("fit_hessian", workdir, str(tmp_path / "fit_hessian.log"), env, **gs)
  _run("retrieve", workdir, str(tmp_path / "retrieve.log"), env, **gs)
  _run(
    "evaluate",
    workdir,
    str(tmp_path / "evaluate.log"),
    env,
    f"--results=trackstar={out}/results.jsonl",
    f"--output={out}/evaluation",
    "--notail_patch",
    **gs,
  )

  h = hessian_lib.Hessian.load(f"{out}/hessian.npz")
  assert h.meta["n_train"] == OVERRIDES["hessian__train_sample"] and np.all(np.isfinite(h.inv_sqrt))
  records, meta = results_lib.load_results(f"{out}/results.jsonl")
  assert len(records) == 60 and all(len(r["proponent_ids"]) == OVERRIDES["retrieve__k"] for r in records)
  assert {int(i) for r in records for i in r["proponent_ids"]} <= set(corpus_ids.tolist())
  assert meta["store"] == url
  table = fileio.read_json(f"{out}/evaluation.json")
  assert [r["method"] for r in table["rows"]] == ["trackstar"] and table["results"] == {
    "trackstar": f"{out}/results.jsonl"
  }
  for job in ("fit_hessian", "retrieve", "evaluate"):
    assert fileio.exists(f"{out}/{job}_config.json"), job
  # Nothing fell back to a local path named like the URL (os.path on "gs://..." gives "gs:/...").
  for base in (REPO, workdir, os.path.dirname(workdir)):
    assert not os.path.exists(os.path.join(base, "gs:")), base
