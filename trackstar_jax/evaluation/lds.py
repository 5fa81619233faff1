"""The linear datamodeling score (LDS): does a method's score predict what removing training data does?

  masks = subset_masks(num_examples=N, num_subsets=M, fraction=0.5, seed=0)      # [M, N] bool
  # ... train model j on the examples of masks[j]; loss[j, q] = its target loss on query q ...
  pred = predicted_effects(scores, masks)                # [Q, M]: sum_{z in S_j} score(q, z)
  result = summarize(predictions=pred, losses=loss, bootstrap_samples=1000, seed=0)
  result["lds"], result["interval_queries"]

A method's attribution score(q, z) claims how much training example z helps
query q. Its linear datamodel predicts the effect of training on a subset S
as g(q, S) = sum_{z in S} score(q, z). Training M models on random subsets
S_1..S_M (each a `fraction` of the corpus) measures the real effect; for each
query, LDS(q) is the Spearman rank correlation over the M subsets between
the prediction g(q, S_j) and the measured quantity, and the LDS is its mean
over queries (Park et al., "TRAK", ICML 2023).

Sign: a high score means "helps the answer", i.e. training on z *lowers* the
query's target loss (TrackStar proponents). The measured quantity is
therefore -loss(q; model_j): a method whose high-scoring examples are the
ones that lower the loss gets a positive LDS. A method that knows nothing
(random scores) has an expected LDS of 0.

Every subset has the same size, so any constant added to a method's scores
shifts every prediction of a query alike and leaves its ranks unchanged.

Intervals are percentile bootstraps of the mean LDS: resampling queries (the
uncertainty from which queries were asked) and, separately, resampling the
M subsets (the uncertainty from which models were trained). Queries whose
LDS is undefined (a constant prediction or a constant loss across models,
e.g. BM25 scores that are 0 for every corpus example) are left out and
counted in `n_undefined`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import math
from typing import Any

import numpy as np


def rankdata(x: Any, axis: int = -1) -> np.ndarray:
  """1-based ranks along `axis`, ties given the average of the ranks they span (float64).

  The "average" method of `scipy.stats.rankdata`, vectorized over the other axes.

  Example:
    >>> rankdata([10.0, 30.0, 20.0, 20.0])
    array([1. , 4. , 2.5, 2.5])
  """
  x = np.moveaxis(np.asarray(x), axis, -1)
  n = x.shape[-1]
  order = np.argsort(x, axis=-1, kind="stable")
  xs = np.take_along_axis(x, order, axis=-1)
  pos = np.broadcast_to(np.arange(n), x.shape)
  differs = xs[..., 1:] != xs[..., :-1]
  edge = np.ones(x.shape[:-1] + (1,), bool)
  starts = np.concatenate([edge, differs], axis=-1)  # first element of a tie group
  ends = np.concatenate([differs, edge], axis=-1)  # last element of a tie group
  first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
  last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, n - 1), -1), axis=-1), -1)
  ranks = np.empty(x.shape, np.float64)
  np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
  return np.moveaxis(ranks, -1, axis)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a - a.mean(axis=-1, keepdims=True)
  b = b - b.mean(axis=-1, keepdims=True)
  den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, (a * b).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(a: Any, b: Any, axis: int = -1) -> np.ndarray:
  """Spearman rank correlation of `a` and `b` along `axis` (the Pearson correlation of their tie-averaged ranks).

  NaN where either side is constant along `axis` (no ranking to compare).

  Example:
    >>> float(spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0]))
    0.8
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"spearman needs equal shapes, got {a.shape} and {b.shape}.")
  ra, rb = (np.moveaxis(rankdata(v, axis=axis), axis, -1) for v in (a, b))
  return _pearson(ra, rb)


def subset_masks(*, num_examples: int, num_subsets: int, fraction: float, seed: int) -> np.ndarray:
  """[M, N] bool: subset j holds exactly round(fraction * N) examples, drawn with `np.random.default_rng([seed, j])`.

  Subset j depends only on (seed, j, N, fraction): M = 64 extends M = 8 by
  56 more subsets.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"lds.fraction={fraction} must be in (0, 1): a subset of the corpus, not all or none of it.")
  size = int(round(fraction * num_examples))
  if not 0 < size < num_examples:
    raise ValueError(f"fraction={fraction} of {num_examples} examples gives an empty or full subset ({size}).")
  masks = np.zeros((num_subsets, num_examples), bool)
  for j in range(num_subsets):
    masks[j, np.random.default_rng([int(seed), j]).permutation(num_examples)[:size]] = True
  return masks


def model_seeds(*, num_models: int, seed: int) -> np.ndarray:
  """[M] int64 training seeds (init and batch order) of the subset models: `SeedSequence([seed, j, 1])`."""
  return np.asarray(
    [int(np.random.SeedSequence([int(seed), j, 1]).generate_state(1)[0]) for j in range(num_models)], np.int64
  )


def predicted_effects(scores: Any, masks: Any) -> np.ndarray:
  """The linear datamodel's predictions sum_{z in S_j} score(q, z): scores [Q, N], masks [M, N] -> [Q, M] float64."""
  scores, masks = np.asarray(scores, np.float64), np.asarray(masks, np.float64)
  if scores.shape[1] != masks.shape[1]:
    raise ValueError(f"scores cover {scores.shape[1]} corpus examples but the subsets {masks.shape[1]}.")
  return scores @ masks.T


