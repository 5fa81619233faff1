"""The public attribution API: from a trained model to proponents in four calls.

  encoder = build_encoder(model=model, params=params, opt_state=opt_state)   # Flax LM + its optax state
  encoder = build_encoder(model=nnx_model, opt_state=optimizer.opt_state)    # or an NNX module (carries its params)
  store = encode(encoder, corpus, store="/tmp/enc.zarr")      # phi of every example (resumable, with ETA)
  hessian = fit_hessian(encoder=encoder, train=corpus, queries=queries)      # R^{-1/2}
  results = retrieve(encoder=encoder, queries=queries, store=store, hessian=hessian, k=10)
  results.top_ids, results.top_scores                          # [Q, k] proponents; bottom_* opponents
  results.write_jsonl("results.jsonl", queries=query_records, text_of=texts)   # published schema

`corpus` and `queries` are examples in the batch convention of
`trackstar_jax.batch` (inputs, targets, loss_mask, pad_mask, ids): a
`data.batching.Examples` (`tokenize_corpus` / `tokenize_queries`), one batch
dict, or an iterable of batch dicts. Everything also works on phis you hold
in memory (`encode` without a store, `fit_hessian(train_phi=...)`,
`retrieve(corpus_phi=..., query_phi=...)`, `score`).

Multi-host: every process makes the same calls with the same arguments; each
encodes and writes its own store chunks and reads its own chunks at retrieval.
The jobs (`trackstar_jax.jobs`, `launch/`) are built on these functions.
"""

from __future__ import annotations

from collections.abc import Callable
import sys
from typing import Any

import numpy as np

from trackstar_jax import encoding, projection, retrieval
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import options as opts_lib
from trackstar_jax import store as store_lib
from trackstar_jax.encoder import EncoderOptions, TrackStarEncoder
from trackstar_jax.hessian import Hessian, HessianOptions
from trackstar_jax.retrieval import RetrievalResult

# Examples per encoder call (config field `encoder.batch_size`).
BATCH_SIZE = 64


def _nnx_functional(model: Any, params: Any, call: Callable | None):
  """(apply_fn, params) of a Flax NNX module, or None when `model` is not one."""
  nnx = sys.modules.get("flax.nnx")  # not imported: `model` cannot be an NNX module (no import cost for Linen)
  if nnx is None or not isinstance(model, nnx.Module):
    return None
  from trackstar_jax import nnx_adapter  # pylint: disable=g-import-not-at-top

  apply_fn, own = nnx_adapter.functional(model=model, call=call)
  if params is None:
    return apply_fn, own
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  want, got = set(projection.flatten_paths(own)), set(projection.flatten_paths(params))
  if want != got:
    raise ValueError(
      f"params= do not match the parameters of the NNX module {type(model).__name__}: missing"
      f" {sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]}. Pass nnx.state(model, nnx.Param)"
      " (or its nnx.to_pure_dict), or leave params= out to use the module's own values."
    )
  return apply_fn, params


