"""A user's own model, checkpoint, corpus and queries, as the jobs load them (configs/own_model.py).

  is_own_data(config)                    # config.corpus.path is set: read it, not config.dataset
  data = load_own_data(config, host_slice=True, align_rows=4096)   # this host's slice (encode, fit_hessian, retrieve)
  model = build_model(config, vocab_size=tok.vocab_size)           # config.model.factory -> apply_fn + params
  params, opt_state, step = restore_checkpoint(config, model, param_regex=...)

The data classes mirror `workdir.RunData` (dataset.name / .fingerprint,
tokenizer, corpus, queries, query_records, text_of, texts_for_rows), so
the encode, fit_hessian and retrieve jobs run unchanged on either; results
also carry each proponent's source ("doc_id#window", `source_of`). On a host
slice, retrieve gathers the results' texts and sources from the hosts
(`OwnData.gather_texts_and_sources`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax import checkpoint_layout, projection
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import optimizer_correction as oc
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import queries as queries_lib
from trackstar_jax.data import sources as sources_lib
from trackstar_jax.data import tokenizers as tokenizers_lib
from trackstar_jax.models import factory as factory_lib

_STAT_FIELDS = ("documents", "empty", "examples", "windowed", "truncated", "tokens", "dropped_tokens")


def is_own_data(config) -> bool:
  return bool(config.get("corpus") and config.corpus.path)


def is_own_checkpoint(config) -> bool:
  return bool(config.get("checkpoint") and config.checkpoint.path)


# ----------------------------------------------------------------------------
# Corpus, tokenizer, queries.


@dataclasses.dataclass
class OwnDataset:
  """What the jobs read of a dataset: its name (config.dataset), fingerprint, corpus and query records."""

  name: str
  fingerprint: str
  corpus: corpus_lib.Corpus
  queries: list[dict[str, Any]]


@dataclasses.dataclass
class OwnData:
  """A user's corpus and queries, tokenized (the interface of `workdir.RunData`)."""

  dataset: OwnDataset
  tokenizer: tokenizers_lib.TextTokenizer
  tokenizer_path: str
  corpus: Any  # data.batching.Examples, or a data.corpus.HostView of this host's slice
  queries: Any  # data.batching.Examples
  stats: dict[str, int]  # corpus stats summed over the hosts: documents, empty (skipped), examples, windowed, ...

  @property
  def query_records(self) -> list[dict[str, Any]]:
    return self.dataset.queries

  def text_of(self, example_id: int) -> str:
    return self.dataset.corpus.text_of(example_id)

  def source_of(self, example_id: int) -> str:
    """ "doc_id#window" of an example: its document and window."""
    return self.dataset.corpus.id_of(example_id)

  def texts_for_rows(self, rows, ids) -> dict[int, str]:
    """{example id: text} of store rows `rows` (ids: the corpus's example ids, by row)."""
    return {int(ids[r]): self.text_of(int(ids[r])) for r in rows if r >= 0}

  def gather_texts_and_sources(self, rows) -> tuple[dict[int, str], dict[int, str]]:
    """({example id: text}, {example id: "doc_id#window"}) of store rows `rows`, on a host slice (collective).

    Every process passes the same rows (-1: none) and names those in its own
    rows (`HostView.local_rows`); each row is named by exactly one process.
    """
    lo, hi = self.corpus.local_rows
    mine = [int(self.corpus.ids[r]) for r in rows if lo <= r < hi]
    texts, sources = {}, {}
    for host in mesh_lib.allgather_object([[i, self.text_of(i), self.source_of(i)] for i in mine]):
      for i, text, source in host:
        texts[int(i)], sources[int(i)] = text, source
    want = {int(r) for r in rows if r >= 0}
    if len(texts) != len(want):  # the hosts' local_rows cover the corpus, each row once
      raise RuntimeError(f"{len(want)} store rows asked for, {len(texts)} named by the hosts' corpus slices.")
    return texts, sources


def load_tokenizer(config) -> tokenizers_lib.TextTokenizer:
  t = config.tokenizer
  if not t.get("path"):
    raise ValueError(
      "config.corpus.path is set but config.tokenizer.path is not: name the model's tokenizer "
      "(a sentencepiece .model or a Hugging Face tokenizer.json)."
    )
  return tokenizers_lib.load_tokenizer(
    t.path,
    kind=t.kind or None,
    add_bos=t.add_bos,
    add_eos=t.add_eos,
    bos_token=t.bos_token or None,
    eos_token=t.eos_token or None,
  )


