"""LAMA T-REx as a fact-tracing dataset: evidence sentences and relation queries.

Reads the manual directory laid out as in the LAMA release
(`--config.manual_dir`, e.g. ../shared/data/lama_trex):

  evidences/P<id>.jsonl            one fact a line, with its evidence sentences
  lama_templates/relations.jsonl   one query template per relation
  pararel_patterns/P<id>.jsonl     ParaRel paraphrases of the templates, and
  lpaqa_prompts/{paraphrase,mine}/P<id>.jsonl   LPAQA's prompts: read only for
                                   mixed training (`lama_mixed`)

Corpus: every evidence's `masked_sentence` with [MASK] replaced by its
`obj_surface`, deduplicated over all relations; a sentence keeps the ids of all
facts it came from. A fact id is "<relation>:<subject uri>", so the facts of
one (subject, relation) with several objects share an id, one query and the
union of their sentences. Queries: the relation's template cut before [Y],
[X] = subject label; target " " + object label (the first object in file
order), `answers` all objects of that (subject, relation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import hashlib
import json
import os
import re
from typing import Any

from absl import logging

from trackstar_jax.data import records

MANUAL_DIR_FLAG = "--config.manual_dir"
EVIDENCE_DIR = "evidences"
TEMPLATES_FILE = os.path.join("lama_templates", "relations.jsonl")
# Paraphrased templates (directory, JSON field), in the order mixed training prefers them:
# ParaRel's are curated to keep the meaning, LPAQA's paraphrases and mined prompts are not.
PATTERN_SOURCES = (
  ("pararel_patterns", "pattern"),
  (os.path.join("lpaqa_prompts", "paraphrase"), "template"),
  (os.path.join("lpaqa_prompts", "mine"), "template"),
)

# LAMA templates that do not end in [Y] cannot prompt a left-to-right LM; these
# ParaRel patterns of the same relations do (the data README's choices).
PARAREL_TEMPLATES = {
  "P106": "[X] works as [Y].",
  "P27": "[X] is a citizen of [Y].",
  "P136": "[X] plays [Y].",
  "P140": "[X] is follower of [Y].",
  "P413": "[X] plays in the position of [Y].",
}


def config_name(relations: Sequence[str] | None) -> str:
  """Dataset config name: "all", or "rel_<hash>" for a subset of relations."""
  if not relations:
    return "all"
  return "rel_" + hashlib.sha256(json.dumps(list(relations)).encode()).hexdigest()[:12]


def source_fingerprint(manual_dir: str, *, relations: Sequence[str] | None = None, patterns: bool = False) -> str:
  """16 hex digits naming what `read_lama(manual_dir, relations=...)` reads: a build's content key.

  Hashes the relation list (the files present when `relations` is empty) and,
  for the templates file and each relation's evidence file, its name, size and
  sha256, so two manual dirs give the same key only when they hold the same
  bytes. A missing file enters the hash as missing (reading it later raises
  `read_lama`'s actionable error).

  Args:
    manual_dir: the LAMA folder.
    relations: as for `read_lama`.
    patterns: also hash each relation's paraphrase files (`PATTERN_SOURCES`),
      which mixed training reads; False gives the key of an unmixed build.
  """
  manual_dir = os.fspath(manual_dir)
  rels = list(relations) if relations else available_relations(manual_dir)
  h = hashlib.sha256(json.dumps({"relations": rels, "pararel": PARAREL_TEMPLATES}, sort_keys=True).encode())
  files = [TEMPLATES_FILE] + [os.path.join(EVIDENCE_DIR, f"{r}.jsonl") for r in rels]
  if patterns:
    files += [os.path.join(d, f"{r}.jsonl") for d, _ in PATTERN_SOURCES for r in rels]
  for rel_path in files:
    path = os.path.join(manual_dir, rel_path)
    if not os.path.isfile(path):
      h.update(f"{rel_path}:missing\n".encode())
      continue
    content = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        content.update(block)
    h.update(f"{rel_path}:{os.path.getsize(path)}:{content.hexdigest()}\n".encode())
  return h.hexdigest()[:16]


def _expected_files_message(manual_dir: str) -> str:
  return (
    f"Point {MANUAL_DIR_FLAG} at the LAMA T-REx folder that holds"
    f" {EVIDENCE_DIR}/P*.jsonl (one fact per line) and {TEMPLATES_FILE};"
    f" got {manual_dir!r} (absolute: {os.path.abspath(manual_dir)!r})."
  )


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg}).") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{path}, line {lineno}: expected a JSON object.")
      yield lineno, obj


def _field(obj: dict[str, Any], key: str, path: str, lineno: int):
  if key not in obj:
    raise ValueError(f"{path}, line {lineno}: missing field {key!r}.")
  return obj[key]


def available_relations(manual_dir: str) -> list[str]:
  """Relation ids with an evidence file, sorted by number (P20 < P101)."""
  ev_dir = os.path.join(manual_dir, EVIDENCE_DIR)
  if not os.path.isdir(ev_dir):
    raise FileNotFoundError(f"Missing directory {ev_dir}. " + _expected_files_message(manual_dir))
  rels = [f[: -len(".jsonl")] for f in os.listdir(ev_dir) if re.fullmatch(r"P\d+\.jsonl", f)]
  if not rels:
    raise FileNotFoundError(f"No P*.jsonl files in {ev_dir}. " + _expected_files_message(manual_dir))
  return sorted(rels, key=lambda r: int(r[1:]))


def read_templates(manual_dir: str) -> dict[str, str]:
  """relation -> template ending in [Y] (LAMA's, or a ParaRel one)."""
  path = os.path.join(manual_dir, TEMPLATES_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Missing file {path}. " + _expected_files_message(manual_dir))
  out = {}
  for lineno, obj in _read_jsonl(path):
    rel = _field(obj, "relation", path, lineno)
    template = _field(obj, "template", path, lineno)
    if rel in PARAREL_TEMPLATES:
      template = PARAREL_TEMPLATES[rel]
    out[rel] = template
  return out


def prompt_from_template(template: str, subject: str, *, relation: str = "?") -> str:
  """ "[X] died in [Y] ." -> "<subject> died in"."""
  head, sep, tail = template.partition("[Y]")
  if not sep or tail.strip() not in ("", "."):
    raise ValueError(
      f"Template {template!r} of relation {relation} does not end in [Y]; add a"
      " ParaRel pattern for it to lama.PARAREL_TEMPLATES."
    )
  if "[X]" not in head:
    raise ValueError(f"Template {template!r} of relation {relation} has no [X] before [Y].")
  return head.replace("[X]", subject).rstrip()


def read_lama(manual_dir: str, *, relations: Sequence[str] | None = None, mixed=None) -> records.FactData:
  """Reads LAMA T-REx from `manual_dir` (see module docstring).

  Args:
    manual_dir: the folder holding evidences/ and lama_templates/.
    relations: relation ids to read (e.g. ("P20", "P27")); None or empty =
      every relation with an evidence file, in numeric order.
    mixed: optional `lama_mixed.MixedOptions`; when active (fraction > 0), a
      part of the facts also gets template statements in the corpus and the
      queries are split (`lama_mixed.add_statements`). None or fraction 0:
      today's dataset, record for record.

  Returns:
    FactData; corpus in order of first appearance (relations in the given
    order, facts and evidences in file order), queries in the same order.
  """
  parsed = parse_evidences(manual_dir, relations=relations)
  if mixed is not None and mixed.active:
    from trackstar_jax.data import lama_mixed  # pylint: disable=g-import-not-at-top  (it builds on this module)

    return lama_mixed.add_statements(parsed, manual_dir=os.fspath(manual_dir), options=mixed)
  corpus = parsed.dedup.records()
  gold = records.gold_sentences(corpus)
  queries = []
  for qid, fact in enumerate(parsed.facts.values()):
    ids = gold.get(fact["fact_id"], [])
    queries.append(dict(query_id=qid, **query_fields(fact), gold_sentence_ids=ids, frequency=len(ids)))
  logging.info(
    "LAMA T-REx from %s: %d relations, %d queries (%d with several objects), %d evidences, %d unique sentences.",
    manual_dir,
    len(parsed.relations),
    len(queries),
    sum(len(q["answers"]) > 1 for q in queries),
    parsed.n_evidences,
    len(corpus),
  )
  return records.FactData(corpus=corpus, queries=queries)


_QUERY_FIELDS = ("fact_id", "relation", "prompt", "target", "answers")


def query_fields(fact: dict[str, Any]) -> dict[str, Any]:
  """The query record fields of a parsed fact (`ParsedEvidences.facts` values also hold `subject`)."""
  return {k: fact[k] for k in _QUERY_FIELDS}


@dataclasses.dataclass
class ParsedEvidences:
  """What `parse_evidences` read: the relations, their query templates, facts and deduplicated sentences."""

  relations: list[str]
  templates: dict[str, str]  # relation -> query template (ends in [Y])
  facts: dict[str, dict[str, Any]]  # fact id -> fact_id, relation, subject, prompt, target, answers
  dedup: records.SentenceDeduper  # the evidence sentences, with the facts they came from
  n_evidences: int


def parse_evidences(manual_dir: str, *, relations: Sequence[str] | None = None) -> ParsedEvidences:
  """Reads the templates and evidence files of `relations` (see `read_lama`); checks they exist."""
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError("Manual dir not found. " + _expected_files_message(manual_dir))
  present = available_relations(manual_dir)
  relations = list(relations) if relations else present
  missing = [r for r in relations if r not in present]
  if missing:
    raise FileNotFoundError(
      f"No evidence file for relations {missing} in {os.path.join(manual_dir, EVIDENCE_DIR)}"
      f" (present: {present}). " + _expected_files_message(manual_dir)
    )
  templates = read_templates(manual_dir)
  no_template = [r for r in relations if r not in templates]
  if no_template:
    raise ValueError(f"Relations {no_template} have no template in {os.path.join(manual_dir, TEMPLATES_FILE)}.")

  dedup = records.SentenceDeduper()
  facts: dict[str, dict[str, Any]] = {}  # fact id -> query fields, in first-seen order
  n_evidences = 0
  for rel in relations:
    path = os.path.join(manual_dir, EVIDENCE_DIR, f"{rel}.jsonl")
    for lineno, obj in _read_jsonl(path):
      sub_uri = _field(obj, "sub_uri", path, lineno)
      sub_label = _field(obj, "sub_label", path, lineno)
      obj_label = _field(obj, "obj_label", path, lineno)
      pred = obj.get("predicate_id", rel)
      if pred != rel:
        raise ValueError(f"{path}, line {lineno}: predicate_id {pred!r} in the file of {rel}.")
      fid = f"{rel}:{sub_uri}"
      fact = facts.get(fid)
      if fact is None:
        fact = facts[fid] = dict(
          fact_id=fid,
          relation=rel,
          subject=sub_label,
          prompt=prompt_from_template(templates[rel], sub_label, relation=rel),
          target=" " + obj_label,
          answers=[],
        )
      if obj_label not in fact["answers"]:
        fact["answers"].append(obj_label)
      for ev in _field(obj, "evidences", path, lineno):
        masked = ev.get("masked_sentence")
        surface = ev.get("obj_surface")
        if not isinstance(masked, str) or not isinstance(surface, str):
          raise ValueError(f"{path}, line {lineno}: evidence without masked_sentence/obj_surface strings.")
        text = masked.replace("[MASK]", surface).strip()
        if text:
          dedup.add(text, fid)
          n_evidences += 1
  return ParsedEvidences(relations=relations, templates=templates, facts=facts, dedup=dedup, n_evidences=n_evidences)
