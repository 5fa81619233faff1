"""Tokenizer (determinism, target tokenization) and batching (masks, padding, hosts)."""

import logging as py_logging
import os

import ml_collections
import numpy as np
import pytest

from trackstar_jax.data import batching, world
from trackstar_jax.data import tokenizer as tokenizer_lib

SMALL = dict(seed=1, n_entities=60, n_facts=80, max_frequency=30, zipf_a=1.3, n_distractors=100)


@pytest.fixture(scope="module")
def fact_data():
  return world.generate_world(**SMALL)


@pytest.fixture(scope="module")
def tok(fact_data):
  return tokenizer_lib.train_tokenizer([c["text"] for c in fact_data.corpus], vocab_size=256)


class _Dataset:
  def __init__(self, fact_data, name="synthetic_facts/test"):
    self.corpus = fact_data.corpus
    self.queries = fact_data.queries
    self.name = name
    self.fingerprint = fact_data.fingerprint()


def _config(vocab_size=256):
  c = ml_collections.ConfigDict()
  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=vocab_size, byte_fallback=None))
  return c


# --- tokenizer ---------------------------------------------------------------


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 256


def test_training_is_deterministic(fact_data, tok):
  again = tokenizer_lib.train_tokenizer([c["text"] for c in fact_data.corpus], vocab_size=256)
  assert again.model_proto == tok.model_proto


def test_round_trip_and_target_concatenation(fact_data, tok):
  for q in fact_data.queries[:40]:
    p, t = tok.encode(q["prompt"]), tok.encode(q["target"])
    assert tok.decode(p + t) == q["prompt"] + q["target"]
    # the target's tokens are those of the object inside the full text
    assert tok.encode(q["prompt"] + q["target"]) == p + t
    assert tok.id_to_piece(t[0]).startswith("\u2581")
    assert tok.unk_id not in p + t


def test_vocab_size_capped_for_small_corpus(fact_data, caplog):
  texts = [c["text"] for c in fact_data.corpus[:50]]
  with caplog.at_level(py_logging.WARNING):
    tok = tokenizer_lib.train_tokenizer(texts, vocab_size=100_000)
  assert tok.vocab_size < 100_000
  assert "too large" in caplog.text


def test_get_tokenizer_trains_once_then_loads(fact_data, tmp_path):
  path = str(tmp_path / "tok" / "spm.model")
  ds = _Dataset(fact_data)
  tok = tokenizer_lib.get_tokenizer(ds, _config(), path=path)
  mtime = os.path.getmtime(path)
  again = tokenizer_lib.get_tokenizer(ds, _config(), path=path)
  assert again.model_proto == tok.model_proto and os.path.getmtime(path) == mtime
  with pytest.raises(ValueError, match="another dataset"):
    tokenizer_lib.get_tokenizer(ds, _config(vocab_size=300), path=path)
  assert tokenizer_lib.Tokenizer.load(path).encode("a b") == tok.encode("a b")


# --- tokenize_corpus / tokenize_queries -------------------------------------


def test_corpus_examples(fact_data, tok):
  recs = fact_data.corpus[:30]
  ex = batching.tokenize_corpus(tok, recs, seq_len=48)
  assert ex.inputs.shape == (30, 48) and ex.inputs.dtype == np.int32
  for i, rec in enumerate(recs):
    s = [tok.bos_id] + tok.encode(rec["text"]) + [tok.eos_id]
    n = len(s) - 1
    np.testing.assert_array_equal(ex.inputs[i, :n], s[:-1])
    np.testing.assert_array_equal(ex.targets[i, :n], s[1:])
    assert (ex.inputs[i, n:] == 0).all() and (ex.targets[i, n:] == 0).all()
    np.testing.assert_array_equal(ex.loss_mask[i], np.arange(48) < n)
    np.testing.assert_array_equal(ex.pad_mask[i], np.arange(48) < n)
    assert ex.ids[i] == rec["sentence_id"]
  assert ex.prompt_len is None


def test_corpus_overflow(fact_data, tok, caplog):
  recs = fact_data.corpus[:30]
  lengths = [len(tok.encode(r["text"])) + 2 for r in recs]
  seq_len = int(np.median(lengths))
  n_long = sum(n > seq_len + 1 for n in lengths)
  assert n_long > 0
  with caplog.at_level(py_logging.WARNING):
    ex = batching.tokenize_corpus(tok, recs, seq_len=seq_len)
  assert f"{n_long} of 30 corpus sentences exceed" in caplog.text
  assert ex.pad_mask.sum(1).max() == seq_len
  long_row = int(np.argmax(lengths))
  assert ex.loss_mask[long_row].all() and ex.targets[long_row, -1] != tok.eos_id
  with pytest.raises(ValueError, match="exceed seq_len"):
    batching.tokenize_corpus(tok, recs, seq_len=seq_len, overflow="error")


def test_empty_sentence_is_an_error(tok):
  with pytest.raises(ValueError, match="sentence 7"):
    batching.tokenize_corpus(tok, [dict(sentence_id=7, text="", fact_ids=[])], seq_len=8)