def accumulate_effects(blocks: Iterable[tuple[int, int, Any]], masks: Any, *, num_queries: int) -> np.ndarray:
  """`predicted_effects` of a score matrix given block by block (never held whole).

  Args:
    blocks: (query row, corpus row, scores [q, n]) of blocks of the [Q, N]
      matrix; blocks tile it (each entry exactly once), in any order.
    masks: [M, N] subsets.
    num_queries: Q.

  Returns:
    [Q, M] float64.
  """
  masks = np.asarray(masks, np.float64)
  out = np.zeros((num_queries, masks.shape[0]), np.float64)
  for q0, z0, s in blocks:
    s = np.asarray(s, np.float64)
    out[q0 : q0 + s.shape[0]] += s @ masks[:, z0 : z0 + s.shape[1]].T
  return out


def lds_per_query(predictions: Any, losses: Any) -> np.ndarray:
  """LDS(q) = spearman_j(prediction[q, j], -loss[j, q]): predictions [Q, M], losses [M, Q] -> [Q] (NaN: undefined)."""
  predictions, losses = np.asarray(predictions, np.float64), np.asarray(losses, np.float64)
  if predictions.shape != losses.T.shape:
    raise ValueError(f"predictions {predictions.shape} must be [Q, M] for losses {losses.shape} [M, Q].")
  return spearman(predictions, -losses.T)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
  values = values[np.isfinite(values)]
  if not len(values):
    return (math.nan, math.nan)
  lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return (float(lo), float(hi))


