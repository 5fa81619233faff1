"""The public API (`trackstar_jax` top level): its docstring examples, each call against a reference, bad input.

The doctests run on a tiny random LM with a real optax Adam state; the README's
"Python API" example runs verbatim in `test_readme_example` (on the shared
trained workdir's model).
"""

import dataclasses
import doctest
import inspect
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import ranking_helpers

import trackstar_jax as tsj
from trackstar_jax import api, retrieval
from trackstar_jax import hessian as hessian_lib
from trackstar_jax.data import batching
from trackstar_jax.jobs import retrieve as retrieve_job
from trackstar_jax.models import DecoderLM, TransformerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ = 32, 8


def _examples(rng, n, *, query: bool, first_id: int = 0) -> batching.Examples:
  tokens = rng.integers(1, VOCAB, (n, SEQ)).astype(np.int32)
  lengths = rng.integers(4, SEQ + 1, n)
  pad = np.arange(SEQ)[None] < lengths[:, None]
  loss = pad.astype(np.float32)
  if query:  # loss on the last two real tokens only (the answer)
    loss = (pad & (np.arange(SEQ)[None] >= lengths[:, None] - 2)).astype(np.float32)
  return batching.Examples(
    inputs=tokens * pad,
    targets=np.roll(tokens, -1, 1) * pad,
    loss_mask=loss,
    pad_mask=pad,
    ids=np.arange(first_id, first_id + n, dtype=np.int64),
  )


@pytest.fixture(scope="module")
def tiny():
  """A 2-layer LM after 3 real Adam steps (non-trivial nu), 40 corpus examples, 4 queries."""
  model = DecoderLM(TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=SEQ))
  params = model.init(jax.random.key(0), jnp.ones((1, SEQ), jnp.int32))
  rng = np.random.default_rng(0)
  corpus, queries = _examples(rng, 40, query=False, first_id=100), _examples(rng, 4, query=True)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  from trackstar_jax import losses  # pylint: disable=g-import-not-at-top

  for i in range(3):
    b = corpus.batch(np.arange(8 * i, 8 * i + 8))
    g = jax.grad(lambda p: losses.mean_token_loss(model.apply(p, b["inputs"], b["pad_mask"]), b))(params)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
  return dict(model=model, params=params, opt_state=opt_state, corpus=corpus, queries=queries, np=np)


def test_docstring_examples_run(tiny):
  """Every `>>>` example of the public functions, in order, sharing one namespace (as a notebook would)."""
  globs = {**tiny, **{n: getattr(api, n) for n in api.__all__}}
  parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for name in ("build_encoder", "encode", "fit_hessian", "retrieve", "score"):
    fn = getattr(api, name)
    assert ">>>" in fn.__doc__, f"{name} has no runnable example"
    test = parser.get_doctest(fn.__doc__, globs, name, api.__file__, 0)
    runner.run(test, clear_globs=False)
    globs = test.globs
  assert runner.failures == 0 and runner.tries >= 10, runner.summarize()


def test_public_names_are_documented():
  for name in tsj.__all__:
    obj = getattr(tsj, name)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_four_calls_match_brute_force(tiny, tmp_path):
  """build_encoder -> encode (store) -> fit_hessian -> retrieve == a NumPy ranking of the reference encodings."""
  with jax.default_matmul_precision("highest"):  # a GPU's default float32 matmuls (TF32) differ by ~1e-3
    _four_calls_match_brute_force(tiny, tmp_path)


