"""A user's queries: JSONL of prompt and target (+ id and any metadata) -> examples with the loss on the target.

  queries = load_queries("queries.jsonl", tokenizer=tok, seq_len=64)
  results = trackstar_jax.retrieve(encoder=encoder, queries=queries.examples, store=store, k=10)
  records = results.to_records(queries=queries.records, text_of=corpus.text_of)

A query is s = [BOS] + tokens(prompt) + tokens(target) (BOS as the
tokenizer's add_bos says; no EOS: the answer is scored, not what follows it),
with the loss on the target tokens only: the convention of
`data.batching.tokenize_queries`. Prompt and target are tokenized separately,
so a target's leading space is its own word boundary, as inside a sentence.

`records` are the query dicts the results take (`RetrievalResult.to_records`):
query_id (the `id_field` value, default the row number), prompt, target, and
every other field of the line as metadata (fact_id, relation and frequency
reach the results records; the rest stays in `records` for the caller).
`gold_field` names a field listing the ids of documents that support the
answer: with `corpus=`, they become `gold_sentence_ids` (the example ids of
those documents' windows), so the results mark each proponent correct or not;
with a host slice of the corpus the hosts look the documents up together.
Example ids of the query `examples` are the row order 0..Q-1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import numpy as np

from trackstar_jax.data import batching
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import sources as sources_lib
from trackstar_jax.data.batching import Examples


@dataclasses.dataclass
class Queries:
  """Query examples (ids 0..Q-1, prompt_len, target_len) and their records for the results."""

  examples: Examples
  records: list[dict[str, Any]]

  def __len__(self) -> int:
    return len(self.records)


def _text(source, row: int, rec: dict, field: str, what: str) -> str:
  if field not in rec:
    raise ValueError(f"{source.name}, row {row}: no {what} field {field!r} (fields: {sorted(rec)}).")
  v = rec[field]
  if not isinstance(v, str):
    raise ValueError(f"{source.name}, row {row}: {what} field {field!r} must be a string, got {v!r:.80}.")
  return v


def load_queries(
  source: str | sources_lib.Source,
  *,
  tokenizer,
  seq_len: int,
  prompt_field: str = "prompt",
  target_field: str = "target",
  id_field: str | None = "id",
  gold_field: str | None = None,
  corpus: corpus_lib.Corpus | None = None,
  overflow: str = "error",
) -> Queries:
  """Reads queries (JSONL, or any `sources` format) into examples and results records.

  Args:
    source: a path (.jsonl, .parquet, ...), "tfds:NAME" or a `sources.Source`.
    tokenizer: a `tokenizers.TextTokenizer` (the model's).
    seq_len: T, the padded length.
    prompt_field, target_field: the fields holding the prompt and the target.
    id_field: the field with the query id, used when a line has it (else the row number).
    gold_field: a field listing supporting document ids (needs `corpus`).
    corpus: the `data.corpus.Corpus`, to turn `gold_field` into example ids (a host
      slice resolves them collectively: every host calls load_queries).
    overflow: a query longer than T + 1 tokens: "error", or "truncate_prompt"
      (drop prompt tokens from the left; BOS and the whole target are kept).

  Returns:
    `Queries`: `.examples` (for encode / retrieve) and `.records` (for to_records).

  Example:
    >>> queries = load_queries("queries.jsonl", tokenizer=tok, seq_len=16)
    >>> queries.records[0]
    {'query_id': 'q1', 'prompt': 'The cat sat on the', 'target': ' mat', 'relation': 'location'}
  """
  if overflow not in ("error", "truncate_prompt"):
    raise ValueError(f"overflow must be 'error' or 'truncate_prompt', got {overflow!r}.")
  if gold_field is not None and corpus is None:
    raise ValueError(f"gold_field={gold_field!r} names document ids: pass corpus= to map them to example ids.")
  src = source if isinstance(source, sources_lib.Source) else sources_lib.open_source(source)
  bos = [tokenizer.bos_id] if tokenizer.add_bos else []
  seqs, ranges, plen, tlen, records, gold, cut, seen = [], [], [], [], [], [], [], {}
  for row, rec in src.rows():
    prompt = _text(src, row, rec, prompt_field, "prompt")
    target = _text(src, row, rec, target_field, "target")
    p, t = tokenizer.encode(prompt), tokenizer.encode(target)
    if not target.strip() or not t:
      raise ValueError(f"{src.name}, row {row}: the target is empty ({target!r}): there is nothing to attribute.")
    if not bos and not p:
      raise ValueError(
        f"{src.name}, row {row}: an empty prompt and no BOS token: the first target token has no input to follow."
      )
    qid = rec[id_field] if id_field is not None and rec.get(id_field) is not None else row
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
      raise ValueError(f"{src.name}, row {row}: query id {qid!r} must be an int or a string.")
    if qid in seen:
      raise ValueError(f"{src.name}, row {row}: query id {qid!r} already used by row {seen[qid]}.")
    seen[qid] = row
    need = len(bos) + len(p) + len(t)
    if need > seq_len + 1:
      keep = seq_len + 1 - len(bos) - len(t)
      if overflow == "error" or keep < (0 if bos else 1):
        raise ValueError(
          f"{src.name}, row {row}: query {qid!r} has {need} tokens, more than seq_len + 1 = {seq_len + 1}"
          + ("; raise seq_len or use overflow='truncate_prompt'." if overflow == "error" else " for its target alone.")
        )
      p = p[len(p) - keep :] if keep else []
      cut.append(qid)
    seqs.append(bos + p + t)
    ranges.append((len(bos) + len(p) - 1, len(bos) + len(p) + len(t) - 1))
    plen.append(len(bos) + len(p))
    tlen.append(len(t))
    meta = {k: v for k, v in rec.items() if k not in (prompt_field, target_field, id_field, gold_field)}
    records.append({**meta, "query_id": qid, "prompt": prompt, "target": target})
    if gold_field is not None:
      gold.append((row, _doc_ids(rec.get(gold_field))))
  if not records:
    raise ValueError(f"{src.name} holds no queries.")
  if gold_field is not None:
    _resolve_gold(src, records, gold, corpus)
  if cut:
    logging.warning("load_queries: %d of %d queries cut from the left (ids %s).", len(cut), len(records), cut[:10])
  examples = batching.pack(seqs, ranges, np.arange(len(seqs)), seq_len=seq_len)
  examples.prompt_len = np.asarray(plen, np.int32)
  examples.target_len = np.asarray(tlen, np.int32)
  logging.info("load_queries: %d queries from %s.", len(records), src.name)
  return Queries(examples=examples, records=records)


def _doc_ids(v) -> list:
  if v is None:
    return []
  return [v] if isinstance(v, (str, int)) else list(v)


def _resolve_gold(source, records: list[dict], gold: list[tuple[int, list]], corpus) -> None:
  """Sets each record's gold_sentence_ids: the example ids of its gold documents' windows, in the order named.

  One look-up of every named document (`Corpus.example_ids_of_each`: collective
  on a host slice, so every host resolves every query); a document in no
  host's slice is refused, naming the file, row and corpus.
  """
  wanted = list(dict.fromkeys(d for _, docs in gold for d in docs))
  found = dict(zip(wanted, corpus.example_ids_of_each(wanted)))
  for record, (row, docs) in zip(records, gold):
    ids = []
    for d in docs:
      if not found[d]:
        raise ValueError(f"{source.name}, row {row}: gold document {d!r} is not in the corpus {corpus.stats.source}.")
      ids.extend(found[d])
    record["gold_sentence_ids"] = ids