def build_encoder(
  *,
  params: Any = None,
  model: Any = None,
  apply_fn: Callable | None = None,
  opt_state: Any = None,
  loss_fn: Callable | None = None,
  call: Callable | None = None,
  mesh=None,
  config: Any = None,
  seq_len: int = 8,
  param_sharding: Any = None,
  **options,
) -> TrackStarEncoder:
  r"""A `TrackStarEncoder`: per-example projected, optimizer-corrected gradients of an LM.

  Args:
    params: the model's variables (e.g. `{"params": ...}` for Linen). For an
      NNX `model`, optional: default the module's own `nnx.Param` values.
    model: a Flax Linen module called as `model.apply(params, inputs, pad_mask)`
      -> logits [B, T, V]; or a Flax NNX module (its `nnx.Linear`,
      `nnx.LinearGeneral`, `nnx.Einsum` layers are traced; the module is not
      modified; parameter paths are its attribute paths, `layers/0/attn/query/kernel`);
      or give `apply_fn` with that signature, or `loss_fn`.
    apply_fn: `(params, inputs [B, T], pad_mask [B, T]) -> logits [B, T, V]`.
    opt_state: the optax state the model was trained with (Adam, AdamW,
      Adafactor, in any chain; an `nnx.Optimizer` or its `opt_state`; or the
      same state restored from a checkpoint as plain dicts): its second moments
      correct the gradients.
    loss_fn: `(params, batch) -> [B]` per-example losses, instead of the summed
      masked next-token NLL of the logits.
    call: NNX only: `(module, inputs [B, T], pad_mask [B, T]) -> logits`;
      default `module(inputs)` (enough for a causal LM: padding comes last).
    mesh: a `jax.sharding.Mesh` with a "data" axis (default: all devices).
    config: a ConfigDict / mapping of `EncoderOptions` fields (e.g. `config.encoder`).
    seq_len: sequence length of the one abstract trace (shapes only).
    param_sharding: a Sharding (or pytree of them) for params too large to replicate.
    **options: `EncoderOptions` fields: d_in, d_out (per-block projection),
      correction ("auto" | "none" | "adam" | "adam_rank1" | "adafactor"),
      param_regex, layers_per_group, seed, ...; they override `config`.

  Example:
    >>> encoder = build_encoder(model=model, params=params, opt_state=opt_state, d_in=4, d_out=4)
    >>> encoder.dim, encoder.correction.kind
    (64, 'adam')

    An NNX model carries its params; name its kernels and blocks by its own attribute paths
    (colabs/bring_your_own_model.ipynb):

      optimizer = nnx.Optimizer(nnx_model, optax.adamw(1e-3), wrt=nnx.Param)   # ... trained
      encoder = build_encoder(model=nnx_model, opt_state=optimizer.opt_state,
                              param_regex=r"layers/\d+/.*/kernel$", block_regex=r"layers/(?P<layer>\d+)/")
  """
  if model is not None and apply_fn is not None:
    raise ValueError("Pass model= or apply_fn=, not both.")
  nnx_fns = _nnx_functional(model, params, call) if model is not None else None
  if nnx_fns is not None:
    apply_fn, params = nnx_fns
  elif call is not None:
    raise ValueError("call= is for Flax NNX modules (model=<nnx.Module>); a Linen model is called as model.apply.")
  elif model is not None:
    if not hasattr(model, "apply"):
      raise ValueError(
        f"model= must be a Flax Linen module (with .apply) or a Flax NNX module, got {type(model).__name__};"
        " for another model give apply_fn=(params, inputs, pad_mask) -> logits."
      )
    apply_fn = model.apply
  if apply_fn is None and loss_fn is None:
    raise ValueError("build_encoder needs the model: model=, apply_fn= or loss_fn=.")
  if params is None:
    raise ValueError("build_encoder needs params= (only an NNX model= carries its own).")
  opts = opts_lib.from_config(EncoderOptions, config, ignore=("batch_size", "step"), **options)
  return TrackStarEncoder(
    model_apply=apply_fn,
    params=params,
    options=opts,
    opt_state=opt_state,
    loss_fn=loss_fn,
    mesh=mesh,
    seq_len=seq_len,
    param_sharding=param_sharding,
  )


def encode(
  encoder: TrackStarEncoder,
  examples: Any,
  *,
  store: str | None = None,
  batch_size: int = BATCH_SIZE,
  dtype: str = store_lib.StoreMeta.dtype,
  chunk_rows: int = store_lib.StoreMeta.chunk_rows,
  provenance: dict[str, Any] | None = None,
):
  """phi of every example: into an encoding store (resumable), or into memory.

  Args:
    encoder: from `build_encoder`.
    examples: `data.batching.Examples`, a batch dict or an iterable of batch
      dicts (rows with id -1 are padding and are dropped).
    store: a store URL (local path, file://, gs://, memory://): phi is written
      there chunk by chunk; an interrupted call resumes where it stopped, and a
      store made from other examples or another encoder is refused. None:
      return phi [N, d] float32 in memory.
    batch_size: examples per encoder call (global, over all devices and hosts).
    dtype, chunk_rows: the store's element type and rows per chunk: bfloat16 |
      float32 | int8 (a float32 scale per row: 2x smaller than bfloat16) | int4
      (a scale per 128 columns: 3.8x smaller), quantized on the device (`quantize`).
    provenance: fields recorded in (and checked against) the store's metadata:
      `checkpoint`, `step`, `corpus_fingerprint` (default: a hash of the
      examples' tokens), `extra` (a dict).

  Returns:
    The complete `EncodingStore`, or a numpy array [N, d] when `store` is None.

  Example:
    >>> phi = encode(encoder, corpus)
    >>> phi.shape
    (40, 64)
    >>> enc_store = encode(encoder, corpus, store="memory://doc/enc.zarr", chunk_rows=16)
    >>> enc_store.num_rows, enc_store.is_complete()
    (40, True)
  """
  examples = encoding.as_examples(examples)
  if store is None:
    return encoding.encode_to_array(encoder, examples, batch_size=batch_size)
  prov = dict(provenance or {})
  unknown = set(prov) - {"checkpoint", "step", "corpus_fingerprint", "extra"}
  if unknown:
    raise ValueError(
      f"Unknown provenance fields {sorted(unknown)}; known: checkpoint, step, corpus_fingerprint, extra."
    )
  if "corpus_fingerprint" not in prov:
    prov["corpus_fingerprint"] = encoding.fingerprint(examples)
  meta = encoding.store_meta(encoder, num_rows=len(examples), dtype=dtype, chunk_rows=chunk_rows, **prov)
  opened = encoding.open_or_create(store, meta)
  return encoding.encode_to_store(encoder, examples, store=opened, batch_size=batch_size)