def _gathered_stats(stats: corpus_lib.CorpusStats, *, sliced: bool) -> dict[str, int]:
  mine = np.asarray([[getattr(stats, f) for f in _STAT_FIELDS]], np.int64)
  total = mesh_lib.allgather(mine).sum(0) if sliced else mine[0]
  return {f: int(v) for f, v in zip(_STAT_FIELDS, total)}


def load_own_data(
  config, *, host_slice: bool = False, align_rows: int | None = None, queries: bool | None = None
) -> OwnData:
  """The corpus (all of it, or this host's slice), the tokenizer and the queries of `config`.

  Args:
    config: with `corpus.path`, `queries.path`, `tokenizer.path` (configs/own_model.py).
    host_slice: read only this process's contiguous slice of the corpus rows
      (`data.corpus`); `corpus` is then a `HostView` for `trackstar_jax.encode`,
      and the queries are not read unless `queries=True` (encoding the corpus
      does not need them; fitting R and retrieving do; their gold documents
      then resolve across the hosts, `Corpus.example_ids_of_each`).
    align_rows: with host_slice, the store's chunk_rows (see `load_corpus`).
    queries: read the queries (default: unless host_slice).
  """
  read_queries = not host_slice if queries is None else bool(queries)
  tokenizer = load_tokenizer(config)
  c = config.corpus
  source = sources_lib.open_source(
    c.path, format=c.format or None, split=c.split or None, data_dir=config.data_dir or None
  )
  sliced = host_slice and jax.process_count() > 1
  corpus = corpus_lib.load_corpus(
    source,
    tokenizer=tokenizer,
    seq_len=int(config.seq_len),
    text_field=c.text_field,
    ids_field=c.ids_field or None,
    id_field=c.id_field or None,
    overflow=c.overflow,
    stride=int(c.stride) or None,
    process_index=jax.process_index() if sliced else 0,
    process_count=jax.process_count() if sliced else 1,
    align_rows=align_rows if sliced else None,
  )
  stats = _gathered_stats(corpus.stats, sliced=sliced)
  if stats["empty"]:
    logging.warning("corpus %s: %d empty documents skipped (of %d rows).", c.path, stats["empty"], len(source))
  if not stats["examples"]:
    raise ValueError(f"Corpus {c.path} has no examples: all {len(source)} documents are empty.")
  q = config.queries
  if not read_queries:
    queries = queries_lib.Queries(examples=None, records=[])
  elif not q.path:
    raise ValueError("config.queries.path is not set: name a JSONL file of {prompt, target} queries.")
  else:
    queries = queries_lib.load_queries(
      q.path,
      tokenizer=tokenizer,
      seq_len=int(config.seq_len),
      prompt_field=q.prompt_field,
      target_field=q.target_field,
      id_field=q.id_field or None,
      # Gold documents resolve against the whole corpus: on a host slice, collectively (every host reads the queries).
      gold_field=q.gold_field or None,
      corpus=corpus if q.gold_field else None,
      overflow=q.overflow,
    )
  dataset = OwnDataset(
    name=str(config.dataset), fingerprint=corpus.fingerprint(), corpus=corpus, queries=queries.records
  )
  return OwnData(
    dataset=dataset,
    tokenizer=tokenizer,
    tokenizer_path=str(config.tokenizer.path),
    corpus=corpus.host_view() if sliced else corpus.examples,
    queries=queries.examples,
    stats=stats,
  )


# ----------------------------------------------------------------------------
# The model: config.model.factory.


@dataclasses.dataclass
class BuiltModel:
  """What a factory made, as the encoder takes it: `apply_fn(params, inputs, pad_mask) -> logits` and params."""

  apply_fn: Any
  params: Any  # the module's own (initial) params, or their shapes: what a checkpoint is restored into
  kind: str  # linen | nnx | functional
  factory: str
  vocab_size: int  # the logits' last axis