def test_query_examples_mask_only_the_target(fact_data, tok):
  qs = fact_data.queries[:20]
  ex = batching.tokenize_queries(tok, qs, seq_len=32)
  for i, q in enumerate(qs):
    p, t = tok.encode(q["prompt"]), tok.encode(q["target"])
    assert ex.prompt_len[i] == 1 + len(p) and ex.target_len[i] == len(t)
    s = [tok.bos_id] + p + t
    n = len(s) - 1
    np.testing.assert_array_equal(ex.inputs[i, :n], s[:-1])
    np.testing.assert_array_equal(ex.targets[i, :n], s[1:])
    masked = np.nonzero(ex.loss_mask[i])[0]
    np.testing.assert_array_equal(ex.targets[i, masked], t)  # exactly the answer tokens
    assert masked[0] == ex.prompt_len[i] - 1 and len(masked) == len(t)
    assert tok.eos_id not in ex.targets[i]
    np.testing.assert_array_equal(ex.pad_mask[i], np.arange(32) < n)
    assert ex.ids[i] == q["query_id"]


def test_query_too_long_is_an_error(fact_data, tok):
  q = fact_data.queries[0]
  n = len(tok.encode(q["prompt"])) + len(tok.encode(q["target"]))
  with pytest.raises(ValueError, match=f"Query {q['query_id']} needs"):
    batching.tokenize_queries(tok, [q], seq_len=n - 1)
  batching.tokenize_queries(tok, [q], seq_len=n)  # BOS + n tokens fit in n + 1
  t = tok.encode(q["target"])
  ex = batching.tokenize_queries(tok, [q], seq_len=n - 2, overflow="truncate_prompt")
  full = batching.tokenize_queries(tok, [q], seq_len=n)
  assert ex.inputs[0, 0] == tok.bos_id and ex.target_len[0] == len(t)
  assert ex.prompt_len[0] == full.prompt_len[0] - 2
  np.testing.assert_array_equal(ex.targets[0][ex.loss_mask[0] > 0], t)
  np.testing.assert_array_equal(ex.inputs[0, 1:], full.inputs[0, 3:])  # prompt's end kept
  with pytest.raises(ValueError, match="empty target"):
    batching.tokenize_queries(tok, [dict(q, target="")], seq_len=32)


# --- iterate_batches ---------------------------------------------------------


def _examples(n, seq_len=4):
  inputs = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len) + 1
  return batching.Examples(
    inputs=inputs,
    targets=inputs + 1,
    loss_mask=np.ones((n, seq_len), np.float32),
    pad_mask=np.ones((n, seq_len), bool),
    ids=np.arange(100, 100 + n, dtype=np.int64),
  )


def test_batches_cover_once_with_padding_rows():
  ex = _examples(10)
  batches = list(batching.iterate_batches(ex, batch_size=4))
  assert len(batches) == 3
  ids = np.concatenate([b["ids"] for b in batches])
  np.testing.assert_array_equal(ids[:10], ex.ids)
  np.testing.assert_array_equal(ids[10:], [-1, -1])
  last = batches[-1]
  assert set(last) == set(batching.BATCH_KEYS)
  assert (last["loss_mask"][2:] == 0).all() and (~last["pad_mask"][2:]).all()
  assert (last["inputs"][2:] == 0).all()
  np.testing.assert_array_equal(last["inputs"][:2], ex.inputs[8:])
  assert len(list(batching.iterate_batches(ex, batch_size=4, pad_last=False))) == 2


def test_shuffle_is_deterministic_per_epoch():
  ex = _examples(12)
  run = lambda seed: [
    b["ids"].tolist() for b in batching.iterate_batches(ex, batch_size=4, shuffle=True, seed=seed, epochs=2)
  ]
  a, b = run(0), run(0)
  assert a == b and a != run(1)
  epoch0, epoch1 = sum(a[:3], []), sum(a[3:], [])
  assert sorted(epoch0) == sorted(epoch1) == ex.ids.tolist()
  assert epoch0 != epoch1


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_disjoint_and_covering(process_count):
  ex = _examples(23)
  kw = dict(batch_size=8, shuffle=True, seed=3, epochs=2)
  full = [b["ids"] for b in batching.iterate_batches(ex, **kw)]
  per = [
    [b["ids"] for b in batching.iterate_batches(ex, process_index=p, process_count=process_count, **kw)]
    for p in range(process_count)
  ]
  for step, global_ids in enumerate(full):
    parts = [per[p][step] for p in range(process_count)]
    assert all(len(x) == 8 // process_count for x in parts)
    np.testing.assert_array_equal(np.concatenate(parts), global_ids)
  real = [i for p in per for b in p[:3] for i in b if i >= 0]  # the first epoch
  assert sorted(real) == ex.ids.tolist()


def test_forever_and_bad_arguments():
  ex = _examples(5)
  it = batching.iterate_batches(ex, batch_size=2, epochs=None, pad_last=False)
  assert len([next(it) for _ in range(7)]) == 7
  with pytest.raises(ValueError, match="multiple of process_count"):
    next(batching.iterate_batches(ex, batch_size=3, process_count=2))
  with pytest.raises(ValueError, match="no batch"):
    next(batching.iterate_batches(ex, batch_size=8, epochs=None, pad_last=False))
