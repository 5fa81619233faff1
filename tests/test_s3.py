"""The encoding store, the Hessian and the results on s3:// against a local S3 emulator (moto's server).

The endpoint comes from AWS_ENDPOINT_URL (the AWS SDKs' variable; `remote.kvstore_spec`
puts it into TensorStore's s3 spec, whose driver does not read it), with test
credentials: nothing leaves the machine. An interrupted store (some chunks written)
reopens with exactly the missing chunks pending and completes to the same rows.
"""

import shutil
import sys
import urllib.request

import local_server
import numpy as np
import pytest

from trackstar_jax import fileio, remote
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib

BUCKET = "trackstar-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
  """The S3 endpoint URL, serving BUCKET; this process's AWS_* variables point at it for the module."""
  server = shutil.which("moto_server")
  if server is None:
    pytest.skip("moto's S3 server is not installed (pip install 'moto[server]', in the [test] extra)")
  port = local_server.free_port()
  root = tmp_path_factory.mktemp("s3")
  endpoint = f"http://127.0.0.1:{port}"
  env = dict(
    AWS_ENDPOINT_URL=endpoint,
    AWS_ACCESS_KEY_ID="test",
    AWS_SECRET_ACCESS_KEY="test",
    AWS_REGION="us-east-1",
    AWS_CONFIG_FILE=str(root / "aws_config"),
    AWS_SHARED_CREDENTIALS_FILE=str(root / "aws_credentials"),
  )
  cmd = ["timeout", "600", sys.executable, server, "-H", "127.0.0.1", "-p", str(port)]

  def ready():  # creates the bucket
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=2).read()

  with (
    local_server.running(cmd, name="moto_server", log_path=root / "moto.log", ready=ready),
    pytest.MonkeyPatch.context() as mp,
  ):
    for k, v in env.items():
      mp.setenv(k, v)
    yield endpoint


def test_endpoint_goes_into_the_s3_spec(s3):
  spec = remote.kvstore_spec(f"s3://{BUCKET}/run/")
  assert spec["driver"] == "s3" and spec["endpoint"] == s3 and spec["path"] == "run/"
  assert "endpoint" not in remote.kvstore_spec("memory://x/")


def test_store_hessian_and_results_on_s3(s3):
  url = f"s3://{BUCKET}/run/encodings.zarr"
  rng = np.random.default_rng(0)
  phi = rng.standard_normal((40, 16)).astype(np.float32)
  ids = np.arange(100, 140)
  meta = store_lib.StoreMeta(num_rows=40, dim=16, dtype="float32", chunk_rows=8)
  store = store_lib.open_store(url, expected_meta=meta, create=True)
  for c in (0, 2, 3):  # an interrupted encode: chunks 1 and 4 never written
    store.write_rows(start=8 * c, ids=ids[8 * c : 8 * c + 8], phi=phi[8 * c : 8 * c + 8]).wait()
  store = store_lib.open_store(url, expected_meta=meta)
  assert store.pending_chunks() == [1, 4] and not store.is_complete()
  for c in store.pending_chunks():
    store.write_rows(start=8 * c, ids=ids[8 * c : 8 * c + 8], phi=phi[8 * c : 8 * c + 8]).wait()
  got = store_lib.open_store(url).read(0, 40)
  np.testing.assert_array_equal(got.ids, ids)
  assert np.array_equal(got.phi.view(np.uint32), phi.view(np.uint32))

  h = hessian_lib.fit_hessian(train_phi=phi, config=dict(mixed=False))
  h.save(f"s3://{BUCKET}/run/hessian.npz")
  back = hessian_lib.Hessian.load(f"s3://{BUCKET}/run/hessian.npz")
  assert np.array_equal(back.inv_sqrt, np.asarray(h.inv_sqrt)) and back.meta == h.meta

  lines = [
    dict(
      example_id=1,
      inputs_plaintext="q",
      targets_plaintext="a",
      proponents=["x", "y"],
      proponent_ids=[101, 102],
      proponent_scores=[0.5, 0.25],
      opponents=["z"],
      opponent_ids=[103],
      opponent_scores=[-0.5],
    )
  ]
  path = f"s3://{BUCKET}/run/results.jsonl"
  results_lib.write_results(path, lines, metadata=dict(method="test"))
  records, meta_out = results_lib.load_results(path)
  assert records[0]["proponent_ids"] == [101, 102] and meta_out["method"] == "test"
  assert fileio.exists(path) and not fileio.exists(f"s3://{BUCKET}/run/none.jsonl")
