"""A deterministic synthetic fact world: a corpus with exact ground truth.

People (entities) have one attribute per relation (birthplace, citizenship,
profession, ... 10 relations), each relation with its own object vocabulary.
`n_facts` (person, relation) pairs are *stated* in the corpus, each in
`frequency` distinct sentences; frequencies sit at evenly spaced quantiles of
a discrete power law P(f) ~ f^-zipf_a on [1, max_frequency]: a long tail of
facts stated once or twice, a few stated ~max_frequency times. A sentence
states one fact with one of the relation's corpus phrasings, optionally in a
neutral frame ("In 1931, ...", "..., as the records show."). Distractor
sentences mention people (and objects) without stating any fact.

Corpus phrasings are "{s} <head> <tail> {o}" for every combination of a few
heads ("was born in", "comes from", ...) and tails ("", "the city of", ...)
but one: that held-out combination is the query prompt, e.g. "Tavo Kelrin was
born in the city of" with target " Varnholm". Its string never occurs in the
corpus, while its head and tail each occur with other partners, so a small LM
that stored the fact can answer it. (Measured: the tiny 2-layer LM with a
2048-piece tokenizer answers 97-98% of the facts stated >= 3 times after 1500
steps at batch 64; with 512 pieces, 87-90%.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Any

from absl import logging
import numpy as np

from trackstar_jax.data import records

# Bump when the generator's output changes: it is part of the TFDS config hash.
GENERATOR_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class Relation:
  """How a relation is phrased: "{s} <head> <tail> {o}" plus `extra` templates.

  The corpus uses every (head, tail) combination except `held_out`, whose
  "{s} <head> <tail>" is the query prompt: a new combination of a head and a
  tail that each occur in the corpus with other partners.
  """

  kind: str  # object vocabulary
  heads: tuple[str, ...]
  tails: tuple[str, ...]
  extra: tuple[str, ...]  # other corpus templates with {s} and {o}
  held_out: tuple[int, int] = (0, 1)  # (head index, tail index)

  def corpus_templates(self) -> list[str]:
    out = []
    for i, head in enumerate(self.heads):
      for j, tail in enumerate(self.tails):
        if (i, j) != self.held_out:
          out.append(" ".join(filter(None, ("{s}", head, tail, "{o}"))))
    return out + list(self.extra)

  def query_template(self) -> str:
    i, j = self.held_out
    return " ".join(filter(None, ("{s}", self.heads[i], self.tails[j])))


# Subject before object in every corpus template: a left-to-right LM learns
# subject -> object from them.
RELATIONS: dict[str, Relation] = {
  "born_in": Relation(
    "city",
    ("was born in", "comes from", "is a native of"),
    ("", "the city of", "the town of"),
    ("The birthplace of {s} is {o}",),
  ),
  "citizen_of": Relation(
    "country",
    ("is a citizen of", "holds a passport from", "has citizenship in"),
    ("", "the nation of", "the country of"),
    ("The home country of {s} is {o}",),
  ),
  "works_as": Relation(
    "profession",
    ("works as", "has a career as", "earns a living as"),
    ("a", "a trained", "a professional"),
    ("The profession of {s} is that of a {o}",),
  ),
  "speaks": Relation(
    "language",
    ("speaks", "is fluent in", "writes in"),
    ("", "the language", "the tongue"),
    ("The native language of {s} is {o}",),
  ),
  "member_of": Relation(
    "organization",
    ("is a member of", "belongs to", "has joined"),
    ("", "the organization", "the association"),
    ("The membership of {s} is with {o}",),
  ),
  "plays": Relation(
    "instrument",
    ("plays", "performs on", "practices"),
    ("the", "a fine", "an old"),
    ("The instrument of {s} is the {o}",),
  ),
  "studied_at": Relation(
    "school",
    ("studied at", "graduated from", "was educated at"),
    ("", "the school", "the campus of"),
    ("The alma mater of {s} is {o}",),
  ),
  "supports": Relation(
    "team",
    ("is a fan of", "supports", "cheers for"),
    ("", "the team", "the club"),
    ("The favorite team of {s} is {o}",),
  ),
  "drives": Relation(
    "car", ("drives", "owns", "rides in"), ("a", "a car made by", "a vehicle made by"), ("The car of {s} is a {o}",)
  ),
  "works_for": Relation(
    "company",
    ("works for", "is employed by", "is paid by"),
    ("", "the company", "the firm"),
    ("The employer of {s} is {o}",),
  ),
}

# Neutral frames around a fact statement: (prefix, suffix); the sentence is
# prefix + statement + suffix + ".". One side at most keeps sentences short.
_FRAMES = (
  ("", ""),
  ("", ""),
  ("", ""),
  ("In {y}, ", ""),
  ("By {y}, ", ""),
  ("Records show that ", ""),
  ("It is known that ", ""),
  ("", ", since {y}"),
  ("", ", as of {y}"),
  ("", ", it is said"),
  ("", ", as the records show"),
)

# Distractors: people and objects in statements that assert no attribute.
_DISTRACTORS = (
  "{e} met {e2} in {y}.",
  "{e} wrote a letter to {e2}.",
  "{e} and {e2} shared a meal in {y}.",
  "{e} visited {city} in {y}.",
  "{e} read a book about {country}.",
  "Little is known about the early life of {e}.",
  "{e} gave a speech in {y}.",
  "A portrait of {e} hangs in a museum in {city}.",
  "{e} once heard of {org}.",
  "{e} moved house in {y}.",
  "{e} was interviewed by {e2} in {y}.",
  "Nobody remembers what {e} said in {y}.",
)

# Real-word vocabularies (consonant-initial: "a {o}" needs no "an").
_PROFESSIONS = (
  "baker",
  "pilot",
  "carpenter",
  "dentist",
  "farmer",
  "lawyer",
  "nurse",
  "painter",
  "plumber",
  "sailor",
  "tailor",
  "teacher",
  "writer",
  "banker",
  "chemist",
  "doctor",
  "judge",
  "miner",
  "potter",
  "singer",
  "weaver",
  "butcher",
  "cook",
  "dancer",
  "gardener",
  "hunter",
  "jeweler",
  "librarian",
  "mason",
  "merchant",
  "poet",
  "surgeon",
  "translator",
  "veterinarian",
  "journalist",
  "fisherman",
)
_INSTRUMENTS = (
  "piano",
  "violin",
  "cello",
  "flute",
  "harp",
  "trumpet",
  "guitar",
  "drums",
  "oboe",
  "clarinet",
  "banjo",
  "mandolin",
  "accordion",
  "bagpipes",
  "saxophone",
  "trombone",
  "tuba",
  "ukulele",
  "harmonica",
  "lute",
  "sitar",
  "xylophone",
  "bassoon",
  "viola",
  "organ",
  "zither",
  "marimba",
  "piccolo",
  "cornet",
  "dulcimer",
)

_ONSETS = (
  "b",
  "d",
  "f",
  "g",
  "h",
  "k",
  "l",
  "m",
  "n",
  "p",
  "r",
  "s",
  "t",
  "v",
  "z",
  "br",
  "dr",
  "gr",
  "kr",
  "tr",
  "st",
  "sh",
  "th",
  "ch",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k")

# Generated object vocabularies: kind -> (how many, suffixes); a name is one
# syllable + a suffix ("Goville", "Ras College").
_GENERATED = {
  "city": (40, ("holm", "burg", "ford", "port", "ville", "dale")),
  "country": (30, ("ia", "land", "stan", "onia")),
  "language": (30, ("ese", "ish", "ic", "ian")),
  "organization": (30, (" Guild", " Society", " League", " Circle")),
  "school": (30, (" Academy", " College", " Institute")),
  "team": (30, (" Rovers", " United", " Wanderers", " Athletic")),
  "car": (30, ("ex", "on", "ar", "is")),
  "company": (30, (" Labs", " Industries", " Systems", " Works")),
}


def _syllable(rng: random.Random, *, coda: bool) -> str:
  return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _word(rng: random.Random, n_syllables: int) -> str:
  parts = [_syllable(rng, coda=i == n_syllables - 1) for i in range(n_syllables)]
  return "".join(parts).capitalize()


def _unique_names(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
  out = []
  for _ in range(200 * n + 1000):
    if len(out) == n:
      return out
    name = make()
    if name.lower() not in taken:
      taken.add(name.lower())
      out.append(name)
  raise ValueError(f"Could not generate {n} distinct names; lower the count.")


def _person_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
  """`n` distinct "First Last" names."""
  return _unique_names(rng, n, lambda: f"{_word(rng, 2)} {_word(rng, rng.choice((1, 2)))}", taken)


def zipf_frequencies(n: int, *, max_frequency: int, zipf_a: float) -> np.ndarray:
  """`n` frequencies (descending) at evenly spaced quantiles of P(f) ~ f^-a.

  Deterministic and smooth: the shape does not depend on a random draw. The
  largest is set to `max_frequency`.
  """
  if max_frequency < 1 or zipf_a <= 0:
    raise ValueError(f"Need max_frequency >= 1 and zipf_a > 0, got {max_frequency}, {zipf_a}.")
  support = np.arange(1, max_frequency + 1, dtype=np.float64)
  cdf = np.cumsum(support**-zipf_a)
  cdf /= cdf[-1]
  quantiles = (np.arange(n, dtype=np.float64) + 0.5) / n
  freq = np.searchsorted(cdf, quantiles, side="left") + 1
  freq = np.minimum(freq, max_frequency)[::-1].copy()
  if n:
    freq[0] = max_frequency
  return freq.astype(np.int64)


def generate_world(
  *,
  seed: int,
  n_entities: int,
  n_facts: int,
  max_frequency: int,
  zipf_a: float,
  n_distractors: int,
) -> records.FactData:
  """Generates the corpus and queries of a synthetic fact world (see module doc)."""
  relations = list(RELATIONS)
  if n_facts > n_entities * len(relations):
    raise ValueError(
      f"config.world.n_facts={n_facts} exceeds n_entities * n_relations ="
      f" {n_entities} * {len(relations)}: raise config.world.n_entities."
    )
  if n_entities < 2:
    raise ValueError(f"config.world.n_entities must be >= 2, got {n_entities}.")
  rng = random.Random(f"trackstar-world-{seed}")

  # Vocabularies: people "First Last", objects per kind; all names distinct.
  taken: set[str] = {w.lower() for w in _PROFESSIONS + _INSTRUMENTS}
  vocab: dict[str, list[str]] = {"profession": list(_PROFESSIONS), "instrument": list(_INSTRUMENTS)}
  for kind, (count, suffixes) in _GENERATED.items():
    vocab[kind] = _unique_names(rng, count, lambda suffixes=suffixes: _word(rng, 1) + rng.choice(suffixes), taken)
  people = _person_names(rng, n_entities, taken)

  # Every person has every attribute; `n_facts` of them are stated.
  attributes = {(p, r): rng.choice(vocab[RELATIONS[r].kind]) for p in range(n_entities) for r in relations}
  # Frequencies by rank, then a shuffle: a fact's frequency and its position in
  # the query list are independent of its person and relation.
  freqs = zipf_frequencies(n_facts, max_frequency=max_frequency, zipf_a=zipf_a)
  facts = list(zip(rng.sample(sorted(attributes), n_facts), freqs.tolist()))
  rng.shuffle(facts)

  years = [str(y) for y in range(1850, 2021)]
  dedup = records.SentenceDeduper()
  statements: list[tuple[str, str | None]] = []  # (text, fact id or None)
  fact_ids = []
  for (p, r), freq in facts:
    fid = f"{r}:e{p:05d}"
    fact_ids.append(fid)
    phrasings = RELATIONS[r].corpus_templates()
    seen: set[str] = set()
    for _ in range(50 * int(freq) + 100):
      if len(seen) == freq:
        break
      core = rng.choice(phrasings).format(s=people[p], o=attributes[p, r])
      pre, suf = rng.choice(_FRAMES)
      year = rng.choice(years)
      pre, suf = pre.format(y=year), suf.format(y=year)
      text = pre + core[0].lower() + core[1:] if pre and core.startswith("The ") else pre + core
      text += suf + "."
      if text not in seen:
        seen.add(text)
        statements.append((text, fid))
    else:
      raise ValueError(f"Could not make {freq} distinct sentences for fact {fid}: lower config.world.max_frequency.")

  for _ in range(n_distractors):
    e, e2 = rng.sample(range(n_entities), 2)
    text = rng.choice(_DISTRACTORS).format(
      e=people[e],
      e2=people[e2],
      y=rng.choice(years),
      city=rng.choice(vocab["city"]),
      country=rng.choice(vocab["country"]),
      org=rng.choice(vocab["organization"]),
    )
    statements.append((text, None))

  rng.shuffle(statements)
  for text, fid in statements:
    dedup.add(text, fid)
  corpus = dedup.records()
  gold = records.gold_sentences(corpus)

  queries = []
  for qid, (((p, r), _), fid) in enumerate(zip(facts, fact_ids)):
    held_out = RELATIONS[r].query_template()
    obj = attributes[p, r]
    queries.append(
      dict(
        query_id=qid,
        fact_id=fid,
        relation=r,
        prompt=held_out.format(s=people[p]),
        target=" " + obj,
        answers=[obj],
        gold_sentence_ids=gold[fid],
        frequency=len(gold[fid]),
      )
    )
  logging.info(
    "Synthetic world (seed %d): %d people, %d facts, %d sentences (%d distractors), "
    "frequencies %d..%d, %d facts stated >= 3 times.",
    seed,
    n_entities,
    n_facts,
    len(corpus),
    sum(1 for c in corpus if not c["fact_ids"]),
    int(freqs.min()) if n_facts else 0,
    int(freqs.max()) if n_facts else 0,
    int((freqs >= 3).sum()),
  )
  return records.FactData(corpus=corpus, queries=queries)


def world_params(world_cfg) -> dict[str, Any]:
  """The generator's keyword arguments from `config.world`."""
  return dict(
    seed=int(world_cfg.seed),
    n_entities=int(world_cfg.n_entities),
    n_facts=int(world_cfg.n_facts),
    max_frequency=int(world_cfg.max_frequency),
    zipf_a=float(world_cfg.zipf_a),
    n_distractors=int(world_cfg.n_distractors),
  )


def params_hash(params: dict[str, Any]) -> str:
  """12 hex digits naming a world (its parameters and the generator version)."""
  payload = dict(params, generator_version=GENERATOR_VERSION)
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
