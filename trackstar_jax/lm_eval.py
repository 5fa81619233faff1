"""What a language model answers: query accuracy by fact frequency, and greedy decoding.

  acc = query_accuracy(model.apply, params, query_examples, frequencies=freq)
  acc["accuracy"], acc["by_frequency"][">=3"], acc["correct"]   # [Q] bool
  loss = query_losses(model.apply, params, query_examples)        # [Q] target NLL

`apply_fn(params, inputs [B, T], pad_mask [B, T]) -> logits [B, T, V]` is any
LM's apply function (the project's `DecoderLM.apply`, or a user's).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax import batch as batch_lib
from trackstar_jax import losses

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

# (name, lo, hi) inclusive frequency buckets: how many corpus sentences state the fact.
FREQUENCY_BUCKETS = (("1", 1, 1), ("2", 2, 2), ("3-9", 3, 9), ("10+", 10, None), (">=3", 3, None))
_FIELDS = ("inputs", "targets", "loss_mask", "pad_mask")


@functools.lru_cache(maxsize=8)
def _greedy_fn(apply_fn: ApplyFn, out_sharding):
  return jax.jit(lambda p, x, m: jnp.argmax(apply_fn(p, x, m), axis=-1).astype(jnp.int32), out_shardings=out_sharding)


def _greedy_tokens(apply_fn: ApplyFn, params, inputs, pad_mask):
  # Model-sharded params (several processes): a replicated result, readable on every host.
  s = getattr(jax.tree.leaves(params)[0], "sharding", None)
  out = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()) if hasattr(s, "mesh") else None
  return _greedy_fn(apply_fn, out)(params, inputs, pad_mask)


def query_accuracy(apply_fn: ApplyFn, params, query_examples, *, batch_size: int = 64, frequencies=None) -> dict:
  """Fraction of queries whose greedy answer equals the target.

  A query counts as correct when the teacher-forced argmax equals every
  target token (the positions where `loss_mask` is 1). That is equivalent to
  greedy decoding of the target's length from the prompt: if all argmaxes
  match, greedy decoding reproduces the target token by token; at the first
  mismatch greedy decoding emits a different token.

  Args:
    apply_fn: the LM's apply function (see the module docstring).
    params: its params.
    query_examples: tokenized queries (`data.batching.tokenize_queries`): arrays
      `inputs`, `targets`, `loss_mask`, `pad_mask`, `ids`, one row per query.
    batch_size: rows per forward pass (the last batch is padded).
    frequencies: [N] gold-sentence count of each query's fact (optional);
      gives accuracy per bucket of `FREQUENCY_BUCKETS`.

  Returns:
    dict with `accuracy` (float), `n`, `correct` ([N] bool, per query, in row
    order), `ids` ([N]) and, with frequencies, `by_frequency`
    {bucket: accuracy} and `count_by_frequency` {bucket: n}.
  """
  arrays = {k: np.asarray(getattr(query_examples, k)) for k in _FIELDS}
  n = len(arrays["inputs"])
  correct = np.zeros((n,), bool)
  for start in range(0, n, batch_size):
    m = min(batch_size, n - start)
    chunk = batch_lib.pad_rows({k: v[start : start + m] for k, v in arrays.items()}, batch_size)
    pred = np.asarray(_greedy_tokens(apply_fn, params, chunk["inputs"], chunk["pad_mask"]))
    ok = (pred == chunk["targets"]) | (chunk["loss_mask"] == 0)
    correct[start : start + m] = ok.all(axis=-1)[:m]
  out = dict(
    accuracy=float(correct.mean()) if n else float("nan"), n=n, correct=correct, ids=np.asarray(query_examples.ids)
  )
  if frequencies is not None:
    freq = np.asarray(frequencies)
    if freq.shape != (n,):
      raise ValueError(f"frequencies has shape {freq.shape}; expected one per query ({n},).")
    out["by_frequency"], out["count_by_frequency"] = {}, {}
    for name, lo, hi in FREQUENCY_BUCKETS:
      sel = (freq >= lo) & (freq <= (hi if hi is not None else np.inf))
      out["count_by_frequency"][name] = int(sel.sum())
      out["by_frequency"][name] = float(correct[sel].mean()) if sel.any() else float("nan")
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _example_losses(apply_fn: ApplyFn, stacked: bool, params, batch):
  one = lambda p: losses.example_losses(apply_fn(p, batch["inputs"], batch["pad_mask"]), batch)
  return jax.vmap(one)(params) if stacked else one(params)


def query_losses(apply_fn: ApplyFn, params, query_examples, *, batch_size: int = 64, stacked: bool = False):
  """Each query's target loss L(q), the summed NLL of its answer tokens (`losses.example_losses`).

  Args:
    apply_fn, params: the LM (see the module docstring).
    query_examples: tokenized queries, as for `query_accuracy`.
    batch_size: rows per forward pass (the last batch is padded).
    stacked: `params` holds G models stacked on a leading axis (e.g. trained
      together under `jax.vmap`): every batch goes through all of them at once.

  Returns:
    [Q] float32, or [G, Q] when stacked, in row order.
  """
  arrays = {k: np.asarray(getattr(query_examples, k)) for k in _FIELDS}
  n = len(arrays["inputs"])
  parts = []
  for start in range(0, n, batch_size):
    m = min(batch_size, n - start)
    chunk = batch_lib.pad_rows({k: v[start : start + m] for k, v in arrays.items()}, batch_size)
    parts.append(np.asarray(_example_losses(apply_fn, stacked, params, chunk))[..., :m])
  if not parts:
    lead = (jax.tree.leaves(params)[0].shape[0],) if stacked else ()
    return np.zeros(lead + (0,), np.float32)
  return np.concatenate(parts, axis=-1)


def accuracy_metrics(result: dict, prefix: str = "query_accuracy") -> dict[str, float]:
  """Flat scalar metrics of a `query_accuracy` result (for metrics.jsonl)."""
  out = {prefix: result["accuracy"]}
  for name, acc in result.get("by_frequency", {}).items():
    out[f"{prefix}/freq_{name}"] = acc
  return out


def greedy_decode(
  apply_fn: ApplyFn, params, prompt_tokens: list[int], *, max_len: int, max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
  """Greedy continuation of one prompt in a [1, max_len] buffer (no KV cache: for a few samples only)."""
  tokens = list(prompt_tokens)
  out = []
  for _ in range(max_new_tokens):
    if len(tokens) >= max_len:
      break
    buf = np.zeros((1, max_len), np.int32)
    buf[0, : len(tokens)] = tokens
    mask = np.arange(max_len)[None] < len(tokens)
    nxt = int(np.asarray(_greedy_tokens(apply_fn, params, buf, mask))[0, len(tokens) - 1])
    if eos_id is not None and nxt == eos_id:
      break
    tokens.append(nxt)
    out.append(nxt)
  return out


def sample_answers(
  apply_fn: ApplyFn, params, tokenizer, queries, *, max_len: int, n: int = 5, extra_tokens: int = 2
) -> list[dict]:
  """Greedy answers (decoded text) for the first `n` query records.

  Each query's prompt is encoded with a leading BOS and continued greedily
  for the target's token count + `extra_tokens` (stopping at EOS).

  Returns:
    dicts with prompt, target, answer and `correct` (answer starts with the target).
  """
  rows = []
  for q in list(itertools.islice(iter(queries), n)):
    prompt_ids = [tokenizer.bos_id] + list(tokenizer.encode(q["prompt"]))
    n_target = len(tokenizer.encode(q["target"]))  # tokenized separately, as in tokenize_queries
    new = greedy_decode(
      apply_fn,
      params,
      prompt_ids,
      max_len=max_len,
      max_new_tokens=max(n_target, 1) + extra_tokens,
      eos_id=tokenizer.eos_id,
    )
    answer = tokenizer.decode(new)
    rows.append(
      dict(
        prompt=q["prompt"], target=q["target"], answer=answer, correct=answer.strip().startswith(q["target"].strip())
      )
    )
  return rows
