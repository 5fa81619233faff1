"""Synthetic fact world and its TFDS builder: determinism, ground truth, round trip."""

import collections
import os

import numpy as np
import pytest

from trackstar_jax import configs
from trackstar_jax.data import records, world

SMALL = dict(seed=3, n_entities=60, n_facts=80, max_frequency=30, zipf_a=1.3, n_distractors=100)


@pytest.fixture(scope="module")
def small_world():
  return world.generate_world(**SMALL)


@pytest.fixture(scope="module")
def default_world():
  return world.generate_world(seed=0, n_entities=400, n_facts=600, max_frequency=200, zipf_a=1.3, n_distractors=2000)


def test_deterministic(small_world):
  again = world.generate_world(**SMALL)
  assert again.corpus == small_world.corpus
  assert again.queries == small_world.queries
  other = world.generate_world(**dict(SMALL, seed=4))
  assert other.corpus != small_world.corpus


def test_schema(small_world):
  for i, rec in enumerate(small_world.corpus):
    assert tuple(rec) == records.CORPUS_KEYS
    assert rec["sentence_id"] == i
  for i, q in enumerate(small_world.queries):
    assert tuple(q) == records.QUERY_KEYS
    assert q["query_id"] == i
    assert q["target"].startswith(" ") and q["answers"] == [q["target"][1:]]
    assert not q["prompt"].endswith(" ")
  assert len({q["fact_id"] for q in small_world.queries}) == SMALL["n_facts"]


def test_sentences_unique_and_one_fact_each(default_world):
  texts = [c["text"] for c in default_world.corpus]
  assert len(set(texts)) == len(texts)
  assert all(len(c["fact_ids"]) <= 1 for c in default_world.corpus)


def test_default_world_size_and_long_tail(default_world):
  n = len(default_world.corpus)
  assert 10_000 <= n <= 15_000, n
  freq = np.array([q["frequency"] for q in default_world.queries])
  assert freq.max() == 200
  assert (freq == 1).sum() >= 100  # a long tail of facts stated once
  assert (freq >= 3).sum() >= 250  # and enough learnable ones
  assert (freq >= 50).mean() < 0.15  # a few head facts
  distractors = sum(not c["fact_ids"] for c in default_world.corpus)
  assert 1900 <= distractors <= 2000  # a few may repeat and be merged
  # >= 8 relations with their own object vocabularies.
  rels = collections.defaultdict(set)
  for q in default_world.queries:
    rels[q["relation"]].add(q["answers"][0])
  assert len(rels) >= 8
  vocabs = list(rels.values())
  for i, a in enumerate(vocabs):
    for b in vocabs[i + 1 :]:
      assert not a & b


def test_zipf_frequencies():
  f = world.zipf_frequencies(1000, max_frequency=100, zipf_a=1.5)
  assert f[0] == 100 and f.min() == 1
  assert np.all(np.diff(f) <= 0)
  # Share of ones close to P(f=1) of the power law.
  p1 = 1.0 / np.sum(np.arange(1, 101, dtype=float) ** -1.5)
  assert abs((f == 1).mean() - p1) < 0.01


def test_gold_sentences_state_the_fact(small_world):
  by_id = {c["sentence_id"]: c for c in small_world.corpus}
  for q in small_world.queries:
    subject = q["prompt"].split(" ")[0] + " " + q["prompt"].split(" ")[1]
    assert q["frequency"] == len(q["gold_sentence_ids"]) >= 1
    for sid in q["gold_sentence_ids"]:
      text = by_id[sid]["text"]
      assert subject in text and q["answers"][0] in text
      assert q["fact_id"] in by_id[sid]["fact_ids"]
  # and no other sentence carries the fact id
  gold = {(sid, q["fact_id"]) for q in small_world.queries for sid in q["gold_sentence_ids"]}
  tagged = {(c["sentence_id"], f) for c in small_world.corpus for f in c["fact_ids"]}
  assert gold == tagged


def test_held_out_phrasing_not_in_corpus(default_world):
  for _name, rel in world.RELATIONS.items():
    held = rel.query_template()
    assert held not in rel.corpus_templates()
    assert len(rel.corpus_templates()) >= 3
  text = "\n".join(c["text"] for c in default_world.corpus)
  for q in default_world.queries:
    assert q["prompt"] not in text, q
  # the phrase itself (subject removed) occurs in no sentence
  for _name, rel in world.RELATIONS.items():
    phrase = rel.query_template().replace("{s} ", "")
    assert not any(f" {phrase} " in c["text"] for c in default_world.corpus), phrase


def test_too_many_facts_is_an_error():
  with pytest.raises(ValueError, match="n_facts"):
    world.generate_world(**dict(SMALL, n_facts=10_000))


def test_fingerprint_changes_with_corpus(small_world):
  fp = small_world.fingerprint()
  assert len(fp) == 64
  corpus = [dict(c) for c in small_world.corpus]
  corpus[0]["text"] += "!"
  assert records.corpus_fingerprint(corpus) != fp


def test_deduper_merges_fact_ids():
  d = records.SentenceDeduper()
  assert d.add("a b.", "f1") == 0
  assert d.add("c d.", None) == 1
  assert d.add("a b.", "f2") == 0
  assert d.add("a b.", "f1") == 0
  assert d.records() == [
    dict(sentence_id=0, text="a b.", fact_ids=["f1", "f2"]),
    dict(sentence_id=1, text="c d.", fact_ids=[]),
  ]


