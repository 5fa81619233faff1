"""Mixed LAMA training data (trackstar_jax.data.lama_mixed) on the real files (skipped if they are absent)."""

import collections
import json
import os

from lama_helpers import mini_copy
import pytest

from trackstar_jax import configs
from trackstar_jax.data import lama, lama_mixed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMA_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "lama_trex")
needs_lama = pytest.mark.skipif(
  not os.path.isdir(os.path.join(LAMA_DIR, "evidences")), reason="no LAMA data at " + LAMA_DIR
)
HALF = lama_mixed.MixedOptions(fraction=0.5, paraphrases=5, seed=0, queries="all")


def _mini_copy(tmp_path, relations=("P20", "P1303"), n_lines=200):
  return mini_copy(tmp_path, relations=relations, n_lines=n_lines, patterns=True)


@pytest.fixture(scope="module")
def full_mixed():
  return lama.read_lama(LAMA_DIR, mixed=HALF)


@pytest.fixture(scope="module")
def full_plain():
  return lama.read_lama(LAMA_DIR)


def _statements(data):
  return [c for c in data.corpus if c["template_fact_ids"]]


def _word_spans(text):
  """Every substring of `text` that starts and ends at a word boundary (spaces; final punctuation cut off too)."""
  words = text.split(" ")
  spans = {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
  return spans | {s.rstrip(".,;:!?") for s in spans}


# --- the split ---------------------------------------------------------------


@needs_lama
def test_split_is_a_deterministic_half_of_each_relation(full_mixed):
  by_rel = collections.defaultdict(list)
  for q in full_mixed.queries:
    assert q["split"] == lama_mixed.fact_split(q["fact_id"], relation=q["relation"], options=HALF)
    by_rel[q["relation"]].append(q["split"] == lama_mixed.TRAINED)
  assert len(by_rel) == 20
  for rel, trained in by_rel.items():
    assert 0.4 < sum(trained) / len(trained) < 0.6, rel  # >= 383 facts each: binomial sd <= 2.6%
  # Another seed draws another split; a smaller fraction trains a subset (the hash is compared to it).
  other = dataclass_replace(HALF, seed=1)
  fids = [(q["fact_id"], q["relation"], q["split"]) for q in full_mixed.queries]
  changed = sum(lama_mixed.fact_split(f, relation=r, options=other) != s for f, r, s in fids)
  assert 0.4 < changed / len(fids) < 0.6
  third = dataclass_replace(HALF, fraction=0.3)
  small = {f for f, r, _ in fids if lama_mixed.fact_split(f, relation=r, options=third) == lama_mixed.TRAINED}
  assert small and small <= {f for f, _, s in fids if s == lama_mixed.TRAINED}


def dataclass_replace(options, **kw):
  return lama_mixed.MixedOptions(**dict(options.key(), **kw))


@needs_lama
def test_reading_twice_gives_the_same_dataset(tmp_path):
  root = _mini_copy(tmp_path)
  a = lama.read_lama(str(root), mixed=HALF)
  b = lama.read_lama(str(root), mixed=HALF)
  assert a.corpus == b.corpus and a.queries == b.queries
  c = lama.read_lama(str(root), mixed=dataclass_replace(HALF, seed=1))
  assert c.fingerprint() != a.fingerprint()


# --- statements ----------------------------------------------------------------


@needs_lama
def test_heldout_facts_have_no_statement_and_no_query_string_in_the_corpus(full_mixed, tmp_path):
  split = {q["fact_id"]: q["split"] for q in full_mixed.queries}
  statements = _statements(full_mixed)
  assert len(statements) > 30_000
  for c in statements:
    assert c["fact_ids"] == []
    assert all(split[f] == lama_mixed.TRAINED for f in c["template_fact_ids"])
  heldout = {
    q["prompt"] + " " + a for q in full_mixed.queries if q["split"] == lama_mixed.HELDOUT for a in q["answers"]
  }
  assert not any(_word_spans(c["text"]) & heldout for c in statements)
  # Exhaustively (any position) on a smaller copy.
  mini = lama.read_lama(str(_mini_copy(tmp_path)), mixed=HALF)
  held = [q["prompt"] + " " + a for q in mini.queries if q["split"] == lama_mixed.HELDOUT for a in q["answers"]]
  texts = [c["text"] for c in _statements(mini)]
  assert held and texts
  assert not [(h, t) for t in texts for h in held if h in t]


def _write_fake_manual_dir(root, facts, *, pararel=("[X] passed away in [Y].", "[X] died at [Y].")):
  """A manual dir with one relation (P20) of `facts` [(sub_uri, sub_label, obj_label)], one evidence each."""
  (root / "evidences").mkdir(parents=True)
  (root / "lama_templates").mkdir()
  (root / "pararel_patterns").mkdir()
  (root / lama.TEMPLATES_FILE).write_text(json.dumps({"relation": "P20", "template": "[X] died in [Y] ."}) + "\n")
  lines = [
    json.dumps(
      dict(
        predicate_id="P20",
        sub_uri=uri,
        sub_label=sub,
        obj_uri="Q0",
        obj_label=obj,
        evidences=[dict(obj_surface=obj, masked_sentence=f"{sub} ({uri}) ended their days in [MASK].")],
      )
    )
    for uri, sub, obj in facts
  ]
  (root / "evidences" / "P20.jsonl").write_text("\n".join(lines) + "\n")
  (root / "pararel_patterns" / "P20.jsonl").write_text("".join(json.dumps({"pattern": p}) + "\n" for p in pararel))


def test_statement_that_would_spell_a_heldout_query_is_skipped(tmp_path):
  """Two subjects with one label (different uris), one trained, one held out: the template statement is skipped."""
  options = lama_mixed.MixedOptions(fraction=0.5, paraphrases=2, seed=0, queries="all")
  uris = [f"Q{i}" for i in range(1, 200)]
  splits = {u: lama_mixed.fact_split(f"P20:{u}", relation="P20", options=options) for u in uris}
  trained = next(u for u in uris if splits[u] == lama_mixed.TRAINED)
  heldout = next(u for u in uris if splits[u] == lama_mixed.HELDOUT)
  _write_fake_manual_dir(tmp_path / "m", [(trained, "Ann Smith", "Paris"), (heldout, "Ann Smith", "Paris")])
  data = lama.read_lama(str(tmp_path / "m"), mixed=options)
  texts = sorted(c["text"] for c in _statements(data))
  # "Ann Smith died in Paris." would hold the held-out query verbatim: the next patterns are used instead.
  assert texts == ["Ann Smith died at Paris.", "Ann Smith passed away in Paris."]
  assert all(c["template_fact_ids"] == [f"P20:{trained}"] for c in _statements(data))


def test_statement_equal_to_an_evidence_sentence_is_not_added(tmp_path):
  options = lama_mixed.MixedOptions(fraction=1.0, paraphrases=2, seed=0, queries="all")
  _write_fake_manual_dir(tmp_path / "m", [("Q1", "Bo", "Rome")], pararel=("[X] died at [Y].", "[X] ended in [Y]."))
  path = tmp_path / "m" / "evidences" / "P20.jsonl"
  fact = json.loads(path.read_text())
  fact["evidences"].append(dict(obj_surface="Rome", masked_sentence="Bo died in [MASK]."))
  path.write_text(json.dumps(fact) + "\n")
  data = lama.read_lama(str(tmp_path / "m"), mixed=options)
  texts = [c["text"] for c in data.corpus]
  assert len(texts) == len(set(texts))
  assert sorted(c["text"] for c in _statements(data)) == ["Bo died at Rome.", "Bo ended in Rome."]
  assert next(c for c in data.corpus if c["text"] == "Bo died in Rome.")["template_fact_ids"] == []


@needs_lama
def test_trained_facts_get_the_requested_number_of_distinct_paraphrases(full_mixed, tmp_path):
  per_fact = collections.defaultdict(list)
  for c in _statements(full_mixed):
    for f in c["template_fact_ids"]:
      per_fact[f].append(c["text"])
  queries = {q["fact_id"]: q for q in full_mixed.queries}
  trained = [f for f, q in queries.items() if q["split"] == lama_mixed.TRAINED]
  assert set(per_fact) == set(trained)
  counts = collections.Counter(len(v) for v in per_fact.values())
  assert set(counts) <= {4, 5} and counts[5] >= 0.999 * len(trained), counts  # 4: a collision used up the patterns
  evidence = {c["text"] for c in full_mixed.corpus if c["fact_ids"]}
  heldout = {
    q["prompt"] + " " + a for q in full_mixed.queries if q["split"] == lama_mixed.HELDOUT for a in q["answers"]
  }
  n_template = 0
  for f, texts in per_fact.items():
    q = queries[f]
    assert len(set(texts)) == len(texts)
    # The query's own (LAMA) form is among them, unless it is an evidence sentence or spells a held-out query.
    template = q["prompt"] + q["target"] + "."
    n_template += template in texts
    if template not in texts:  # rare: checked by brute force
      assert template in evidence or any(h in template for h in heldout), template  # "cellulose" in "hemicellulose"
  assert n_template > 0.99 * len(trained)
  # Distinct patterns: no two statements of a fact share the text before the object.
  for f in trained[::50]:
    q = queries[f]
    obj = q["target"][1:]
    heads = [t[: t.rindex(obj)] for t in per_fact[f]]
    assert len(set(heads)) == len(heads)
  mini = lama.read_lama(str(_mini_copy(tmp_path)), mixed=dataclass_replace(HALF, paraphrases=3))
  counts = collections.Counter(f for c in _statements(mini) for f in c["template_fact_ids"])
  assert set(counts.values()) == {3}
  assert len(counts) == sum(q["split"] == lama_mixed.TRAINED for q in mini.queries)


@needs_lama
def test_gold_ids_are_the_evidence_sentences_only(full_mixed, full_plain):
  n_evidence = len(full_plain.corpus)
  assert full_mixed.corpus[:n_evidence] == [dict(c, template_fact_ids=[]) for c in full_plain.corpus]
  assert all(c["template_fact_ids"] for c in full_mixed.corpus[n_evidence:])
  plain_gold = {q["fact_id"]: q["gold_sentence_ids"] for q in full_plain.queries}
  assert len(plain_gold) == len(full_mixed.queries)
  for q in full_mixed.queries:
    assert q["gold_sentence_ids"] == plain_gold[q["fact_id"]]
    assert q["frequency"] == len(q["gold_sentence_ids"])
    assert max(q["gold_sentence_ids"]) < n_evidence


@needs_lama
def test_statements_are_shuffled_in_the_corpus(full_mixed):
  order = [c["template_fact_ids"][0] for c in _statements(full_mixed)]
  same_next = sum(a == b for a, b in zip(order, order[1:]))
  assert same_next < 0.01 * len(order)  # 5 statements per fact, in a row, would give 80%
  rels = [f.split(":")[0] for f in order]
  assert len({tuple(rels[i : i + 200]) for i in range(0, len(rels), 200)}) > 1
  assert sum(a == b for a, b in zip(rels, rels[1:])) < 0.2 * len(rels)  # not grouped by relation


@needs_lama
def test_queries_heldout_by_default_with_the_lama_template(tmp_path):
  root = _mini_copy(tmp_path)
  every = lama.read_lama(str(root), mixed=HALF)
  held = lama.read_lama(str(root), mixed=dataclass_replace(HALF, queries="heldout"))
  assert lama_mixed.MixedOptions().queries == "heldout"
  expect = [q for q in every.queries if q["split"] == lama_mixed.HELDOUT]
  assert 0 < len(expect) < len(every.queries)
  assert [q["query_id"] for q in held.queries] == list(range(len(expect)))
  assert [dict(q, query_id=0) for q in held.queries] == [dict(q, query_id=0) for q in expect]
  # The prompt is the LAMA template's, exactly as without mixing.
  plain = {q["fact_id"]: q for q in lama.read_lama(str(root)).queries}
  for q in held.queries:
    p = plain[q["fact_id"]]
    assert (q["prompt"], q["target"], q["answers"]) == (p["prompt"], p["target"], p["answers"])


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(fraction=1.5), r"fraction=1\.5 must be in \[0, 1\]"),
    (dict(fraction=-0.1), "must be in"),
    (dict(fraction=0.5, paraphrases=0), "paraphrases=0 must be an integer >= 1"),
    (dict(fraction=0.5, queries="train"), "lama_queries='train' must be one of"),
    (dict(fraction=1.0), "leaves no held-out facts"),
  ],
)
def test_bad_options_are_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    lama_mixed.MixedOptions(**kw)


