"""Mixed training for LAMA T-REx: statements in the query's form for part of the facts.

A model trained only on the evidence sentences memorises them but does not
answer the template prompt ("X died in"), which never occurs in its corpus.
Mixed training (Allen-Zhu & Li, "Physics of Language Models 3.1") makes the
knowledge extractable: for a random `fraction` of the facts of each relation
("trained" facts) the corpus also holds statements in the query's own form,
and the evaluation is on the other facts ("heldout"), which appear only in
their evidence sentences.

  split       per fact, a hash of (seed, relation, fact id) below `fraction`:
              deterministic, independent of the other facts read, and nested
              (the trained facts at 0.3 are trained at 0.5 too).
  patterns    per relation: the query template first, then ParaRel's, LPAQA's
              paraphrases, LPAQA's mined prompts (`lama.PATTERN_SOURCES`), each
              with [X] before [Y], distinct by the prompt they give (the text
              before [Y]). Candidates: the template and every ParaRel pattern,
              topped up from LPAQA in that order only as far as `paraphrases`
              needs (LPAQA's prompts often change the meaning: P20 "born in").
  statements  per trained fact, `paraphrases` distinct ones: the template, then
              the other candidates in a per-fact random order, filled with the
              subject and target object ("Ann died at Paris."); one that is
              already an evidence sentence, or holds a held-out query's prompt +
              answer verbatim, is skipped for the next pattern. They follow
              the evidence sentences in the corpus, shuffled, with
              `fact_ids` = [] and the fact in `template_fact_ids`: never gold.
  queries     the template prompt as without mixing, with `split`; by default
              only the held-out facts' (`queries="heldout"`, renumbered).

With `fraction` 0 `lama.read_lama` returns today's dataset, record for record.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import hashlib
import json
import os
import random
import re
from typing import Any

from absl import logging

from trackstar_jax.data import lama, records

TRAINED, HELDOUT = "trained", "heldout"
QUERY_SETS = ("heldout", "all")


@dataclasses.dataclass(frozen=True)
class MixedOptions:
  """Mixed-training options of the lama_trex dataset (config `lama_mixed.*`, `lama_queries`).

  Attributes:
    fraction: share of each relation's facts that get template statements
      (0 = no mixing: today's dataset; 0.5 = the experiment).
    paraphrases: distinct patterns (statements) per trained fact, the query
      template included.
    seed: of the split, the per-fact pattern order and the statement order.
    queries: "heldout" (queries of held-out facts only) or "all".
  """

  fraction: float = 0.0
  paraphrases: int = 5
  seed: int = 0
  queries: str = "heldout"

  def __post_init__(self):
    if not 0.0 <= float(self.fraction) <= 1.0:
      raise ValueError(f"lama_mixed.fraction={self.fraction!r} must be in [0, 1] (0 = no mixing, 0.5 = half).")
    if int(self.paraphrases) != self.paraphrases or self.paraphrases < 1:
      raise ValueError(f"lama_mixed.paraphrases={self.paraphrases!r} must be an integer >= 1 (the template counts).")
    if self.queries not in QUERY_SETS:
      raise ValueError(f"lama_queries={self.queries!r} must be one of {QUERY_SETS}.")
    if self.fraction == 1.0 and self.queries == "heldout":
      raise ValueError("lama_mixed.fraction=1 leaves no held-out facts to query: lower it or set lama_queries='all'.")

  @property
  def active(self) -> bool:
    return self.fraction > 0

  def key(self) -> dict[str, Any]:
    return dict(
      fraction=float(self.fraction), paraphrases=int(self.paraphrases), seed=int(self.seed), queries=self.queries
    )

  def name(self) -> str:
    """ "" when inactive (the unmixed build's name), else "_mix<hash of the options>"."""
    if not self.active:
      return ""
    return "_mix" + hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:10]


def options_from_config(config) -> MixedOptions:
  """The `MixedOptions` of a job config (`config.lama_mixed.{fraction,paraphrases,seed}`, `config.lama_queries`)."""
  m = config.lama_mixed
  return MixedOptions(
    fraction=float(m.fraction), paraphrases=int(m.paraphrases), seed=int(m.seed), queries=str(config.lama_queries)
  )


def _unit(*parts) -> float:
  """A uniform number in [0, 1) from a hash of `parts`."""
  digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def fact_split(fact_id: str, *, relation: str, options: MixedOptions) -> str:
  """TRAINED or HELDOUT: a hash of (seed, relation, fact id) against `options.fraction`."""
  return TRAINED if _unit("split", options.seed, relation, fact_id) < options.fraction else HELDOUT


def normalize_pattern(pattern: str) -> str:
  """Collapses whitespace and the space before punctuation: "[X] , who died in [Y] ." -> "[X], who died in [Y].\""""
  return re.sub(r"\s+([.,;:!?])", r"\1", " ".join(pattern.split()))


def pattern_prompt(pattern: str) -> str | None:
  """The prompt a pattern gives (its text before [Y], normalized), or None if unusable.

  Usable: exactly one [X] and one [Y], [X] before [Y], and a word besides [X]
  before [Y] ("[X] [Y]." states nothing). Text after [Y] is kept in the
  statement ("[X] plays [Y] music." -> "Ann plays jazz music.").
  """
  pattern = normalize_pattern(pattern)
  head, sep, tail = pattern.partition("[Y]")
  if not sep or "[Y]" in tail or head.count("[X]") != 1 or "[X]" in tail:
    return None
  if not re.search(r"[^\W\d_]", head.replace("[X]", "")):
    return None
  return head.rstrip()


def fill_pattern(pattern: str, subject: str, obj: str) -> str:
  """The statement of `pattern` for (subject, object), ending in punctuation."""
  head, _, tail = normalize_pattern(pattern).partition("[Y]")
  text = head.replace("[X]", subject) + obj + tail
  return text if text.endswith((".", "!", "?")) else text + "."


def read_patterns(manual_dir: str, relation: str) -> list[tuple[str, str]]:
  """(source dir, pattern) of `relation` from `lama.PATTERN_SOURCES`, in file order; absent files are skipped."""
  out = []
  for directory, field in lama.PATTERN_SOURCES:
    path = os.path.join(manual_dir, directory, f"{relation}.jsonl")
    if not os.path.isfile(path):
      continue
    for lineno, obj in lama._read_jsonl(path):  # pylint: disable=protected-access
      pattern = obj.get(field)
      if not isinstance(pattern, str):
        raise ValueError(f"{path}, line {lineno}: missing string field {field!r}.")
      out.append((directory, pattern))
  return out


def candidate_patterns(template: str, patterns: Iterable[tuple[str, str]], *, n: int, relation: str = "?") -> list[str]:
  """The patterns statements of `relation` are drawn from: the template first (see module docstring).

  Raises:
    ValueError: fewer than `n` distinct usable patterns.
  """
  pool, seen = [], set()
  n_curated = 0
  for source, pattern in [("template", template)] + list(patterns):
    prompt = pattern_prompt(pattern)
    if prompt is None or prompt in seen:
      continue
    seen.add(prompt)
    pool.append(normalize_pattern(pattern))
    if source in ("template", lama.PATTERN_SOURCES[0][0]):
      n_curated = len(pool)
  if len(pool) < n:
    dirs = ", ".join(f"{d}/{relation}.jsonl" for d, _ in lama.PATTERN_SOURCES)
    raise ValueError(
      f"Relation {relation} has {len(pool)} distinct usable patterns ([X] before [Y]; in the template and {dirs}),"
      f" fewer than lama_mixed.paraphrases={n}: lower lama_mixed.paraphrases (one value for every relation) or add"
      " patterns to those files."
    )
  return pool[: max(n, n_curated)]


class _Occurrences:
  """Does a text contain one of a set of strings verbatim? (An index by the strings' first characters.)"""

  _K = 6

  def __init__(self, needles: Iterable[str]):
    self._by_prefix: dict[str, list[str]] = {}
    self._short: list[str] = []
    for s in set(needles):
      if len(s) < self._K:
        self._short.append(s)
      else:
        self._by_prefix.setdefault(s[: self._K], []).append(s)

  def find(self, text: str) -> str | None:
    for i in range(len(text) - self._K + 1):
      for s in self._by_prefix.get(text[i : i + self._K], ()):
        if text.startswith(s, i):
          return s
    return next((s for s in self._short if s in text), None)


def heldout_query_strings(facts: Iterable[dict[str, Any]]) -> list[str]:
  """prompt + " " + answer for every answer of every held-out fact: strings no statement may contain."""
  return [f["prompt"] + " " + a for f in facts if f["split"] == HELDOUT for a in f["answers"]]


def add_statements(parsed: lama.ParsedEvidences, *, manual_dir: str, options: MixedOptions) -> records.FactData:
  """The mixed dataset from `lama.parse_evidences`'s output (see module docstring)."""
  facts = [
    dict(f, split=fact_split(f["fact_id"], relation=f["relation"], options=options)) for f in parsed.facts.values()
  ]
  candidates = {
    rel: candidate_patterns(parsed.templates[rel], read_patterns(manual_dir, rel), n=options.paraphrases, relation=rel)
    for rel in parsed.relations
  }
  forbidden = _Occurrences(heldout_query_strings(facts))
  dedup = parsed.dedup
  statements: dict[str, list[str]] = {}  # text -> the trained facts it states, in first-seen order
  n_short = n_skipped = 0
  for f in facts:
    if f["split"] != TRAINED:
      continue
    pool = candidates[f["relation"]]
    rng = random.Random(f"{options.seed}\0patterns\0{f['fact_id']}")
    order = [0] + rng.sample(range(1, len(pool)), len(pool) - 1)
    subject, obj = f["subject"], f["target"][1:]
    mine = []
    for i in order:
      if len(mine) == options.paraphrases:
        break
      text = fill_pattern(pool[i], subject, obj)
      if text in dedup or text in mine or forbidden.find(text) is not None:
        n_skipped += 1
        continue
      mine.append(text)
    n_short += len(mine) < options.paraphrases
    for text in mine:
      statements.setdefault(text, []).append(f["fact_id"])

  n_evidence = len(dedup)
  texts = sorted(statements)  # a fixed order before the seeded shuffle (not dict order)
  random.Random(f"{options.seed}\0corpus").shuffle(texts)
  template_ids: dict[int, list[str]] = {}
  for text in texts:
    template_ids[dedup.add(text)] = statements[text]
  corpus = dedup.records()
  for rec in corpus:
    rec["template_fact_ids"] = template_ids.get(rec["sentence_id"], [])
  gold = records.gold_sentences(corpus)  # `fact_ids` only: the evidence sentences

  queries = []
  for f in facts:
    if options.queries == "heldout" and f["split"] != HELDOUT:
      continue
    ids = gold.get(f["fact_id"], [])
    q = dict(query_id=len(queries), **lama.query_fields(f), split=f["split"], gold_sentence_ids=ids, frequency=len(ids))
    queries.append(q)
  for rel in parsed.relations:
    n_rel = sum(f["relation"] == rel for f in facts)
    n_tr = sum(f["relation"] == rel and f["split"] == TRAINED for f in facts)
    logging.info(
      "LAMA mixed %s: %d of %d facts trained, %d candidate patterns.", rel, n_tr, n_rel, len(candidates[rel])
    )
  logging.info(
    "LAMA T-REx mixed (%s) from %s: %d evidence sentences + %d template statements; %d queries (%s);"
    " %d statements skipped (evidence duplicates or held-out query strings), %d trained facts with fewer than %d.",
    options.key(),
    manual_dir,
    n_evidence,
    len(texts),
    len(queries),
    options.queries,
    n_skipped,
    n_short,
    options.paraphrases,
  )
  return records.FactData(corpus=corpus, queries=queries)
