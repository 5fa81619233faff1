"""Fact datasets (synthetic world, LAMA T-REx), tokenizer and batching.

ds = load_dataset(config)          # generates/reads once, then reuses
ds.corpus[i]   -> {sentence_id, text, fact_ids}
ds.queries[j]  -> {query_id, fact_id, relation, prompt, target, answers,
                   gold_sentence_ids, frequency}
                  (+ template_fact_ids / split for mixed LAMA training:
                  config.lama_mixed, lama_queries; see `lama_mixed`)
tok = tokenizer.get_tokenizer(ds, config, path=...)
ex = batching.tokenize_corpus(tok, ds.corpus, seq_len=config.seq_len)
"""

from __future__ import annotations

import collections.abc
from collections.abc import Iterator
import contextlib
import dataclasses
import fcntl
import importlib.util
import os
from typing import Any

from absl import logging

from trackstar_jax.data import lama, lama_mixed, records, world
from trackstar_jax.data.records import FactData

# `builders` (TFDS) is imported where used: the generators, tokenizer and
# batching work without tensorflow_datasets installed.

DATASETS = ("synthetic_facts", "lama_trex")


class RecordSequence(collections.abc.Sequence):
  """Random access to one split of a data source, as plain python dicts."""

  def __init__(self, source, split: str, *, chunk: int = 1024, cache: bool = True):
    """Wraps `source` (a TFDS data source of `split`).

    With `cache`, the first full iteration keeps the decoded records in memory
    (our datasets are small: ~65k sentences for LAMA) and later reads use them.
    """
    self._source = source
    self._split = split
    self._chunk = chunk
    self._cache_on_iter = cache
    self._cache: list[dict[str, Any]] | None = None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.take(range(*index.indices(len(self))))
    n = len(self)
    i = int(index)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f"{self._split} index {index} out of range [0, {n}).")
    if self._cache is not None:
      return self._cache[i]
    from trackstar_jax.data import builders  # pylint: disable=g-import-not-at-top

    return builders.decode(self._source[i], self._split)

  def take(self, indices) -> list[dict[str, Any]]:
    """Records at `indices` (one batched read)."""
    from trackstar_jax.data import builders  # pylint: disable=g-import-not-at-top

    indices = [int(i) for i in indices]
    if self._cache is not None:
      return [self._cache[i] for i in indices]
    if not indices:
      return []
    return [builders.decode(ex, self._split) for ex in self._source.__getitems__(indices)]

  def _iter_source(self) -> Iterator[dict[str, Any]]:
    for lo in range(0, len(self), self._chunk):
      yield from self.take(range(lo, min(lo + self._chunk, len(self))))

  def __iter__(self) -> Iterator[dict[str, Any]]:
    if self._cache is None and self._cache_on_iter:
      self.cache()
    if self._cache is not None:
      return iter(self._cache)
    return self._iter_source()

  def cache(self) -> RecordSequence:
    """Decodes every record once and serves later reads from memory."""
    if self._cache is None:
      self._cache = list(self._iter_source())
    return self


@dataclasses.dataclass
class FactDataset:
  """A prepared fact dataset: `.corpus`, `.queries` (sequences of dicts)."""

  name: str
  fingerprint: str
  corpus: collections.abc.Sequence
  queries: collections.abc.Sequence
  data_dir: str = ""  # the TFDS version directory it was read from

  def to_fact_data(self) -> FactData:
    return FactData(corpus=list(self.corpus), queries=list(self.queries))


def load_in_memory(config) -> FactDataset:
  """The dataset of `config`, generated/read directly (no TFDS, no files)."""
  if config.dataset == "synthetic_facts":
    params = world.world_params(config.world)
    data = world.generate_world(**params)
    name = f"synthetic_facts/world_{world.params_hash(params)}/{records.DATASET_VERSION}"
  elif config.dataset == "lama_trex":
    if not config.manual_dir:
      raise ValueError(f"config.dataset='lama_trex' needs {lama.MANUAL_DIR_FLAG}.")
    rels = config.lama_relations or None
    mixed = lama_mixed.options_from_config(config)
    data = lama.read_lama(config.manual_dir, relations=rels, mixed=mixed)
    name = f"lama_trex/{lama.config_name(rels)}{mixed.name()}/{records.DATASET_VERSION}"
  else:
    raise ValueError(f"Unknown config.dataset={config.dataset!r}; known: {DATASETS}.")
  return FactDataset(name=name, fingerprint=data.fingerprint(), corpus=data.corpus, queries=data.queries)


def default_data_dir(config=None) -> str:
  """config.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if config is not None and config.data_dir:
    return os.path.abspath(os.path.expanduser(config.data_dir))
  return os.path.abspath(os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"))


@contextlib.contextmanager
def _file_lock(path: str):
  """Serializes dataset preparation between processes sharing a filesystem."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _builder(cls, cfg, data_dir: str):
  # TFDS wants a predefined config by name and a custom one as an object; our
  # names are hashes of the parameters, so equal names mean equal configs.
  arg = cfg.name if cfg.name in cls.builder_configs else cfg
  return cls(config=arg, data_dir=data_dir, file_format="array_record")


