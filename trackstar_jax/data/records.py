"""Record types shared by the fact datasets (synthetic world, LAMA T-REx).

A fact dataset is two lists of plain dicts:

  corpus   {sentence_id: int, text: str, fact_ids: list[str]}
           one deduplicated training sentence and the facts it states
           (empty for distractors).
  queries  {query_id: int, fact_id: str, relation: str, prompt: str,
            target: str, answers: list[str], gold_sentence_ids: list[int],
            frequency: int}
           a relation prompt that ends right before the object; `target`
           begins with a space, so `prompt + target` reads as a sentence;
           `answers` lists every accepted object (without the space);
           `gold_sentence_ids` are the corpus sentences that state the fact.

Mixed LAMA training (`lama_mixed`) adds `template_fact_ids: list[str]` to
corpus records (the facts a template statement states: not gold) and
`split: "trained" | "heldout"` to queries; other datasets do not have them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import hashlib
from typing import Any

# TFDS version of the builders; bump when the stored records change.
DATASET_VERSION = "1.0.0"

CORPUS_KEYS = ("sentence_id", "text", "fact_ids")
QUERY_KEYS = (
  "query_id",
  "fact_id",
  "relation",
  "prompt",
  "target",
  "answers",
  "gold_sentence_ids",
  "frequency",
)

# Fields only mixed LAMA builds have (see the module docstring).
MIXED_KEYS = {"corpus": ("template_fact_ids",), "queries": ("split",)}


@dataclasses.dataclass
class FactData:
  """A generated or parsed fact dataset held in memory."""

  corpus: list[dict[str, Any]]
  queries: list[dict[str, Any]]

  def fingerprint(self) -> str:
    return corpus_fingerprint(self.corpus)


class SentenceDeduper:
  """Collects sentences, merging identical texts and the facts they state.

  Sentence ids are assigned in order of first appearance, so the corpus order
  follows the order in which sentences were added.
  """

  def __init__(self):
    self._index: dict[str, int] = {}
    self._texts: list[str] = []
    self._facts: list[list[str]] = []

  def add(self, text: str, fact_id: str | None = None) -> int:
    """Adds `text` (stating `fact_id`, or nothing); returns its sentence id."""
    sid = self._index.get(text)
    if sid is None:
      sid = len(self._texts)
      self._index[text] = sid
      self._texts.append(text)
      self._facts.append([])
    if fact_id is not None and fact_id not in self._facts[sid]:
      self._facts[sid].append(fact_id)
    return sid

  def __contains__(self, text: str) -> bool:
    return text in self._index

  def __len__(self) -> int:
    return len(self._texts)

  def records(self, order: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Corpus records; `order` (a permutation of old ids) renumbers them."""
    order = range(len(self._texts)) if order is None else order
    return [
      dict(sentence_id=new, text=self._texts[old], fact_ids=list(self._facts[old])) for new, old in enumerate(order)
    ]


def gold_sentences(corpus: Iterable[dict[str, Any]]) -> dict[str, list[int]]:
  """fact_id -> sorted ids of the corpus sentences stating it."""
  out: dict[str, list[int]] = {}
  for rec in corpus:
    for fid in rec["fact_ids"]:
      out.setdefault(fid, []).append(int(rec["sentence_id"]))
  return {k: sorted(v) for k, v in out.items()}


def corpus_fingerprint(corpus: Iterable[dict[str, Any]]) -> str:
  """sha256 hex over (sentence_id, text) of every corpus record, in order."""
  h = hashlib.sha256()
  for rec in corpus:
    h.update(str(int(rec["sentence_id"])).encode())
    h.update(b"\t")
    h.update(rec["text"].encode("utf-8"))
    h.update(b"\n")
  return h.hexdigest()