def test_relation_with_too_few_patterns_is_an_actionable_error(tmp_path):
  _write_fake_manual_dir(tmp_path / "m", [("Q1", "Ann", "Paris")], pararel=("[Y] is where [X] died.", "[X] [Y]."))
  with pytest.raises(ValueError, match=r"P20 has 1 distinct usable patterns.*lower lama_mixed\.paraphrases"):
    lama.read_lama(str(tmp_path / "m"), mixed=lama_mixed.MixedOptions(fraction=0.5, paraphrases=2))
  lama.read_lama(str(tmp_path / "m"), mixed=lama_mixed.MixedOptions(fraction=0.5, paraphrases=1))


def test_pattern_prompt_and_fill():
  assert lama_mixed.pattern_prompt("[X] died in [Y] .") == "[X] died in"
  assert lama_mixed.pattern_prompt("[X] , who plays [Y] music .") == "[X], who plays"
  assert lama_mixed.pattern_prompt("[Y] architect [X] .") is None  # the subject after the object
  assert lama_mixed.pattern_prompt("[X] [Y] .") is None  # nothing but the subject
  assert lama_mixed.fill_pattern("[X] plays [Y] music .", "Ann", "jazz") == "Ann plays jazz music."
  assert lama_mixed.fill_pattern("[X] was born in [Y]", "Ann", "Rome") == "Ann was born in Rome."


