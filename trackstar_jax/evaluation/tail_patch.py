"""Tail-patch: the causal influence of retrieved proponents on a query.

For a query q = (prompt, target) and a proponent z, take ONE step of the
model's own optimizer, from the checkpoint's params θ and optimizer state s, on
z alone with the training loss (mean token NLL, as in training):

  g = ∇θ L_train(z; θ),  (u, _) = opt.update(g, s, θ),  θ' = θ + u

and measure the change of the target's sequence probability given the prompt,
p(q; θ) = exp(-Σ_{target tokens} NLL):

  Δp = p(q; θ') - p(q; θ)        (absolute)
  Δp / p(q; θ)                  (relative)

Δp is computed as p · expm1(log p' - log p), exact in float32 even when Δp is
far below p. The optimizer should be the model's training optimizer at a
constant learning rate equal to the schedule's final value, e.g.
`trackstar_jax.optim.make_optimizer(train_cfg, learning_rate=final_lr)`.
Its state tree must match the restored `opt_state` (optax's state differs
between a float and a schedule learning rate). Passing the *training*
optimizer itself with its restored state is equivalent at the last
checkpoint: the schedule is then evaluated at the checkpoint's step.

Every proponent of a query is patched separately from the same (θ, s): the
step is `vmap`ped over the K proponents and over a chunk of queries, jitted
once per chunk shape. Memory: chunk × K copies of params + optimizer updates,
so lower `query_chunk` for larger models.

Works for any model whose `apply_fn(params, inputs [B,T], pad_mask [B,T]) ->
logits [B,T,V]` (e.g. `DecoderLM.apply` with params = {"params": ...}), any
optax optimizer and its state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

from absl import logging
import jax
import numpy as np
import optax

from trackstar_jax import losses
from trackstar_jax import progress as progress_lib

BATCH_KEYS = ("inputs", "targets", "loss_mask", "pad_mask")
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def _one(ex: Mapping[str, jax.Array]) -> dict:
  """Adds a batch axis of 1 to a single example."""
  return {k: ex[k][None] for k in BATCH_KEYS}


def target_log_prob(apply_fn: ApplyFn, params, query: Mapping[str, jax.Array]) -> jax.Array:
  """log p(target | prompt) of one query example ([T] arrays): -Σ masked NLL."""
  q = _one(query)
  return -losses.example_losses(apply_fn(params, q["inputs"], q["pad_mask"]), q)[0]


def patched_params(
  apply_fn: ApplyFn, optimizer: optax.GradientTransformation, params, opt_state, example: Mapping[str, jax.Array]
):
  """θ' after one optimizer step on `example` alone ([T] arrays)."""
  z = _one(example)

  def loss_fn(p):
    return losses.mean_token_loss(apply_fn(p, z["inputs"], z["pad_mask"]), z)

  grads = jax.grad(loss_fn)(params)
  updates, _ = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates)


def query_tail_patch(apply_fn: ApplyFn, optimizer, params, opt_state, query, proponents):
  """log p before [] and after [K] for one query and its K proponents ([K, T])."""
  logp0 = target_log_prob(apply_fn, params, query)

  def after(z):
    return target_log_prob(apply_fn, patched_params(apply_fn, optimizer, params, opt_state, z), query)

  return logp0, jax.vmap(after)(proponents)


def make_tail_patch_fn(*, apply_fn: ApplyFn, optimizer: optax.GradientTransformation, mesh=None):
  """Jitted fn(params, opt_state, queries [Q,T], proponents [Q,K,T]) -> (logp0 [Q], logp1 [Q,K]).

  Params and optimizer state keep their placement (e.g. model-sharded by `sharding.param_shardings`: the
  patched copies are sharded like them); with `mesh` the outputs are replicated on it (readable on every host).
  """

  def fn(params, opt_state, queries, proponents):
    one = functools.partial(query_tail_patch, apply_fn, optimizer, params, opt_state)
    return jax.vmap(one)(queries, proponents)

  out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(fn, out_shardings=out)


def _rows(examples, name: str) -> dict[str, np.ndarray]:
  """Examples dataclass or dict -> dict of numpy arrays with the batch keys + ids."""
  get = (lambda k: examples[k]) if isinstance(examples, Mapping) else (lambda k: getattr(examples, k))
  try:
    out = {k: np.asarray(get(k)) for k in (*BATCH_KEYS, "ids")}
  except (KeyError, AttributeError) as e:
    raise ValueError(f"{name} lacks field {e}; expected {BATCH_KEYS + ('ids',)}.") from e
  return out


