"""The attribution jobs after training: fit_hessian, encode, retrieve.

Each job reads the experiment config and the training workdir (checkpoint with
optimizer state, tokenizer) and writes next to them:

  <workdir>/hessian.npz         fit_hessian: R^{-1/2} (config.hessian)
  <workdir>/encodings.zarr      encode: phi of every corpus example (config.store.url overrides)
  <workdir>/results.jsonl       retrieve: proponents/opponents per query (config.retrieve.output overrides)

Multi-host: every process runs the same job. Encoding runs in lockstep on the
global mesh (every process makes the same number of encoder calls, padding
with empty batches), each process encoding and writing its own store chunks;
process 0 creates the store and writes shared files. Every job is resumable:
`encode` skips committed chunks, the others are short and rerun whole.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax import checkpointing
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import optimizer_correction as oc
from trackstar_jax import progress as progress_lib
from trackstar_jax import results as results_lib
from trackstar_jax import retrieval
from trackstar_jax import store as store_lib
from trackstar_jax import train as train_lib
from trackstar_jax.mesh import make_mesh


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def _allgather(x: np.ndarray) -> np.ndarray:
  """[n, ...] from every process -> [process_count * n, ...] (process order)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  out = np.asarray(multihost_utils.process_allgather(x, tiled=False))
  return out.reshape((-1,) + out.shape[2:])


def store_url(config, workdir: str) -> str:
  return config.store.get("url", "") or os.path.join(os.path.abspath(workdir), "encodings.zarr")


def hessian_path(config, workdir: str) -> str:
  return config.hessian.get("path", "") or os.path.join(os.path.abspath(workdir), "hessian.npz")


def results_path(config, workdir: str) -> str:
  return config.retrieve.get("output", "") or os.path.join(os.path.abspath(workdir), "results.jsonl")


def load_encoder(config, workdir: str, tokenizer, *, mesh=None):
  """(TrackStarEncoder, step) from the checkpoint at config.encoder.step (default: latest)."""
  from trackstar_jax.encoder import TrackStarEncoder  # pylint: disable=g-import-not-at-top

  step = config.encoder.get("step", None)
  step = checkpointing.latest_step(workdir) if step in (None, -1) else int(step)
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {workdir!r}: run launch/train.py with this --workdir first.")
  mesh = mesh or make_mesh(config.mesh)
  model = train_lib.build_model(config, tokenizer)
  params = checkpointing.restore_params(workdir, step=step)
  opt_state = None
  if config.encoder.get("correction", "none") != "none":
    _, opt_state = oc.restore_second_moments(workdir, step=step, paths=config.encoder.param_regex)
  # The correction's Adam eps / b2 are the training optimizer's.
  enc_cfg = config.encoder.copy_and_resolve_references()
  with enc_cfg.unlocked():
    enc_cfg.eps = float(config.train.get("eps", enc_cfg.get("eps", 1e-8)))
    enc_cfg.b2 = float(config.train.get("b2", enc_cfg.get("b2", 0.99)))
  encoder = TrackStarEncoder(model_apply=model.apply, params=params, config=enc_cfg, opt_state=opt_state,
                             mesh=mesh, seq_len=config.seq_len)
  return encoder, step


def encoding_meta(config, workdir: str, encoder, *, step: int, dataset, num_rows: int) -> store_lib.StoreMeta:
  """What identifies an encoding: checkpoint, projection, correction, corpus."""
  enc = config.encoder
  return store_lib.StoreMeta(
      num_rows=int(num_rows), dim=int(encoder.dim), dtype=str(config.store.dtype),
      chunk_rows=int(config.store.chunk_rows), checkpoint=os.path.abspath(workdir), step=int(step),
      projection_seed=int(enc.get("seed", 0)), blocks=tuple(encoder.blocks), correction=str(encoder.correction.kind),
      corpus_fingerprint=str(dataset.fingerprint),
      extra=dict(dataset=dataset.name, seq_len=int(config.seq_len), param_regex=str(enc.param_regex),
                 d_in=int(enc.d_in), d_out=int(enc.d_out), layers_per_group=int(enc.get("layers_per_group", 1)),
                 bias_correction=bool(enc.get("bias_correction", False))),
  )  # fmt: skip