def _phis(encoder, examples, phi, *, batch_size: int, what: str, name: str = "encode"):
  """Encoded batches of `examples` (streamed; several processes: each encodes its share), or the given phi."""
  if phi is not None:
    if examples is not None:
      raise ValueError(f"Pass {what} examples or their phi, not both.")
    return np.asarray(phi)
  if examples is None:
    return None
  if encoder is None:
    raise ValueError(f"Encoding {what} examples needs encoder=.")

  # Streamed into R batch by batch: no [N, d] phi on any host or device (several processes: per-device
  # partial sums, reduced once; see hessian.second_moment).
  return encoding.phi_batches(encoder, examples, batch_size=batch_size, name=name)


def fit_hessian(
  *,
  encoder: TrackStarEncoder | None = None,
  train: Any = None,
  queries: Any = None,
  train_phi: Any = None,
  query_phi: Any = None,
  batch_size: int = BATCH_SIZE,
  config: Any = None,
  **options,
) -> Hessian:
  """R^{-1/2}, the Hessian approximation of TrackStar, from training examples and queries.

  R_train comes from `train` (a sample of the corpus; or `train_phi`), R_eval
  from `queries` (or `query_phi`), mixed as lam R_eval + (1 - lam) R_train with
  the lambda rule of the paper (`mixed=False`: R_train alone).

  Args:
    encoder: encodes `train` / `queries` (not needed for phis).
    train, queries: examples (as for `encode`).
    train_phi, query_phi: [N, d] raw phis instead.
    batch_size: examples per encoder call.
    config: a ConfigDict / mapping of `HessianOptions` fields (e.g. `config.hessian`).
    **options: `HessianOptions` fields (mixed, top_k_eig, damping,
      block_diagonal, dtype); they override `config`.

  Example:
    >>> hessian = fit_hessian(encoder=encoder, train=corpus, queries=queries, top_k_eig=8)
    >>> hessian.inv_sqrt.shape, 0.0 <= hessian.lam <= 1.0
    ((64, 64), True)
  """
  opts = opts_lib.from_config(HessianOptions, config, ignore=hessian_lib.JOB_FIELDS, **options)
  train_src = _phis(encoder, train, train_phi, batch_size=batch_size, what="train", name="fit_hessian R_train")
  if train_src is None:
    raise ValueError("fit_hessian needs training examples (train=) or their phi (train_phi=).")
  query_src = (
    _phis(encoder, queries, query_phi, batch_size=batch_size, what="query", name="fit_hessian R_eval")
    if opts.mixed
    else None
  )
  n_blocks = len(encoder.blocks) if encoder is not None else 1
  if opts.block_diagonal and encoder is None:
    raise ValueError("A block-diagonal R needs encoder= (for the block layout of phi).")
  return hessian_lib.fit_hessian(train_phi=train_src, eval_phi=query_src, options=opts, n_blocks=n_blocks)


def _query_encodings(encoder, queries, query_phi, *, hessian, normalize: bool, batch_size: int) -> np.ndarray:
  if (queries is None) == (query_phi is None):
    raise ValueError("Pass queries= (with encoder=) or query_phi=.")
  if query_phi is None:
    if encoder is None:
      raise ValueError("Encoding queries needs encoder=.")
    query_phi = encoding.encode_to_array(encoder, encoding.as_examples(queries), batch_size=batch_size)
  inv = None if hessian is None else hessian.inv_sqrt
  return np.asarray(hessian_lib.transform(query_phi, inv, normalize_rows=normalize), np.float32)


def _corpus(store, corpus_phi, corpus_ids):
  if (store is None) == (corpus_phi is None):
    raise ValueError("Pass store= (a URL or EncodingStore) or corpus_phi= (with optional corpus_ids=).")
  if corpus_phi is not None:
    return retrieval.InMemoryEncodings(corpus_phi, corpus_ids)
  if corpus_ids is not None:
    raise ValueError("corpus_ids= goes with corpus_phi=; a store has its own ids.")
  return store_lib.open_store(store) if isinstance(store, str) else store


_STREAMING_OPTIONS = (
  "select",
  "cache_norms",
  "reads_in_flight",
  "transfers_ahead",
  "pinned",
  "copy_piece_mib",
  "pinned_reads",
  "mapped_reads",
)