def test_in_memory_fallback_matches(small_world):
  from trackstar_jax import data

  c = configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=32)
  c.world.update(SMALL)
  ds = data.load_in_memory(c)
  assert ds.corpus == small_world.corpus and ds.queries == small_world.queries
  assert ds.fingerprint == small_world.fingerprint()
  assert ds.name == f"synthetic_facts/world_{world.params_hash(SMALL)}/1.0.0"


# --- TFDS builder ------------------------------------------------------------


def _config(tmp_path, **world_overrides):
  c = configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=32)
  c.data_dir = str(tmp_path)
  c.world.update(dict(SMALL, **world_overrides))
  return c


def test_tfds_round_trip_keeps_order(tmp_path, small_world):
  pytest.importorskip("tensorflow_datasets")
  from trackstar_jax import data

  ds = data.load_dataset(_config(tmp_path))
  assert ds.name == data.load_in_memory(_config(tmp_path)).name
  assert len(ds.corpus) == len(small_world.corpus)
  assert list(ds.corpus) == small_world.corpus
  assert list(ds.queries) == small_world.queries
  assert ds.fingerprint == small_world.fingerprint()
  # random access, negative index, slices
  assert ds.corpus[5] == small_world.corpus[5]
  assert ds.corpus[-1] == small_world.corpus[-1]
  assert ds.queries[2:5] == small_world.queries[2:5]
  assert isinstance(ds.corpus[0]["text"], str)
  assert isinstance(ds.queries[0]["gold_sentence_ids"][0], int)
  with pytest.raises(IndexError):
    ds.corpus[len(ds.corpus)]
  # After a full pass, reads come from the cache and give the same records.
  assert ds.corpus._cache is not None
  assert ds.corpus[3] == small_world.corpus[3] and list(ds.corpus) == small_world.corpus
  assert ds.corpus.take([4, 1]) == [small_world.corpus[4], small_world.corpus[1]]
  uncached = data.load_dataset(_config(tmp_path), cache=False)
  assert list(uncached.queries) == small_world.queries and uncached.queries._cache is None
  assert uncached.corpus.take([4, 1]) == [small_world.corpus[4], small_world.corpus[1]]


def test_tfds_generates_once_and_separates_params(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from trackstar_jax import data

  ds = data.load_dataset(_config(tmp_path))
  files = sorted(os.listdir(ds.data_dir))
  mtimes = [os.path.getmtime(os.path.join(ds.data_dir, f)) for f in files]
  again = data.load_dataset(_config(tmp_path))
  assert again.data_dir == ds.data_dir and again.fingerprint == ds.fingerprint
  assert mtimes == [os.path.getmtime(os.path.join(ds.data_dir, f)) for f in files]
  other = data.load_dataset(_config(tmp_path, seed=SMALL["seed"] + 1))
  assert other.data_dir != ds.data_dir
  assert other.fingerprint != ds.fingerprint


def test_build_prepared_by_another_process_while_waiting_is_reopened(tmp_path, monkeypatch):
  """Two jobs start on one unprepared build: the one that waited for the lock must not keep its stale builder."""
  pytest.importorskip("tensorflow_datasets")
  from trackstar_jax import data

  stale = data.make_builder(_config(tmp_path))  # made before the build exists, as by the waiting process
  built = data.load_dataset(_config(tmp_path))  # "the other process" prepares it
  real = data.make_builder
  calls = iter([stale])
  monkeypatch.setattr(data, "make_builder", lambda *a, **k: next(calls, None) or real(*a, **k))
  prepared = iter([False])  # unprepared when first asked (before the lock), prepared once the lock is held
  monkeypatch.setattr(type(stale), "is_prepared", lambda self: next(prepared, True))
  again = data.load_dataset(_config(tmp_path))
  assert again.fingerprint == built.fingerprint and len(again.corpus) == len(built.corpus)


def test_default_data_dir(monkeypatch, tmp_path):
  from trackstar_jax import data

  c = configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=32)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  assert data.default_data_dir(c) == str(tmp_path / "env")
  c.data_dir = str(tmp_path / "cfg")
  assert data.default_data_dir(c) == str(tmp_path / "cfg")
  monkeypatch.delenv("TFDS_DATA_DIR")
  c.data_dir = ""
  assert data.default_data_dir(c) == os.path.expanduser("~/tensorflow_datasets")


def test_unknown_dataset_is_an_error(tmp_path):
  from trackstar_jax import data

  c = _config(tmp_path)
  c.dataset = "nope"
  with pytest.raises(ValueError, match="config.dataset"):
    data.load_dataset(c)


def test_builder_configs_follow_world_params(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from trackstar_jax import data

  c = configs.base_config(dataset="synthetic_facts", model="tiny", seq_len=32)
  c.data_dir = str(tmp_path)
  default = data.make_builder(c)  # the predefined config, chosen by name
  assert default.builder_config.params == world.world_params(c.world)
  c.world.zipf_a = 1.5
  other = data.make_builder(c)
  assert other.builder_config.params["zipf_a"] == 1.5
  assert other.builder_config.name != default.builder_config.name