def _host_batch(examples, rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
  """Rows of `examples` as a batch padded to `size` rows (padding ids -1)."""
  batch = examples.batch(rows)
  pad = size - len(rows)
  if pad:
    batch = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], -1 if k == "ids" else 0, v.dtype)])
             for k, v in batch.items()}
  return batch


def _dispatch_rows(encoder, examples, rows: np.ndarray, *, host_batch: int, num_batches: int,
                   dtype=None) -> list[tuple[int, Any]]:
  """Starts encoding this process's `rows` in exactly `num_batches` encoder calls (lockstep across hosts).

  One process: returns device arrays still being computed (JAX dispatch is
  asynchronous), so the caller can do host work meanwhile; `_collect` waits.
  `dtype` (e.g. the store's bfloat16) converts on the device: half the bytes to
  copy to the host, and no host-side conversion (the same round-to-nearest-even).
  """
  out = []
  for j in range(num_batches):
    part = rows[j * host_batch : (j + 1) * host_batch]
    batch = _host_batch(examples, part, host_batch)
    if jax.process_count() == 1:
      phi = encoder.encode(batch)
      out.append((len(part), phi if dtype is None else phi.astype(dtype)))
    else:
      out.append((len(part), encoder.encode_local(batch)))
  return out


def _collect(parts: list[tuple[int, Any]], dim: int) -> np.ndarray:
  """[rows, d] numpy of `_dispatch_rows`' output (waits for the device)."""
  parts = [np.asarray(phi)[:n] for n, phi in parts if n]
  return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def _encode_rows(encoder, examples, rows: np.ndarray, *, host_batch: int, num_batches: int) -> np.ndarray:
  """phi [len(rows), d] float32 of this process's rows (see `_dispatch_rows`)."""
  return _collect(_dispatch_rows(encoder, examples, rows, host_batch=host_batch, num_batches=num_batches),
                  encoder.dim)


def _phi_batches(encoder, examples, *, batch_size: int):
  """Yields (phi [B, d] on the device, valid [B]) per batch of `examples` (one process): for streamed sums."""
  for a in range(0, len(examples), batch_size):
    batch = _host_batch(examples, np.arange(a, min(a + batch_size, len(examples))), batch_size)
    yield encoder.encode(batch), batch["ids"] >= 0


