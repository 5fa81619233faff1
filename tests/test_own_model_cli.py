"""A user's own model, checkpoint, tokenizer, corpus and queries through the unchanged launchers.

The model (a Linen LM with its own module names), its Orbax checkpoint (one
item `state` = {params, opt_state}, optax.chain + inject_hyperparams(adamw)),
the Hugging Face tokenizer and the corpus are made in `own_model_helpers`,
never by this project. Checked (the CLI runs are marked slow): the CLI run over JSONL and the jobs over the
same corpus as Parquet give bitwise-equal stores and equal results; long
documents are windowed and the results name "doc#window"; empty documents
are counted in the encode metrics; 1 and 2 processes give the same store ids,
the same R and the same results (2 processes: jax.distributed on CPU, gloo,
each reading its slice; integration stage); and bad
input is refused with a message naming what was found.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import own_model_helpers as helpers
import pytest
import test_encode_job as encode_job_tests  # the CPU process environment of the launcher tests

from trackstar_jax import checkpoint_layout
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import results as results_lib
from trackstar_jax import store as store_lib
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.jobs import encode, retrieve
from trackstar_jax.jobs import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "own_model.py") + ":runlocal=True"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def user(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("user"))
  paths = helpers.write_user_files(root)
  sys.path.insert(0, root)  # the user's package (the subprocesses get it through PYTHONPATH)
  yield paths
  sys.path.remove(root)


def _env(user, *, devices: int = 8, process_id: int | None = None, port: int | None = None) -> dict[str, str]:
  """The encode-job tests' CPU process environment, with the user's package importable."""
  env = encode_job_tests._env(devices=devices, process_id=process_id, port=port)
  env["PYTHONPATH"] = f"{REPO}:{user['root']}"
  return env


def _command(job: str, workdir: str, user, **extra) -> list[str]:
  flags = [f"--config.{k}={v}" for k, v in helpers.overrides(user, **extra).items()]
  launch = [sys.executable, "-m", f"launch.{job}", f"--config={CONFIG}", f"--workdir={workdir}"]
  return ["timeout", str(TIMEOUT_S), *launch, *flags]


def _run_cli(job: str, workdir: str, user, **extra) -> None:
  out = subprocess.run(_command(job, workdir, user, **extra), cwd=REPO, env=_env(user), capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-4000:]


def _store_arrays(url: str):
  store = store_lib.open_store(url)
  chunk = store.read(0, store.num_rows)
  return np.asarray(chunk.ids), np.asarray(chunk.phi), store


@pytest.fixture(scope="module")
def cli_run(user, tmp_path_factory):
  """encode -> fit_hessian -> retrieve from the command line, over the JSONL corpus."""
  w = str(tmp_path_factory.mktemp("w_jsonl"))
  for job in ("encode", "fit_hessian", "retrieve"):
    _run_cli(job, w, user)
  return w


def test_jsonl_and_parquet_give_bitwise_identical_stores_with_windowed_ids(user, tmp_path):
  stores = []
  for fmt in ("jsonl", "parquet"):
    encode.run(helpers.config(user, corpus=fmt), str(tmp_path / fmt))
    stores.append(_store_arrays(str(tmp_path / fmt / "encodings.zarr")))
  (ids_j, phi_j, store_j), (ids_p, phi_p, store_p) = stores
  np.testing.assert_array_equal(ids_p, ids_j)
  assert phi_p.tobytes() == phi_j.tobytes() and store_p.meta == store_j.meta and np.abs(phi_j).sum(1).min() > 0
  corpus = workdir_lib.load_data(helpers.config(user), str(tmp_path)).dataset.corpus
  np.testing.assert_array_equal(ids_j, np.arange(len(corpus)))
  assert corpus.stats.windowed == 6 and corpus.stats.empty == 1  # docs 0, 7, ..., 35 are long; doc5 is blank
  tok = workdir_lib.load_data(helpers.config(user), str(tmp_path)).tokenizer
  for doc in helpers.documents():
    n = len(tok.encode(doc["body"]))
    want = len(corpus_lib.windows(n + 2, seq_len=helpers.SEQ_LEN)) if n else 0  # + BOS and EOS
    ids = corpus.example_ids_of(doc["url"])
    assert [corpus.id_of(i) for i in ids] == [f"{doc['url']}#{w}" for w in range(want)]
    assert "".join(corpus.text_of(i) for i in ids[:1]) in doc["body"]


@pytest.mark.slow
def test_jsonl_cli_and_parquet_jobs_give_identical_stores_and_results(user, cli_run, tmp_path):
  w_pq = str(tmp_path / "w_parquet")
  config = helpers.config(user, corpus="parquet")
  encode.run(config, w_pq)
  ids_j, phi_j, store_j = _store_arrays(os.path.join(cli_run, "encodings.zarr"))
  ids_p, phi_p, store_p = _store_arrays(os.path.join(w_pq, "encodings.zarr"))
  np.testing.assert_array_equal(ids_p, ids_j)
  assert phi_p.tobytes() == phi_j.tobytes()  # bitwise
  assert store_p.meta == store_j.meta  # same corpus fingerprint (it hashes tokens, not files), checkpoint, blocks
  assert np.abs(phi_j).sum(1).min() > 0
  # The Hessian fit on the JSONL run is accepted for the Parquet store: it records the same encodings.
  shutil.copy(os.path.join(cli_run, "hessian.npz"), os.path.join(w_pq, "hessian.npz"))
  out = retrieve.run(config, w_pq)
  read = lambda p: [json.loads(line) for line in open(p)]
  assert read(out) == read(os.path.join(cli_run, "results.jsonl"))

  records = read(out)
  corpus = workdir_lib.load_data(config, w_pq).dataset.corpus
  docs = {d["url"]: d["body"] for d in helpers.documents()}
  for rec, query in zip(records, helpers.QUERIES):
    assert rec["example_id"] == query["id"] and rec["relation"] == query["relation"]
    for side in ("proponent", "opponent"):
      for eid, source, text in zip(rec[f"{side}_ids"], rec[f"{side}_sources"], rec[f"{side}s"]):
        doc, _, window = source.rpartition("#")
        assert source == corpus.id_of(eid) and text in docs[doc]  # back to the source document's text
        assert corpus.source_of(eid).window == int(window)
    gold = set(sum((corpus.example_ids_of(d) for d in query["gold"]), []))
    assert rec["proponent_correct"] == [i in gold for i in rec["proponent_ids"]]


@pytest.mark.slow
def test_encode_reports_empty_documents(cli_run):
  rows = [json.loads(line) for line in open(os.path.join(cli_run, "encode_metrics.jsonl"))]
  corpus = [r["corpus"] for r in rows if "corpus" in r]
  assert corpus and corpus[-1]["empty"] == 1 and corpus[-1]["documents"] == 35
  assert corpus[-1]["examples"] == _store_arrays(os.path.join(cli_run, "encodings.zarr"))[2].num_rows


def _two_processes(job: str, w: str, user, tmp_path, **extra) -> list[str]:
  """Runs `job` as 2 JAX processes x 4 CPU devices (config overrides `extra`); returns their logs' text."""
  port = encode_job_tests._free_port()
  procs, logs = [], []
  for i in range(2):
    logs.append(str(tmp_path / f"{job}_p{i}.log"))
    with open(logs[-1], "wb") as f:
      procs.append(
        subprocess.Popen(
          _command(job, w, user, **extra),
          cwd=REPO,
          env=_env(user, devices=4, process_id=i, port=port),
          stdout=f,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
  try:
    codes = [p.wait(timeout=TIMEOUT_S + 30) for p in procs]
  finally:
    for p in procs:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
  texts = [open(log, errors="replace").read() for log in logs]
  assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
  return texts


@pytest.mark.integration  # ~2 min: three 2-process jobs after the module's CLI chain
def test_two_processes_read_their_slices_and_write_the_same_store_and_hessian(user, cli_run, tmp_path):
  w = str(tmp_path / "w2")
  logs = _two_processes("encode", w, user, tmp_path)
  ids_1, phi_1, store_1 = _store_arrays(os.path.join(cli_run, "encodings.zarr"))
  ids_2, phi_2, store_2 = _store_arrays(os.path.join(w, "encodings.zarr"))
  np.testing.assert_array_equal(ids_2, ids_1)
  assert store_2.meta == store_1.meta
  np.testing.assert_allclose(phi_2, phi_1, rtol=1e-4, atol=1e-6)
  assert "rows [0, 18)" in logs[0] and "rows [18, 36)" in logs[1]  # each its own slice
  # fit_hessian: each process reads its slice and encodes the sampled rows in it; R is reduced once.
  logs = _two_processes("fit_hessian", w, user, tmp_path)
  h1 = hessian_lib.Hessian.load(os.path.join(cli_run, "hessian.npz"))
  h2 = hessian_lib.Hessian.load(os.path.join(w, "hessian.npz"))
  assert "rows [0, 18)" in logs[0] and "rows [18, 36)" in logs[1]
  assert h2.meta["n_train"] == h1.meta["n_train"] and h2.meta["encoding"] == h1.meta["encoding"]
  assert abs(h2.lam - h1.lam) < 1e-5
  # Compared as the damped R = (R^{-1/2})^-2 the processes reduced: this tiny R (32 + 3 rows in d = 32, lambda 1:
  # 3 queries) has condition ~1.6e4, so R^{-1/2} turns the two meshes' 1e-6 phi differences into ~1e-4.
  r1, r2 = (np.linalg.inv(np.float64(h.inv_sqrt) @ h.inv_sqrt) for h in (h1, h2))
  assert np.linalg.norm(r2 - r1) / np.linalg.norm(r1) < 5e-5
  assert np.linalg.norm(h2.inv_sqrt - h1.inv_sqrt) / np.linalg.norm(h1.inv_sqrt) < 1e-3
  # retrieve: each process reads its slice; process 0 gathers the results' texts and sources, and gold documents
  # are resolved by both: the records are the one-process run's. It reads the one-process store and R (the
  # 2-process R^{-1/2} above differs by ~1e-4, which moves scores by ~1e-3), so only the query encodings differ.
  one = {"store.url": os.path.join(cli_run, "encodings.zarr"), "hessian.path": os.path.join(cli_run, "hessian.npz")}
  logs = _two_processes("retrieve", w, user, tmp_path, **one)
  assert "rows [0, 18)" in logs[0] and "rows [18, 36)" in logs[1]
  recs_1, meta_1 = results_lib.load_results(os.path.join(cli_run, "results.jsonl"))
  recs_2, meta_2 = results_lib.load_results(os.path.join(w, "results.jsonl"))
  assert {k: meta_2[k] for k in ("fingerprint", "num_examples", "num_queries", "k", "method")} == {
    k: meta_1[k] for k in ("fingerprint", "num_examples", "num_queries", "k", "method")
  }
  assert abs(meta_2["hessian_lambda"] - meta_1["hessian_lambda"]) < 1e-5
  assert len(recs_2) == len(recs_1) == len(helpers.QUERIES)
  assert any(any(r["proponent_correct"]) for r in recs_1)  # gold documents were resolved, and some are found
  for r1, r2 in zip(recs_1, recs_2):
    for side in ("proponent", "opponent"):
      np.testing.assert_allclose(r2.pop(f"{side}_scores"), r1.pop(f"{side}_scores"), rtol=1e-4, atol=1e-6)
    assert r2 == r1  # ids, texts, sources, proponent_correct, gold: exact


# ----------------------------------------------------------------------------
# Bad input, each refused naming what was found and what was expected.


def _load_encoder(config, tmp_path):
  rd = workdir_lib.load_data(config, str(tmp_path))
  return workdir_lib.load_encoder(config, str(tmp_path), rd.tokenizer)


def test_a_factory_that_does_not_import(user, tmp_path):
  with pytest.raises(ImportError, match=r"cannot import module 'no_such_pkg\.lm' \(ModuleNotFoundError"):
    _load_encoder(helpers.config(user, **{"model.factory": "no_such_pkg.lm:make_model"}), tmp_path)
  with pytest.raises(ImportError, match=r"module 'my_lm' .* has no attribute 'make_modle'.*'make_model'"):
    _load_encoder(helpers.config(user, **{"model.factory": "my_lm:make_modle"}), tmp_path)


def test_params_or_optimizer_path_not_in_the_checkpoint(user, tmp_path):
  with pytest.raises(
    ValueError, match=r"no key 'parms' at the top level; the keys there are \['opt_state', 'params'\]"
  ):
    _load_encoder(helpers.config(user, **{"checkpoint.params": "state/parms"}), tmp_path)
  with pytest.raises(FileNotFoundError, match=r"names no Orbax item .* holds _CHECKPOINT_METADATA, .*state"):
    _load_encoder(helpers.config(user, **{"checkpoint.opt_state": "opt/opt_state"}), tmp_path)
  with pytest.raises(FileNotFoundError, match=r"No step 7 in checkpoint .*its steps: \[3\]"):
    _load_encoder(helpers.config(user, **{"checkpoint.step": 7}), tmp_path)


def test_a_model_with_no_traceable_kernels(user, tmp_path):
  config = helpers.config(
    user, **{"model.factory": "my_lm:make_no_kernels", "encoder.param_regex": "layers_0_attn", "checkpoint.path": ""}
  )
  with pytest.raises(ValueError, match="set checkpoint.path"):
    _load_encoder(config, tmp_path)
  from trackstar_jax.jobs import own_model  # pylint: disable=g-import-not-at-top

  model = own_model.build_model(config, vocab_size=40)
  from trackstar_jax import api  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match=r"Module types in the model: .*NoKernels"):
    api.build_encoder(apply_fn=model.apply_fn, params=model.params, correction="none", param_regex="layers_0_attn")


def test_a_tokenizer_larger_than_the_model_vocabulary(user, tmp_path):
  config = helpers.config(user)
  config.model.my_vocab = 20  # the factory builds a 20-token model; the tokenizer has 39 tokens
  with pytest.raises(ValueError, match=r"The tokenizer has 39 tokens but the model's vocabulary has 20"):
    _load_encoder(config, tmp_path)


def test_a_params_tree_that_does_not_fit_the_model(user, tmp_path):
  config = helpers.config(user, **{"checkpoint.params": "state/opt_state/1/hyperparams"})  # scalars, no kernels
  with pytest.raises(ValueError, match=r"do not fit the model: the model has \['head/bias', 'head/kernel'"):
    _load_encoder(config, tmp_path)


def test_a_missing_text_field_and_an_empty_target(user, tmp_path):
  with pytest.raises(ValueError, match=r"corpus\.jsonl, row 0: no text field 'text' \(fields: \['body', 'url'\]\)"):
    workdir_lib.load_data(helpers.config(user, **{"corpus.text_field": "text"}), str(tmp_path))
  bad = str(tmp_path / "queries.jsonl")
  helpers.write_jsonl(bad, [*helpers.QUERIES, {"id": "q3", "prompt": "the cat", "target": " "}])
  with pytest.raises(ValueError, match=r"queries\.jsonl, row 3: the target is empty"):
    workdir_lib.load_data(helpers.config(user, **{"queries.path": bad}), str(tmp_path))


def test_locate_names_items_and_steps(user):
  where = checkpoint_layout.locate(user["checkpoint"], "state/opt_state", step=None)
  assert where.step == 3 and where.keys == ("opt_state",) and where.item_dir.endswith("3/state")
  direct = checkpoint_layout.locate(where.item_dir, "params")
  assert direct.step is None and direct.keys == ("params",)