# --- the TFDS build and the config -----------------------------------------------


def _config(tmp_path, root, **mixed):
  c = configs.base_config(dataset="lama_trex", model="tiny", seq_len=64)
  c.data_dir = str(tmp_path / "tfds")
  c.manual_dir = str(root)
  for k, v in mixed.items():
    if k == "queries":
      c.lama_queries = v
    else:
      c.lama_mixed[k] = v
  return c


@needs_lama
def test_mixed_builds_are_keyed_by_their_options(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from trackstar_jax import data

  root = _mini_copy(tmp_path, n_lines=60)
  plain = data.load_dataset(_config(tmp_path, root))
  zero = data.load_dataset(_config(tmp_path, root, fraction=0.0, paraphrases=3, seed=7, queries="all"))
  assert (zero.name, zero.data_dir, zero.fingerprint) == (plain.name, plain.data_dir, plain.fingerprint)
  direct = lama.read_lama(str(root))
  assert list(zero.corpus) == direct.corpus and list(zero.queries) == direct.queries  # today's records exactly
  half = data.load_dataset(_config(tmp_path, root, fraction=0.5))
  direct = lama.read_lama(str(root), mixed=lama_mixed.MixedOptions(fraction=0.5))
  assert list(half.corpus) == direct.corpus and list(half.queries) == direct.queries  # the mixed fields round-trip
  assert half.fingerprint == direct.fingerprint() != plain.fingerprint
  dirs = {plain.data_dir, half.data_dir}
  for kw in (dict(paraphrases=3), dict(seed=1), dict(queries="all"), dict(fraction=0.4)):
    other = data.load_dataset(_config(tmp_path, root, **dict(dict(fraction=0.5), **kw)))
    assert other.data_dir not in dirs, kw
    dirs.add(other.data_dir)
  # Prepared once: without the manual dir the build of these options is found (and never the unmixed one).
  gone = _config(tmp_path, tmp_path / "gone", fraction=0.5, paraphrases=3)
  assert (
    data.load_dataset(gone).fingerprint
    == data.load_dataset(_config(tmp_path, root, fraction=0.5, paraphrases=3)).fingerprint
  )
  assert data.load_dataset(_config(tmp_path, tmp_path / "gone")).fingerprint == plain.fingerprint
  # The content key covers the pattern files, which only mixed builds read.
  with open(root / "pararel_patterns" / "P20.jsonl", "a") as f:
    f.write(json.dumps({"pattern": "[X] perished in [Y]."}) + "\n")
  assert data.load_dataset(_config(tmp_path, root, fraction=0.5)).data_dir != half.data_dir
  assert data.load_dataset(_config(tmp_path, root)).data_dir == plain.data_dir


def test_config_mixed_variants():
  from configs import lama as lama_config

  plain, mixed = lama_config.get_config(), lama_config.get_config("model=small,mixed=True")
  assert plain.lama_mixed.fraction == 0.0 and mixed.lama_mixed.fraction == 0.5
  assert mixed.lama_mixed.paraphrases > 1 and mixed.lama_queries == "heldout"
  assert "configs/lama.py:model=small,mixed=True" in lama_config.__doc__
  local = lama_config.get_config("mixed=True,runlocal=True")
  assert local.lama_relations == ("P20", "P1303") and local.model.preset == "tiny"
  lama_mixed.options_from_config(local)  # valid options


@needs_lama
def test_mixed_runlocal_trains(tmp_path):
  """configs/lama.py:mixed=True,runlocal=True through the train job: the mixed build, tokenizer, training, eval."""
  pytest.importorskip("tensorflow_datasets")
  from configs import lama as lama_config
  from trackstar_jax import data
  from trackstar_jax.jobs import train

  c = lama_config.get_config("mixed=True,runlocal=True")
  c.manual_dir = LAMA_DIR
  c.data_dir = str(tmp_path / "tfds")
  c.train.num_steps = 4
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  c.tokenizer.vocab_size = 512
  out = train.run(c, str(tmp_path / "w"))
  ds = data.load_dataset(c)
  assert "_mix" in ds.name
  assert {q["split"] for q in ds.queries} == {lama_mixed.HELDOUT}
  assert len(out["correct"]) == len(ds.queries) and 0.0 <= out["query_accuracy"] <= 1.0
  assert out["step"] == 4 and os.path.isdir(tmp_path / "w" / "checkpoints")