def _four_calls_match_brute_force(tiny, tmp_path):
  enc = tsj.build_encoder(model=tiny["model"], params=tiny["params"], opt_state=tiny["opt_state"], d_in=4, d_out=4)
  assert enc.correction.kind == "adam"  # "auto" found Adam's nu
  store = tsj.encode(enc, tiny["corpus"], store=str(tmp_path / "enc.zarr"), chunk_rows=16, dtype="float32")
  h = tsj.fit_hessian(encoder=enc, train=tiny["corpus"], queries=tiny["queries"], top_k_eig=8)
  res = tsj.retrieve(encoder=enc, queries=tiny["queries"], store=store, hessian=h, k=5, matmul_dtype="float32")
  # Reference: brute-force vmap(grad) phis, R^{-1/2}, cosine, full sort.
  phi_z = np.asarray(enc.reference(tiny["corpus"].batch(np.arange(40))))
  phi_q = np.asarray(enc.reference(tiny["queries"].batch(np.arange(4))))
  np.testing.assert_allclose(store.read(0, 40).phi, phi_z, rtol=1e-4, atol=1e-4 * np.abs(phi_z).max())
  scores = np.asarray(hessian_lib.cosine_scores(phi_q, phi_z, hessian=h))
  # Near-ties (R from 44 rows in d = 64) may come back in either order: CI saw rows 111 and 105 swap.
  ranking_helpers.assert_is_top_k(res.top_ids - 100, scores, atol=1e-4)
  ranking_helpers.assert_is_top_k(res.bottom_ids - 100, scores, atol=1e-4, largest=False)
  np.testing.assert_allclose(res.top_scores, np.take_along_axis(scores, res.top_ids - 100, axis=1), atol=1e-4)
  # score() agrees, and in-memory phis give the same ranking as the store.
  np.testing.assert_allclose(
    tsj.score(encoder=enc, queries=tiny["queries"], examples=tiny["corpus"], hessian=h), scores, atol=1e-4
  )
  mem = tsj.retrieve(
    query_phi=phi_q, corpus_phi=phi_z, corpus_ids=np.arange(100, 140), hessian=h, k=5, matmul_dtype="float32"
  )
  ranking_helpers.assert_is_top_k(mem.top_ids - 100, scores, atol=1e-4)  # the reference phis: ties may swap
  # The streaming options change how the scan runs, never what it returns.
  ref = tsj.retrieve(
    query_phi=phi_q, corpus_phi=phi_z, corpus_ids=np.arange(100, 140), hessian=h, k=5, matmul_dtype="float32",
    select="reference", cache_norms=False, transfers_ahead=0, pinned=False, chunk_rows=16,
  )  # fmt: skip
  np.testing.assert_array_equal(ref.top_ids, mem.top_ids)
  np.testing.assert_array_equal(ref.bottom_ids, mem.bottom_ids)
  fresh = tsj.retrieve(
    encoder=enc, queries=tiny["queries"], store=store, hessian=h, k=5, matmul_dtype="float32", pinned_reads=False
  )
  np.testing.assert_array_equal(fresh.top_ids, res.top_ids)
  np.testing.assert_array_equal(fresh.top_scores, res.top_scores)
  with pytest.raises(TypeError, match="unknown options .*'selekt'"):
    tsj.retrieve(query_phi=phi_q, corpus_phi=phi_z, k=5, selekt="fused")
  arrays = res.to_arrays()
  assert set(arrays) >= {"top_ids", "top_scores", "bottom_ids", "bottom_scores"} and arrays["top_ids"].shape == (4, 5)