def build_model(config, *, vocab_size: int) -> BuiltModel:
  """The model of `config.model.factory` (models/factory.py: the contract), with its vocabulary checked."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  spec = factory_lib.factory_name(config.model)
  obj = factory_lib.import_factory(spec)(config.model, vocab_size=int(vocab_size), seq_len=int(config.seq_len))
  t = int(config.seq_len)
  tokens, mask = jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), bool)
  nnx = _nnx_if_imported()
  if isinstance(obj, nn.Module):
    params = jax.eval_shape(lambda: obj.init(jax.random.key(0), tokens, mask))
    apply_fn, kind = obj.apply, "linen"
  elif nnx is not None and isinstance(obj, nnx.Module):
    from trackstar_jax import nnx_adapter  # pylint: disable=g-import-not-at-top

    apply_fn, params = nnx_adapter.functional(model=obj)
    kind = "nnx"
  elif isinstance(obj, tuple) and len(obj) == 2 and callable(obj[0]):
    (apply_fn, params), kind = obj, "functional"
  else:
    raise TypeError(
      f"model.factory={spec!r} returned a {type(obj).__name__}; expected a Flax Linen module, a Flax NNX module "
      "or (apply_fn, params) (see trackstar_jax/models/factory.py)."
    )
  logits = jax.eval_shape(apply_fn, params, tokens, mask)
  if len(logits.shape) != 3 or logits.shape[:2] != (1, t):
    raise ValueError(f"model.factory={spec!r}: apply_fn gives shape {logits.shape}, expected logits [B, T, V].")
  return BuiltModel(apply_fn=apply_fn, params=params, kind=kind, factory=spec, vocab_size=int(logits.shape[-1]))


def _nnx_if_imported():
  import sys  # pylint: disable=g-import-not-at-top

  if "flax.nnx" not in sys.modules:
    return None  # no NNX module can exist
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return nnx


# ----------------------------------------------------------------------------
# The checkpoint: config.checkpoint.{path, step, params, opt_state}.


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {p: tuple(np.shape(x)) for p, x in projection.flatten_paths(tree).items()}


def _strip_value(tree):
  """NNX states saved as they are: {"kernel": {"value": x}} -> {"kernel": x}."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return tree["value"]
    return {k: _strip_value(v) for k, v in tree.items()}
  return tree


def fit_params(restored, template, *, where: str):
  """The restored params in the structure of the model's own (`template`); refuses other paths or shapes.

  Accepted: the same tree; Linen's `variables["params"]` without the `params` level; NNX states with `value` leaves.
  """
  want = _shapes(template)
  candidates = [restored, _strip_value(restored)]
  if isinstance(template, dict) and set(template) == {"params"}:
    candidates += [{"params": c} for c in list(candidates)]
  for cand in candidates:
    if _shapes(cand) == want:
      by_path = projection.flatten_paths(cand)
      leaves = [by_path[p] for p in projection.flatten_paths(template)]
      return jax.tree.unflatten(jax.tree.structure(template), leaves)
  have = _shapes(candidates[1])
  if isinstance(template, dict) and set(template) == {"params"} and not any(p.startswith("params/") for p in have):
    want = {p.removeprefix("params/"): s for p, s in want.items()}
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = [f"{p}: {have[p]} vs {want[p]}" for p in sorted(set(want) & set(have)) if have[p] != want[p]]
  raise ValueError(
    f"The params at {where} do not fit the model: "
    + "; ".join(
      s
      for s in (
        f"the model has {missing[:8]} not in the checkpoint" if missing else "",
        f"the checkpoint has {extra[:8]} not in the model" if extra else "",
        f"shapes differ (checkpoint vs model): {shapes[:8]}" if shapes else "",
      )
      if s
    )
    + ". Check checkpoint.params and model.factory."
  )


def restore_checkpoint(config, model: BuiltModel, *, param_regex: str) -> tuple[Any, Any, int]:
  """(params, second moments or None, step) from `config.checkpoint`; only those subtrees are read."""
  ck = config.checkpoint
  step = None if int(ck.step) < 0 else int(ck.step)
  where = checkpoint_layout.locate(ck.path, ck.params, step=step)
  params = fit_params(checkpoint_layout.restore_subtree(where), model.params, where=f"{where.item_dir} {ck.params!r}")
  opt_state = None
  if config.encoder.correction != "none":
    if not ck.opt_state:
      raise ValueError(
        f"encoder.correction={config.encoder.correction!r} needs the optimizer state: set checkpoint.opt_state "
        "(e.g. 'state/opt_state'), or encoder.correction='none'."
      )
    opt_state = oc.restore_second_moments_at(
      checkpoint_layout.locate(ck.path, ck.opt_state, step=step), paths=param_regex
    )
  return params, opt_state, -1 if where.step is None else int(where.step)