def bootstrap_queries(per_query: Any, *, samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
  """Percentile interval of the mean of `per_query` (NaNs left out) over queries resampled with replacement."""
  v = np.asarray(per_query, np.float64)
  v = v[np.isfinite(v)]
  if not len(v) or samples <= 0:
    return (math.nan, math.nan)
  rng = np.random.default_rng([int(seed), 0])
  means = np.empty(samples)
  for start in range(0, samples, 256):
    n = min(256, samples - start)
    means[start : start + n] = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
  return _interval(means, level)


class _TieGroups:
  """The sorted order and tie groups of x [Q, M] along M, for ranks under any column weights (no sort per draw)."""

  def __init__(self, x: np.ndarray):
    q, m = x.shape
    self.order = np.argsort(x, axis=-1)
    xs = np.take_along_axis(x, self.order, axis=-1)
    pos = np.broadcast_to(np.arange(m), x.shape)
    differs = xs[:, 1:] != xs[:, :-1]
    edge = np.ones((q, 1), bool)
    self.first = np.maximum.accumulate(np.where(np.concatenate([edge, differs], 1), pos, 0), axis=-1)
    ends = np.where(np.concatenate([differs, edge], 1), pos, m - 1)
    self.last = np.flip(np.minimum.accumulate(np.flip(ends, -1), axis=-1), -1)
    self.inverse = np.argsort(self.order, axis=-1)

  def ranks(self, w: np.ndarray) -> np.ndarray:
    """Tie-averaged ranks [n, Q, M] of the data in which column k appears w[i, k] times (draw i of w [n, M]).

    A column drawn c times is c tied copies: its rank is (weight of the values
    below its tie group) + (the group's total weight + 1) / 2.
    """
    cum = np.cumsum(w[:, self.order], axis=-1)  # [n, Q, M] in sorted order
    cum = np.concatenate([np.zeros(cum.shape[:2] + (1,)), cum], axis=-1)
    below = np.take_along_axis(cum, np.broadcast_to(self.first, cum[..., 1:].shape), axis=-1)
    upto = np.take_along_axis(cum, np.broadcast_to(self.last + 1, below.shape), axis=-1)
    sorted_ranks = below + (upto - below + 1.0) / 2.0
    return np.take_along_axis(sorted_ranks, np.broadcast_to(self.inverse, below.shape), axis=-1)


def _weighted_pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Pearson correlation along the last axis with integer weights w (broadcast against a, b)."""
  total = w.sum(axis=-1, keepdims=True)
  a = a - (w * a).sum(axis=-1, keepdims=True) / total
  b = b - (w * b).sum(axis=-1, keepdims=True) / total
  den = np.sqrt((w * a * a).sum(axis=-1) * (w * b * b).sum(axis=-1))
  num = (w * a * b).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 1e-12 * np.maximum(1.0, np.abs(num)), num / np.where(den > 0, den, 1.0), np.nan)


def resampled_lds(predictions: Any, losses: Any, counts: Any) -> np.ndarray:
  """LDS(q) on resampled subsets: [n, Q] for counts [n, M] (draw i takes subset j counts[i, j] times).

  Equals `lds_per_query` of the columns repeated (repeats tie), computed
  from one sort per query instead of one per draw.
  """
  pred, neg = np.asarray(predictions, np.float64), -np.asarray(losses, np.float64).T  # [Q, M] both
  w = np.asarray(counts, np.float64)
  ga, gb = _TieGroups(pred), _TieGroups(neg)
  return _weighted_pearson(ga.ranks(w), gb.ranks(w), w[:, None, :])


def bootstrap_subsets(
  predictions: Any, losses: Any, *, samples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
  """Percentile interval of the mean LDS over the M subsets (models) resampled with replacement.

  Each draw recomputes every query's Spearman correlation over the drawn
  subsets (repeats are ties, `resampled_lds`); its mean over the defined
  queries is one sample.
  """
  pred = np.asarray(predictions, np.float64)
  q, m = pred.shape
  if samples <= 0 or m < 2:
    return (math.nan, math.nan)
  rng = np.random.default_rng([int(seed), 1])
  means = np.empty(samples)
  chunk = max(1, 2**21 // max(1, q * m))  # draws per vectorized step
  for start in range(0, samples, chunk):
    n = min(chunk, samples - start)
    counts = np.stack([np.bincount(c, minlength=m) for c in rng.integers(0, m, size=(n, m))])
    s = resampled_lds(pred, losses, counts)  # [n, Q]
    ok = np.isfinite(s)
    with np.errstate(invalid="ignore"):
      means[start : start + n] = np.where(ok, s, 0.0).sum(axis=1) / ok.sum(axis=1)
  return _interval(means, level)


def summarize(
  *, predictions: Any, losses: Any, bootstrap_samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
  """The LDS of one method: mean over queries, bootstrap intervals, counts.

  Args:
    predictions: [Q, M] predicted effects (`predicted_effects`).
    losses: [M, Q] measured target losses of the M subset models.
    bootstrap_samples: draws per interval (0: no intervals).
    seed: bootstrap seed.
    level: interval coverage.

  Returns:
    dict: `lds` (mean LDS(q) over defined queries), `interval_queries`,
    `interval_subsets` ([lo, hi]), `level`, `n_queries` (defined),
    `n_undefined`, `num_models`, and `per_query` ([Q], NaN where undefined).
  """
  per_query = lds_per_query(predictions, losses)
  ok = np.isfinite(per_query)
  return dict(
    lds=float(per_query[ok].mean()) if ok.any() else math.nan,
    interval_queries=list(bootstrap_queries(per_query, samples=bootstrap_samples, seed=seed, level=level)),
    interval_subsets=list(bootstrap_subsets(predictions, losses, samples=bootstrap_samples, seed=seed, level=level)),
    level=float(level),
    n_queries=int(ok.sum()),
    n_undefined=int((~ok).sum()),
    num_models=int(np.shape(losses)[0]),
    per_query=per_query,
  )


def _fmt(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def to_markdown(report: Mapping[str, Any]) -> str:
  """The LDS table of a `jobs.lds` report (its JSON): one row per method."""
  lines = [
    f"LDS: {report.get('num_models')} models, each trained on a random {report.get('fraction', 0.5):.0%} of the "
    f"{report.get('num_examples')} corpus examples ({report.get('num_steps')} steps); Spearman over the models "
    "between each method's predicted effect (sum of scores over the subset) and -target loss, mean over queries.",
    "",
    f"| method | LDS | {round(100 * report.get('level', 0.95))}% CI (queries) | CI (subsets) | queries |",
    "|---|---|---|---|---|",
  ]
  for name, m in report.get("methods", {}).items():
    if m.get("skipped"):
      lines.append(f"| {name} | – | – | – | skipped: {m['skipped']} |")
      continue
    iq, isub = m.get("interval_queries") or [None, None], m.get("interval_subsets") or [None, None]
    lines.append(
      f"| {name} | {_fmt(m['lds'])} | [{_fmt(iq[0])}, {_fmt(iq[1])}] | [{_fmt(isub[0])}, {_fmt(isub[1])}] | "
      f"{m['n_queries']}" + (f" ({m['n_undefined']} undefined)" if m.get("n_undefined") else "") + " |"
    )
  return "\n".join(lines) + "\n"