def retrieve(
  *,
  encoder: TrackStarEncoder | None = None,
  queries: Any = None,
  query_phi: Any = None,
  store: Any = None,
  corpus_phi: Any = None,
  corpus_ids: Any = None,
  hessian: Hessian | None = None,
  k: int = retrieval.RetrieveOptions.k,
  normalize: bool = retrieval.RetrieveOptions.normalize,
  matmul_dtype: str = retrieval.RetrieveOptions.matmul_dtype,
  chunk_rows: int = retrieval.RetrieveOptions.chunk_rows,
  batch_size: int = BATCH_SIZE,
  mesh=None,
  **streaming,
) -> RetrievalResult:
  """Exact top-k proponents and bottom-k opponents of every query, over the whole corpus.

  score(q, z) = e_q . e_z with e = R^{-1/2} phi / ||R^{-1/2} phi|| (TrackStar);
  without `hessian` a cosine of phis; `normalize=False` a raw dot product.

  Args:
    encoder: encodes `queries` (not needed with `query_phi`).
    queries: query examples (loss on the target tokens only; see
      `data.batching.tokenize_queries`), or `query_phi` [Q, d].
    store: the corpus encodings (URL or `EncodingStore` from `encode`), or
      `corpus_phi` [N, d] in memory with `corpus_ids` [N] (default 0..N-1).
    hessian: from `fit_hessian`, or None.
    k: proponents and opponents per query (clamped to the corpus size).
    normalize, matmul_dtype: cosine vs dot product; bf16 (fast) vs float32 scores.
    chunk_rows: corpus rows scored per step and host (memory: Q x chunk_rows scores).
    batch_size: queries per encoder call.
    mesh: this host's devices (default: all local devices).
    **streaming: `select`, `cache_norms`, `reads_in_flight`, `transfers_ahead`,
      `pinned`, `copy_piece_mib`, `pinned_reads`, `mapped_reads` (how the scan runs, not what it returns: see
      `RetrieveOptions`).

  Returns:
    A `RetrievalResult`: `top_ids`, `top_scores`, `bottom_ids`, ... [Q, k];
    `.to_arrays()`, `.to_records(...)`, `.write_jsonl(...)`.

  Example:
    >>> results = retrieve(encoder=encoder, queries=queries, store=enc_store, hessian=hessian, k=3)
    >>> results.top_ids.shape, bool((np.diff(results.top_scores, axis=1) <= 0).all())
    ((4, 3), True)
  """
  unknown = sorted(set(streaming) - set(_STREAMING_OPTIONS))
  if unknown:
    raise TypeError(f"retrieve() got unknown options {unknown}; the streaming options are {list(_STREAMING_OPTIONS)}.")
  source = _corpus(store, corpus_phi, corpus_ids)
  options = {"mapped_reads": retrieval.RetrieveOptions.mapped_reads, **streaming}
  # The store's windows are registered while the queries are encoded (`mapped_chunks`; CUDA only).
  retrieval.map_store_ahead(source, rows_per_chunk=chunk_rows, mesh=mesh, mapped_reads=options["mapped_reads"])
  e_q = _query_encodings(encoder, queries, query_phi, hessian=hessian, normalize=normalize, batch_size=batch_size)
  return retrieval.retrieve(
    source,
    e_q,
    k=k,
    rows_per_chunk=chunk_rows,
    mesh=mesh,
    inv_sqrt=None if hessian is None else hessian.inv_sqrt,
    normalize=normalize,
    matmul_dtype=matmul_dtype,
    **streaming,
  )


def score(
  *,
  encoder: TrackStarEncoder | None = None,
  queries: Any = None,
  examples: Any = None,
  query_phi: Any = None,
  example_phi: Any = None,
  hessian: Hessian | None = None,
  normalize: bool = True,
  batch_size: int = BATCH_SIZE,
) -> np.ndarray:
  """Scores of a few (query, example) pairs directly: [Q, N] float32, no store and no top-k.

  The same score as `retrieve`, in float32 (for inspecting pairs, not corpora).

  Example:
    >>> s = score(encoder=encoder, queries=queries, examples=corpus, hessian=hessian)
    >>> s.shape, bool(np.abs(s).max() <= 1.0 + 1e-5)
    ((4, 40), True)
  """
  e_q = _query_encodings(encoder, queries, query_phi, hessian=hessian, normalize=normalize, batch_size=batch_size)
  if (examples is None) == (example_phi is None):
    raise ValueError("Pass examples= (with encoder=) or example_phi=.")
  if example_phi is None:
    if encoder is None:
      raise ValueError("Encoding examples needs encoder=.")
    example_phi = encoding.encode_to_array(encoder, encoding.as_examples(examples), batch_size=batch_size)
  e_z = hessian_lib.transform(example_phi, None if hessian is None else hessian.inv_sqrt, normalize_rows=normalize)
  return np.asarray(e_q @ np.asarray(e_z).T, np.float32)


__all__ = [
  "build_encoder",
  "encode",
  "fit_hessian",
  "retrieve",
  "score",
  "EncoderOptions",
  "HessianOptions",
  "Hessian",
  "RetrievalResult",
  "TrackStarEncoder",
]