def tail_patch(
  *,
  apply_fn: ApplyFn,
  params,
  opt_state,
  optimizer: optax.GradientTransformation,
  query_examples,
  corpus_examples,
  results: Sequence[Mapping],
  k: int = 10,
  query_chunk: int = 8,
) -> dict[str, np.ndarray]:
  """Tail-patch scores of every query's top-k proponents.

  Args:
    apply_fn: `apply_fn(params, inputs, pad_mask) -> logits`.
    params, opt_state: the checkpoint's params and optimizer state.
    optimizer: the training optimizer at constant final learning rate.
    query_examples: tokenized queries (`Examples` or dict: inputs/targets/
      loss_mask/pad_mask [Q,T], ids [Q] = query_id; loss_mask on the answer).
    corpus_examples: tokenized corpus (same fields; ids = sentence_id).
    results: result dicts (`example_id`, `proponent_ids`), e.g. `load_results`.
    k: proponents per query to patch (fewer if a result has fewer).
    query_chunk: queries per jitted call.

  Returns:
    dict of numpy arrays: query_ids [R], p0 [R], delta_p [R,k], rel_delta_p
    [R,k], valid [R,k] (False where a result had fewer than k proponents).
  """
  qx, cx = _rows(query_examples, "query_examples"), _rows(corpus_examples, "corpus_examples")
  qrow = {int(i): r for r, i in enumerate(qx["ids"]) if i >= 0}
  crow = {int(i): r for r, i in enumerate(cx["ids"]) if i >= 0}
  n = len(results)
  q_idx = np.zeros(n, np.int64)
  p_idx = np.zeros((n, k), np.int64)
  valid = np.zeros((n, k), bool)
  for r, rec in enumerate(results):
    qid = int(rec["example_id"])
    if qid not in qrow:
      raise ValueError(f"Result for query {qid} has no row in query_examples (ids).")
    q_idx[r] = qrow[qid]
    for j, pid in enumerate(rec["proponent_ids"][:k]):
      if int(pid) not in crow:
        raise ValueError(f"Query {qid}: proponent id {pid} has no row in corpus_examples.")
      p_idx[r, j] = crow[int(pid)]
      valid[r, j] = True

  mesh = getattr(getattr(jax.tree.leaves(params)[0], "sharding", None), "mesh", None)  # sharded params' mesh
  fn = make_tail_patch_fn(apply_fn=apply_fn, optimizer=optimizer, mesh=mesh)
  logp0 = np.zeros(n, np.float64)
  logp1 = np.zeros((n, k), np.float64)
  prog = progress_lib.Progress(total=-(-n // query_chunk), unit="step", item_unit="queries", name="tail-patch")
  for start in range(0, n, query_chunk):
    sl = np.arange(start, min(start + query_chunk, n))
    pad = np.concatenate([sl, np.full(query_chunk - len(sl), sl[-1])])  # fixed shape: one compile
    qb = {key: qx[key][q_idx[pad]] for key in BATCH_KEYS}
    pb = {key: cx[key][p_idx[pad]] for key in BATCH_KEYS}
    a, b = jax.device_get(fn(params, opt_state, qb, pb))
    logp0[sl], logp1[sl] = a[: len(sl)], b[: len(sl)]
    prog.update(start // query_chunk + 1, items=len(sl))
    if start == 0:
      prog.mark()  # exclude compilation from the rate
    if prog.due(every_s=30) or sl[-1] + 1 == n:
      logging.info(prog.line())

  rel = np.expm1(logp1 - logp0[:, None])
  p0 = np.exp(logp0)
  return {
    "query_ids": np.asarray([int(r["example_id"]) for r in results]),
    "p0": p0,
    "delta_p": np.where(valid, p0[:, None] * rel, np.nan),
    "rel_delta_p": np.where(valid, rel, np.nan),
    "valid": valid,
  }


def summarize(
  scores: Mapping[str, np.ndarray], *, ks: Sequence[int] = (1, 10), mask: np.ndarray | None = None
) -> dict[str, float]:
  """Mean Δp over the top-k proponents, then over queries, for each k.

  Args:
    scores: output of `tail_patch`.
    ks: proponent cut-offs.
    mask: optional [R] bool selecting queries (e.g. those the model answers).

  Returns:
    {"tail_patch@k": mean Δp, "tail_patch_rel@k": mean Δp/p, "n": #queries}.
  """
  d, r, v = scores["delta_p"], scores["rel_delta_p"], scores["valid"]
  sel = np.ones(len(d), bool) if mask is None else np.asarray(mask, bool)
  out = {"n": int(sel.sum())}
  for k in ks:
    vk = v[sel, :k]
    has = vk.any(axis=1)
    cnt = np.maximum(vk.sum(axis=1), 1)
    per_q_abs = np.where(vk, d[sel, :k], 0.0).sum(axis=1) / cnt
    per_q_rel = np.where(vk, r[sel, :k], 0.0).sum(axis=1) / cnt
    out[f"tail_patch@{k}"] = float(per_q_abs[has].mean()) if has.any() else float("nan")
    out[f"tail_patch_rel@{k}"] = float(per_q_rel[has].mean()) if has.any() else float("nan")
  return out
