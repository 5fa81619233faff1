"""Tokenized examples and (per-host) batches in the package's batch convention.

An example is a token sequence s of length <= seq_len + 1 with
inputs = s[:-1] and targets = s[1:], padded with 0 to seq_len:

  corpus  s = [BOS] + tokens(text) + [EOS]; loss on every real target
          (the text's tokens and EOS).
  query   s = [BOS] + tokens(prompt) + tokens(target); loss only on the target
          tokens (no EOS: the answer is scored, not what follows it).
          prompt_len = 1 + len(tokens(prompt)) (BOS included) and the loss
          covers target positions prompt_len - 1 ... prompt_len + target_len - 2.

Batches are dicts of numpy arrays (see `trackstar_jax.losses`): inputs,
targets [B, T] int32, loss_mask [B, T] float32, pad_mask [B, T] bool,
ids [B] int64 (-1 on padding rows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
from typing import Any

from absl import logging
import numpy as np

from trackstar_jax.batch import BATCH_KEYS, pad_rows


@dataclasses.dataclass
class Examples:
  """N tokenized examples as arrays. inputs/targets/loss_mask/pad_mask: [N, T]."""

  inputs: np.ndarray  # [N, T] int32
  targets: np.ndarray  # [N, T] int32
  loss_mask: np.ndarray  # [N, T] float32
  pad_mask: np.ndarray  # [N, T] bool
  ids: np.ndarray  # [N] int64
  prompt_len: np.ndarray | None = None  # [N] int32, queries only
  target_len: np.ndarray | None = None  # [N] int32, queries only

  def __len__(self) -> int:
    return int(self.ids.shape[0])

  @property
  def seq_len(self) -> int:
    return int(self.inputs.shape[1])

  def num_tokens(self) -> int:
    """Real (non-padding) input tokens."""
    return int(self.pad_mask.sum())

  def select(self, index) -> Examples:
    """Rows `index` (an int array, slice or boolean mask) as new Examples."""
    return Examples(
      **{
        f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
        for f in dataclasses.fields(self)
      }
    )

  def batch(self, index) -> dict[str, np.ndarray]:
    """The batch dict of rows `index`."""
    return {k: getattr(self, k)[index] for k in BATCH_KEYS}


def pack(seqs: Sequence[Sequence[int]], loss_ranges: Sequence[tuple[int, int]], ids, *, seq_len: int) -> Examples:
  """Token sequences (each <= seq_len + 1 long) -> `Examples`, the loss on target positions [lo, hi) of each.

  Example:
    >>> pack([[2, 5, 6, 3]], [(0, 3)], [0], seq_len=4).inputs
    array([[2, 5, 6, 0]], dtype=int32)
  """
  n = len(seqs)
  inputs = np.zeros((n, seq_len), np.int32)
  targets = np.zeros((n, seq_len), np.int32)
  loss_mask = np.zeros((n, seq_len), np.float32)
  pad_mask = np.zeros((n, seq_len), bool)
  for i, (s, (lo, hi)) in enumerate(zip(seqs, loss_ranges)):
    m = len(s) - 1
    if not 1 <= m <= seq_len:
      raise ValueError(f"Sequence {i} has {len(s)} tokens; an example holds 2..{seq_len + 1}.")
    inputs[i, :m] = s[:-1]
    targets[i, :m] = s[1:]
    pad_mask[i, :m] = True
    loss_mask[i, lo:hi] = 1.0
  return Examples(inputs, targets, loss_mask, pad_mask, np.asarray(ids, np.int64).reshape(n))


def tokenize_corpus(
  tokenizer, records: Sequence[dict[str, Any]], *, seq_len: int, overflow: str = "truncate"
) -> Examples:
  """Corpus records -> Examples, loss on every token (and EOS).

  Args:
    tokenizer: a `Tokenizer`.
    records: corpus dicts with `sentence_id` and `text`.
    seq_len: T, the padded length (a sequence holds at most T + 1 tokens).
    overflow: "truncate" (cut long sentences, log how many) or "error".
  """
  if overflow not in ("truncate", "error"):
    raise ValueError(f"overflow must be 'truncate' or 'error', got {overflow!r}.")
  records = list(records)
  ids = [int(r["sentence_id"]) for r in records]
  toks = tokenizer.encode_batch([r["text"] for r in records])
  seqs, too_long = [], []
  for sid, t in zip(ids, toks):
    if not t:
      raise ValueError(f"Corpus sentence {sid} has no tokens (empty text).")
    s = [tokenizer.bos_id] + list(t) + [tokenizer.eos_id]
    if len(s) > seq_len + 1:
      too_long.append(sid)
      s = s[: seq_len + 1]
    seqs.append(s)
  if too_long:
    msg = (
      f"{len(too_long)} of {len(records)} corpus sentences exceed seq_len={seq_len}"
      f" (+BOS/EOS), e.g. sentence ids {too_long[:5]}"
    )
    if overflow == "error":
      raise ValueError(msg + "; raise config.seq_len or use overflow='truncate'.")
    logging.warning("%s: truncated.", msg)
  return pack(seqs, [(0, len(s) - 1) for s in seqs], ids, seq_len=seq_len)


def tokenize_queries(
  tokenizer, records: Sequence[dict[str, Any]], *, seq_len: int, overflow: str = "error"
) -> Examples:
  """Query records -> Examples with the loss on the target tokens only.

  Prompt and target are tokenized separately and concatenated; the target's
  leading space becomes the word-boundary piece, as inside a corpus sentence.

  Args:
    tokenizer: a `Tokenizer`.
    records: query dicts with `query_id`, `prompt`, `target`.
    seq_len: T, the padded length.
    overflow: what to do with a query longer than T + 1 tokens: "error"
      (default: its target would be cut) or "truncate_prompt" (drop prompt
      tokens from the left, keep BOS, the prompt's end and the whole target;
      logged).
  """
  if overflow not in ("error", "truncate_prompt"):
    raise ValueError(f"overflow must be 'error' or 'truncate_prompt', got {overflow!r}.")
  records = list(records)
  ids = [int(r["query_id"]) for r in records]
  prompts = tokenizer.encode_batch([r["prompt"] for r in records])
  targets = tokenizer.encode_batch([r["target"] for r in records])
  seqs, ranges, plen, tlen, cut = [], [], [], [], []
  for qid, p, t in zip(ids, prompts, targets):
    if not t:
      raise ValueError(f"Query {qid} has an empty target.")
    need = 1 + len(p) + len(t)
    if need > seq_len + 1:
      if overflow == "error" or len(t) >= seq_len:
        raise ValueError(
          f"Query {qid} needs {need} tokens (BOS + prompt {len(p)} + target {len(t)}),"
          f" more than seq_len + 1 = {seq_len + 1}: raise config.seq_len"
          + (" or use overflow='truncate_prompt'." if len(t) < seq_len else ".")
        )
      p = p[need - (seq_len + 1) :]
      cut.append(qid)
    s = [tokenizer.bos_id] + list(p) + list(t)
    seqs.append(s)
    ranges.append((len(p), len(p) + len(t)))
    plen.append(1 + len(p))
    tlen.append(len(t))
  if cut:
    logging.warning(
      "%d of %d queries exceed seq_len=%d: prompts cut from the left (query ids %s).",
      len(cut),
      len(records),
      seq_len,
      cut[:10],
    )
  ex = pack(seqs, ranges, ids, seq_len=seq_len)
  ex.prompt_len = np.asarray(plen, np.int32)
  ex.target_len = np.asarray(tlen, np.int32)
  return ex


def num_batches(n: int, *, batch_size: int, pad_last: bool = True) -> int:
  """Global batches per epoch of `n` examples."""
  return -(-n // batch_size) if pad_last else n // batch_size


def iterate_batches(
  examples: Examples,
  *,
  batch_size: int,
  shuffle: bool = False,
  seed: int = 0,
  epochs: int | None = 1,
  process_index: int = 0,
  process_count: int = 1,
  pad_last: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's rows of each global batch.

  Args:
    examples: the examples (every process holds the same `Examples`).
    batch_size: the *global* batch size; each process yields
      batch_size // process_count rows, a disjoint slice of the global batch.
    shuffle: permute the examples every epoch, with a permutation that depends
      only on (seed, epoch), identical on every process.
    seed: shuffle seed.
    epochs: number of passes; None = forever.
    process_index, process_count: this host and the number of hosts.
    pad_last: pad the last partial global batch with padding rows (ids -1,
      zero masks) instead of dropping it.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  n = len(examples)
  per_host = batch_size // process_count
  lo, hi = process_index * per_host, (process_index + 1) * per_host
  epoch = 0
  while epochs is None or epoch < epochs:
    if shuffle:
      order = np.random.default_rng([seed, epoch]).permutation(n)
    else:
      order = np.arange(n)
    for b in range(num_batches(n, batch_size=batch_size, pad_last=pad_last)):
      rows = order[b * batch_size : (b + 1) * batch_size][lo:hi]
      yield pad_rows(examples.batch(rows), per_host)
    if (n == 0 or (not pad_last and n < batch_size)) and epochs is None:
      raise ValueError(f"{n} examples make no batch of {batch_size}: nothing to iterate.")
    epoch += 1