def _sole_lama_build(data_dir: str, rels, manual_dir: str, mixed: lama_mixed.MixedOptions) -> str:
  """The source key of the only prepared lama_trex build of (`rels`, `mixed`) under data_dir ("" if none); else an error."""
  from trackstar_jax.data import builders  # pylint: disable=g-import-not-at-top

  prefix = lama.config_name(rels) + mixed.name() + builders.SOURCE_SEP
  root = os.path.join(data_dir, "lama_trex")
  found = sorted(
    n
    for n in (os.listdir(root) if os.path.isdir(root) else ())
    if n.startswith(prefix)
    and any(os.path.exists(os.path.join(root, n, v, "dataset_info.json")) for v in os.listdir(os.path.join(root, n)))
  )
  what = f"{lama.MANUAL_DIR_FLAG}={manual_dir} does not exist" if manual_dir else f"no {lama.MANUAL_DIR_FLAG}"
  if len(found) > 1:
    raise ValueError(
      f"{what}, and {root} holds {len(found)} builds of these relations from different files: "
      f"{found}. Set {lama.MANUAL_DIR_FLAG} to the folder to use: builds are keyed by its content."
    )
  if found:
    logging.warning(
      "%s: using the only LAMA build of these relations, %s (built from other files cannot be "
      "told apart without them).",
      what,
      os.path.join(root, found[0]),
    )
    return found[0][len(prefix) :]
  return ""


def make_builder(config, *, data_dir: str | None = None):
  """The TFDS builder (not yet prepared) that `config.dataset` names."""
  from trackstar_jax.data import builders  # pylint: disable=g-import-not-at-top

  data_dir = data_dir or default_data_dir(config)
  name = config.dataset
  if name == "synthetic_facts":
    cfg = builders.SyntheticFactsConfig.from_params(world.world_params(config.world))
    return _builder(builders.SyntheticFacts, cfg, data_dir)
  if name == "lama_trex":
    rels = config.lama_relations or None
    mixed = lama_mixed.options_from_config(config)
    manual_dir = config.manual_dir or ""
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else ""
    if manual_dir and os.path.isdir(manual_dir):  # the build of exactly these files
      source = lama.source_fingerprint(manual_dir, relations=rels, patterns=mixed.active)
    else:  # no files to key by: the one earlier build of this relation set and options, if there is exactly one
      source = _sole_lama_build(data_dir, rels, manual_dir, mixed)
    if not source:  # never open an unkeyed build (made before builds were keyed by content)
      if manual_dir:
        lama.available_relations(manual_dir)  # raises: names the flag and the expected files
      raise ValueError(
        f"config.dataset='lama_trex' is not prepared yet and needs {lama.MANUAL_DIR_FLAG}: "
        f"{builders.LamaTrex.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    cfg = builders.LamaTrexConfig.from_relations(rels, source=source, mixed=mixed)
    return _builder(builders.LamaTrex, cfg, data_dir)
  raise ValueError(f"Unknown config.dataset={name!r}; known: {DATASETS}.")


def load_dataset(config, *, data_dir: str | None = None, cache: bool = True) -> FactDataset:
  """Prepares (once) and opens the dataset named by `config.dataset`.

  Args:
    config: the job config (dataset, data_dir, manual_dir, world sections;
      `lama_relations` optional).
    data_dir: TFDS data dir; default `default_data_dir(config)`.
    cache: keep records in memory after the first full pass over a split.

  Returns:
    FactDataset reading records lazily from the array_record files.
  """
  missing = [m for m in ("tensorflow_datasets", "array_record") if importlib.util.find_spec(m) is None]
  if missing:
    logging.warning(
      "%s not installed: building %s in memory instead of as a TFDS dataset (pip install"
      " 'trackstar_jax[data]' to store it once).",
      missing,
      config.dataset,
    )
    return load_in_memory(config)
  builder = make_builder(config, data_dir=data_dir)
  lock = os.path.join(os.path.dirname(os.path.dirname(str(builder.data_dir))), f".{builder.builder_config.name}.lock")
  # A prepared build is only read (no lock file: the data dir may be read-only, e.g. a shared training workdir).
  with contextlib.nullcontext() if builder.is_prepared() else _file_lock(lock):
    if not builder.is_prepared():
      download_config = None
      if config.dataset == "lama_trex":
        manual_dir = config.manual_dir
        if not manual_dir:
          raise ValueError(
            "config.dataset='lama_trex' is not prepared yet and needs"
            f" {lama.MANUAL_DIR_FLAG}: {type(builder).MANUAL_DOWNLOAD_INSTRUCTIONS}"
          )
        manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
        lama.available_relations(manual_dir)  # actionable error before TFDS's own
        lama.read_templates(manual_dir)
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      logging.info("Preparing %s in %s.", builder.builder_config.name, builder.data_dir)
      builder.download_and_prepare(download_config=download_config)
    elif builder.info.metadata is None or "fingerprint" not in builder.info.metadata:
      # Another process prepared it while this one waited for the lock: this builder's info predates the build.
      builder = make_builder(config, data_dir=data_dir)
  sources = builder.as_data_source()
  info = builder.info
  name = f"{builder.name}/{builder.builder_config.name}/{info.version}"
  fingerprint = info.metadata.get("fingerprint") if info.metadata else None
  if not fingerprint:
    raise ValueError(f"{builder.data_dir} has no fingerprint in its metadata: delete it to regenerate.")
  return FactDataset(
    name=name,
    fingerprint=fingerprint,
    corpus=RecordSequence(sources["corpus"], "corpus", cache=cache),
    queries=RecordSequence(sources["queries"], "queries", cache=cache),
    data_dir=str(builder.data_dir),
  )