def encode_examples(encoder, examples, *, batch_size: int) -> np.ndarray:
  """phi [N, d] float32 of all `examples`, on every process (each encodes a share)."""
  pi, pc = jax.process_index(), jax.process_count()
  n = len(examples)
  per_host = -(-n // pc)
  rows = np.arange(pi * per_host, min((pi + 1) * per_host, n))
  host_batch = max(1, batch_size // pc)
  phi = _encode_rows(encoder, examples, rows, host_batch=host_batch, num_batches=-(-per_host // host_batch))
  if pc == 1:
    return phi
  padded = np.zeros((per_host, encoder.dim), np.float32)
  padded[: len(rows)] = phi
  return _allgather(padded)[:n]


def encode_corpus(config, workdir: str, *, dataset=None) -> store_lib.EncodingStore:
  """The encode job: phi of every corpus example into the store; resumes where it stopped."""
  pi, pc = jax.process_index(), jax.process_count()
  dataset, tokenizer, _, corpus, _ = train_lib.load_data(config, workdir, dataset=dataset)
  encoder, step = load_encoder(config, workdir, tokenizer)
  meta = encoding_meta(config, workdir, encoder, step=step, dataset=dataset, num_rows=len(corpus))
  url = store_url(config, workdir)
  if pi == 0:
    store_lib.open_store(url, expected_meta=meta, create=True)
  _sync("encode:store_created")
  store = store_lib.open_store(url, expected_meta=meta)
  pending = store.pending_chunks(process_index=pi, process_count=pc)
  n_iter = int(_allgather(np.asarray([len(pending)])).max())
  host_batch = max(1, int(config.encoder.batch_size) // pc)
  per_chunk = -(-store.chunk_rows // host_batch)
  store_dtype = jnp.bfloat16 if store.meta.dtype == "bfloat16" else None
  logging.info("encode: %d rows in %d chunks; this process: %d pending of %d; store %s", store.num_rows,
               store.num_chunks, len(pending), len(range(pi, store.num_chunks, pc)), url)
  prog = progress_lib.Progress(total=n_iter, unit="chunk", item_unit="examples", name="encode")
  # Software pipeline: chunk i + 1 is dispatched to the devices before chunk i is copied to the host
  # and handed to the writer, so host work (batching, device-to-host copy, store writes) overlaps
  # device work instead of idling the accelerator between chunks.
  in_flight = None  # (chunk, a, b, dispatched parts)

  def finish(done: int, chunk, a: int, b: int, parts) -> None:
    phi = _collect(parts, encoder.dim)
    if chunk is not None:
      writer.submit(start=a, ids=corpus.ids[a:b], phi=phi)  # committed (and marked) asynchronously
    prog.update(done, items=b - a)
    if done == 1:
      prog.mark()  # exclude compilation from the rate
    if prog.due(every_s=30) or done == n_iter:
      logging.info(prog.line())

  with store_lib.AsyncWriter(store, max_pending=2) as writer:
    for i in range(n_iter):
      chunk = pending[i] if i < len(pending) else None  # None: keep the other processes company
      a, b = store.chunk_range(chunk) if chunk is not None else (0, 0)
      parts = _dispatch_rows(encoder, corpus, np.arange(a, b), host_batch=host_batch, num_batches=per_chunk,
                             dtype=store_dtype)
      if in_flight is not None:
        finish(i, *in_flight)
      in_flight = (chunk, a, b, parts)
    if in_flight is not None:
      finish(n_iter, *in_flight)
  _sync("encode:done")
  store.require_complete()
  return store


def fit_hessian_job(config, workdir: str, *, dataset=None) -> hessian_lib.Hessian:
  """The fit_hessian job: R_train from a corpus sample, R_eval from the queries; saves R^{-1/2}."""
  dataset, tokenizer, _, corpus, queries = train_lib.load_data(config, workdir, dataset=dataset)
  encoder, step = load_encoder(config, workdir, tokenizer)
  n = min(int(config.hessian.train_sample), len(corpus))
  rows = np.sort(np.random.default_rng(int(config.hessian.get("seed", 0))).choice(len(corpus), n, replace=False))
  batch_size = int(config.encoder.batch_size)
  if jax.process_count() == 1:  # streamed into R batch by batch: no [N, d] phi on the host or device
    encode = functools.partial(_phi_batches, encoder, batch_size=batch_size)
  else:  # every process needs every row's phi (allgathered): N x d x 4 bytes per host
    encode = functools.partial(encode_examples, encoder, batch_size=batch_size)
  h = hessian_lib.fit_hessian(train_phi=encode(corpus.select(rows)),
                              eval_phi=encode(queries) if config.hessian.mixed else None,
                              config=config.hessian, n_blocks=len(encoder.blocks))
  h.meta["encoding"] = _producer(encoding_meta(config, workdir, encoder, step=step, dataset=dataset,
                                               num_rows=len(corpus)))
  path = hessian_path(config, workdir)
  if jax.process_index() == 0:
    tmp = f"{path}.tmp-{os.getpid()}"
    h.save(tmp)
    os.replace(tmp, path)
    logging.info("fit_hessian: lambda=%.4f from %d corpus examples and %d queries -> %s", h.lam,
                 h.meta["n_train"], h.meta["n_eval"], path)
  _sync("fit_hessian:saved")
  return h


def _producer(meta: store_lib.StoreMeta) -> dict[str, Any]:
  """The fields of an encoding that a Hessian depends on (not the store layout)."""
  d = meta.to_json()
  return {k: d[k] for k in ("dim", "checkpoint", "step", "projection_seed", "blocks", "correction", "extra")}


def retrieve_job(config, workdir: str, *, dataset=None) -> str:
  """The retrieve job: top/bottom-k training examples per query -> results JSONL; returns its path."""
  rc = config.retrieve
  dataset, tokenizer, _, corpus, queries = train_lib.load_data(config, workdir, dataset=dataset)
  encoder, step = load_encoder(config, workdir, tokenizer)
  meta = encoding_meta(config, workdir, encoder, step=step, dataset=dataset, num_rows=len(corpus))
  store = store_lib.open_store(store_url(config, workdir))
  # The store's layout (dtype, chunk_rows) may differ from this config; what produced it may not.
  diff = store_lib.meta_differences(store.meta, dataclasses.replace(meta, dtype=store.meta.dtype,
                                                                    chunk_rows=store.meta.chunk_rows))
  if diff:
    raise store_lib.StoreMismatchError(f"Encoding store {store.url} does not match this config/checkpoint:\n  "
                                       + "\n  ".join(diff) + "\nRe-run launch/encode.py (another store URL).")
  store.require_complete()
  h = None
  if rc.get("use_hessian", True):
    path = hessian_path(config, workdir)
    if not os.path.exists(path):
      raise FileNotFoundError(f"No Hessian at {path}: run launch/fit_hessian.py, or set retrieve.use_hessian=False.")
    h = hessian_lib.Hessian.load(path)
    if h.meta.get("encoding") != _producer(meta):
      raise ValueError(f"Hessian {path} was fit for other encodings than store {store.url}; rerun fit_hessian.")
  normalize = bool(rc.get("normalize", True))
  phi_q = encode_examples(encoder, queries, batch_size=int(config.encoder.batch_size))
  e_q = np.asarray(h.apply(phi_q) if h is not None else phi_q, np.float32)
  if normalize:
    e_q = np.asarray(hessian_lib.normalize(e_q))
  result = retrieval.retrieve(store, e_q, k=int(rc.k), rows_per_chunk=int(rc.chunk_rows), normalize=normalize,
                              inv_sqrt=None if h is None else h.inv_sqrt,
                              matmul_dtype=str(rc.get("matmul_dtype", "bfloat16")))
  out = results_path(config, workdir)
  if jax.process_index() == 0:
    texts = {}
    for row in np.unique(np.concatenate([result.top_rows.ravel(), result.bottom_rows.ravel()])):
      if row >= 0:
        rec = dataset.corpus[int(row)]
        if int(rec["sentence_id"]) != int(corpus.ids[row]):
          raise ValueError(f"Corpus order changed: row {row} is sentence {rec['sentence_id']}, "
                           f"the store has {corpus.ids[row]}.")
        texts[int(rec["sentence_id"])] = rec["text"]
    lines = results_lib.build_results(queries=[dataset.queries[i] for i in range(len(dataset.queries))],
                                      result=result, text_of=texts)
    method = rc.get("method", "") or ("trackstar" if h is not None and normalize else "gradient")
    results_lib.write_results(out, lines, metadata=dict(
        dataset=dataset.name, fingerprint=dataset.fingerprint, num_examples=len(corpus), method=method,
        k=int(rc.k), step=int(step), store=store.url, normalize=normalize,
        hessian_lambda=None if h is None else float(h.lam), correction=meta.correction))
    logging.info("retrieve: %d queries, k=%d -> %s", len(lines), rc.k, out)
  _sync("retrieve:written")
  return out


def write_job_config(config, workdir: str, job: str) -> None:
  """The resolved config of a job as <workdir>/<job>_config.json (process 0)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"{job}_config.json"), "w") as f:
      json.dump(checkpointing.config_to_dict(config), f, indent=2, sort_keys=True)