def test_encode_resumes_and_refuses_other_inputs(tiny, tmp_path):
  enc = tsj.build_encoder(model=tiny["model"], params=tiny["params"], opt_state=tiny["opt_state"], d_in=4, d_out=4)
  url = str(tmp_path / "enc.zarr")
  store = tsj.encode(enc, tiny["corpus"], store=url, chunk_rows=16)
  full = store.read(0, 40).phi
  store.unmark([1])  # as if killed before chunk 1 committed
  assert not tsj.open_store(url).is_complete()
  again = tsj.encode(enc, tiny["corpus"], store=url, chunk_rows=16)  # only the missing chunk is encoded
  assert again.is_complete()
  np.testing.assert_array_equal(again.read(0, 40).phi.view(np.uint16), full.view(np.uint16))
  other = tiny["corpus"].select(np.arange(39, -1, -1))  # the same rows in another order: another corpus
  with pytest.raises(tsj.store.StoreMismatchError, match="corpus_fingerprint"):
    tsj.encode(enc, other, store=url, chunk_rows=16)


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_damaged_chunk_is_refused_then_repaired_by_encode(tiny, tmp_path, how):
  """A damaged chunk of a complete store: retrieval refuses it by name; verify --repair + encode (the encode
  job's own path) restores a store bitwise equal to the clean one."""
  from trackstar_jax.jobs import verify_store  # pylint: disable=g-import-not-at-top

  enc = tsj.build_encoder(model=tiny["model"], params=tiny["params"], opt_state=tiny["opt_state"], d_in=4, d_out=4)
  url = str(tmp_path / "enc.zarr")
  clean = tsj.encode(enc, tiny["corpus"], store=url, chunk_rows=16).read(0, 40).phi
  chunk_file = tmp_path / "enc.zarr" / "phi" / "c" / "1" / "0"
  if how == "delete":
    chunk_file.unlink()
  else:
    chunk_file.write_bytes(chunk_file.read_bytes()[: chunk_file.stat().st_size // 2])
  with pytest.raises(tsj.store.StoreDataError, match=r"chunk 1 .*rows \[16, 32\).*launch.verify_store"):
    tsj.retrieve(encoder=enc, queries=tiny["queries"], store=url, k=3)
  assert [b.chunk for b in verify_store.run(url=url, repair=True)] == [1]
  repaired = tsj.encode(enc, tiny["corpus"], store=url, chunk_rows=16)
  assert repaired.verify() == [] and repaired.read(0, 40).phi.tobytes() == clean.tobytes()


def test_batches_as_input_and_padding_rows(tiny):
  """An iterable of batch dicts (with padding rows, ids -1) encodes like the Examples it came from."""
  enc = tsj.build_encoder(model=tiny["model"], params=tiny["params"], correction="none", d_in=4, d_out=4)
  corpus = tiny["corpus"]
  batches = list(batching.iterate_batches(corpus, batch_size=16))  # the last one padded to 16 with ids -1
  assert (batches[-1]["ids"] < 0).any()
  np.testing.assert_allclose(tsj.encode(enc, batches), tsj.encode(enc, corpus), rtol=1e-5, atol=1e-6)


def test_k_larger_than_the_corpus_is_clamped_and_recorded(tiny, tmp_path):
  enc = tsj.build_encoder(model=tiny["model"], params=tiny["params"], correction="none", d_in=4, d_out=4)
  res = tsj.retrieve(encoder=enc, queries=tiny["queries"], corpus_phi=tsj.encode(enc, tiny["corpus"]), k=100)
  assert res.k == 40 and res.top_ids.shape == (4, 40)
  queries = [dict(query_id=i, prompt="p", target=" t") for i in range(4)]
  path = res.write_jsonl(str(tmp_path / "r.jsonl"), queries=queries, text_of=str, metadata=dict(method="x"))
  assert tsj.load_results(path)[1]["k"] == 40  # the k actually used, not the one asked for


def test_bad_input_is_named(tiny):
  with pytest.raises(ValueError, match=r"Unknown EncoderOptions option\(s\): 'd_inn' \(did you mean 'd_in'\?\)"):
    tsj.build_encoder(model=tiny["model"], params=tiny["params"], d_inn=4)
  with pytest.raises(ValueError, match="needs the model"):
    tsj.build_encoder(params=tiny["params"])
  enc = tsj.build_encoder(model=tiny["model"], params=tiny["params"], correction="none", d_in=4, d_out=4)
  with pytest.raises(ValueError, match="missing fields"):
    tsj.encode(enc, {"inputs": np.zeros((2, SEQ), np.int32)})
  with pytest.raises(ValueError, match="train=.*train_phi="):
    tsj.fit_hessian(encoder=enc)
  with pytest.raises(ValueError, match=r"Unknown HessianOptions option\(s\): 'dampin'"):
    tsj.fit_hessian(train_phi=np.ones((4, 8)), mixed=False, dampin=1.0)
  with pytest.raises(ValueError, match="store= .* or corpus_phi="):
    tsj.retrieve(query_phi=np.ones((2, 8)))


def _readme_example() -> str:
  text = open(os.path.join(REPO, "README.md")).read()
  section = text[text.index("## Python API") :]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert blocks, "README has no python block under '## Python API'"
  return blocks[0]


@pytest.mark.integration  # ~70-130 s on 2 cores: trains and traces the README's example; .ci/run's integration stage
def test_readme_example_runs_verbatim(tmp_path, monkeypatch, capsys):
  """The README's Python API example, exactly as written (its /tmp paths moved under tmp_path)."""
  code = _readme_example().replace("/tmp/trackstar_api", str(tmp_path / "api"))
  assert "/tmp/" not in code.replace(str(tmp_path), "")
  monkeypatch.chdir(REPO)
  exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "proponents of" in out and os.path.exists(tmp_path / "api" / "results.jsonl")
  assert tsj.results.validate_results_file(str(tmp_path / "api" / "results.jsonl")) > 0


def test_every_retrieve_option_reaches_the_scan():
  """Each `RetrieveOptions` field is an argument of `tsj.retrieve` and is read by the retrieve job from its config."""
  fields = {f.name for f in dataclasses.fields(retrieval.RetrieveOptions)}
  arguments = set(inspect.signature(tsj.retrieve).parameters) | set(api._STREAMING_OPTIONS)
  assert fields <= arguments, sorted(fields - arguments)
  job = inspect.getsource(retrieve_job)
  assert not [f for f in fields if f"rc.{f}" not in job], [f for f in fields if f"rc.{f}" not in job]
