"""TFDS builders for the fact datasets, stored as array_record (no TensorFlow).

  synthetic_facts  the generated world (`world.generate_world`); one builder
                   config per set of world parameters, named by their hash, so
                   different parameters never share a directory.
  lama_trex        LAMA T-REx read from a manual directory (`lama.read_lama`);
                   one builder config per relation set, mixed-training options
                   (`lama_mixed.MixedOptions.name`: "" without mixing) *and
                   content* of the files it reads (`lama.source_fingerprint`),
                   so a build from other files or options is never reused: a
                   changed manual dir is rebuilt.

Both have the splits `corpus` and `queries`, written in generation order
(`disable_shuffling=True`: sentence i is record i) and read back by random
access with `builder.as_data_source()` (TFDS's tf-free path; `tfds.load` and
`as_numpy` need TensorFlow and are not used). TFDS features are shared by all
splits, so records carry the union of the corpus and query fields; `decode`
keeps the split's own fields and turns bytes into str. Mixed builds have the
fields of `records.MIXED_KEYS` too; unmixed ones are stored as before them.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from trackstar_jax.data import lama, lama_mixed, records, world

_TEXT_KEYS = ("text", "fact_id", "relation", "prompt", "target")
_TEXT_LIST_KEYS = ("fact_ids", "answers")
_INT_KEYS = ("sentence_id", "query_id", "frequency")
_INT_LIST_KEYS = ("gold_sentence_ids",)
_MIXED_TEXT_KEYS = ("split",)  # records.MIXED_KEYS, by type
_MIXED_TEXT_LIST_KEYS = ("template_fact_ids",)
SPLIT_KEYS = {"corpus": records.CORPUS_KEYS, "queries": records.QUERY_KEYS}


def _features(*, mixed: bool = False) -> tfds.features.FeaturesDict:
  feats: dict[str, Any] = {}
  feats.update({k: tfds.features.Text() for k in _TEXT_KEYS + (_MIXED_TEXT_KEYS if mixed else ())})
  feats.update(
    {
      k: tfds.features.Sequence(tfds.features.Text())
      for k in _TEXT_LIST_KEYS + (_MIXED_TEXT_LIST_KEYS if mixed else ())
    }
  )
  feats.update(dict.fromkeys(_INT_KEYS, np.int64))
  feats.update({k: tfds.features.Sequence(np.int64) for k in _INT_LIST_KEYS})
  return tfds.features.FeaturesDict(feats)


def _encode(rec: dict[str, Any], *, mixed: bool = False) -> dict[str, Any]:
  """A corpus or query record with the other split's fields left empty."""
  out: dict[str, Any] = dict.fromkeys(_TEXT_KEYS + (_MIXED_TEXT_KEYS if mixed else ()), "")
  out.update({k: [] for k in _TEXT_LIST_KEYS + _INT_LIST_KEYS + (_MIXED_TEXT_LIST_KEYS if mixed else ())})
  out.update(dict.fromkeys(_INT_KEYS, -1))
  out.update(rec)
  return out


def decode(example: dict[str, Any], split: str) -> dict[str, Any]:
  """A raw data-source example -> the split's record with python types (and its mixed fields, if stored)."""
  out = {}
  for k in SPLIT_KEYS[split] + tuple(k for k in records.MIXED_KEYS[split] if k in example):
    v = example[k]
    if k in _TEXT_KEYS + _MIXED_TEXT_KEYS:
      out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    elif k in _TEXT_LIST_KEYS + _MIXED_TEXT_LIST_KEYS:
      out[k] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in v]
    elif k in _INT_LIST_KEYS:
      out[k] = [int(x) for x in v]
    else:
      out[k] = int(v)
  return out


def _split_generators(builder, data: records.FactData):
  builder.info.metadata["fingerprint"] = data.fingerprint()
  builder.info.metadata["num_corpus"] = len(data.corpus)
  builder.info.metadata["num_queries"] = len(data.queries)
  return {
    "corpus": builder._generate_examples(data.corpus, "sentence_id"),
    "queries": builder._generate_examples(data.queries, "query_id"),
  }


def _generate(recs: Sequence[dict[str, Any]], key: str, *, mixed: bool = False):
  for rec in recs:
    yield int(rec[key]), _encode(rec, mixed=mixed)


@dataclasses.dataclass(eq=False)
class SyntheticFactsConfig(tfds.core.BuilderConfig):
  """World parameters; build with `SyntheticFactsConfig.from_params`."""

  params: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_params(cls, params: dict[str, Any]) -> SyntheticFactsConfig:
    params = dict(params)
    h = world.params_hash(params)
    return cls(
      name=f"world_{h}", description=f"generate_world({params}), generator v{world.GENERATOR_VERSION}", params=params
    )


class SyntheticFacts(tfds.core.GeneratorBasedBuilder):
  """The synthetic fact world (trackstar_jax.data.world)."""

  VERSION = tfds.core.Version(records.DATASET_VERSION)
  BUILDER_CONFIGS = [
    SyntheticFactsConfig.from_params(
      dict(seed=0, n_entities=400, n_facts=600, max_frequency=200, zipf_a=1.3, n_distractors=2000)
    )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Synthetic facts: corpus sentences with exact fact ids, and queries.",
      features=_features(),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(params=dict(self.builder_config.params)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return _split_generators(self, world.generate_world(**self.builder_config.params))

  def _generate_examples(self, recs, key):
    return _generate(recs, key)


SOURCE_SEP = "_src"  # lama_trex config names: <relation-set name>_src<source fingerprint>


@dataclasses.dataclass(eq=False)
class LamaTrexConfig(tfds.core.BuilderConfig):
  """Which relations to read, from which files, mixed how; build with `LamaTrexConfig.from_relations`."""

  relations: tuple[str, ...] = ()
  source: str = ""  # lama.source_fingerprint of the manual dir ("" = unkeyed)
  mixed_fraction: float = 0.0  # lama_mixed.MixedOptions fields (fraction 0: no mixing)
  mixed_paraphrases: int = lama_mixed.MixedOptions.paraphrases
  mixed_seed: int = 0
  queries: str = "heldout"

  @classmethod
  def from_relations(
    cls, relations: Sequence[str] | None, *, source: str = "", mixed: lama_mixed.MixedOptions | None = None
  ) -> LamaTrexConfig:
    rels = tuple(relations or ())
    mixed = mixed or lama_mixed.MixedOptions()
    name = lama.config_name(rels) + mixed.name() + (f"{SOURCE_SEP}{source}" if source else "")
    return cls(
      name=name,
      description=(
        f"relations: {list(rels) or 'all present'}; source files: {source or '?'}"
        + (f"; mixed training: {mixed.key()}" if mixed.active else "")
      ),
      relations=rels,
      source=source,
      mixed_fraction=float(mixed.fraction),
      mixed_paraphrases=int(mixed.paraphrases),
      mixed_seed=int(mixed.seed),
      queries=mixed.queries,
    )

  @property
  def mixed(self) -> lama_mixed.MixedOptions:
    return lama_mixed.MixedOptions(
      fraction=self.mixed_fraction, paraphrases=self.mixed_paraphrases, seed=self.mixed_seed, queries=self.queries
    )


class LamaTrex(tfds.core.GeneratorBasedBuilder):
  """LAMA T-REx evidence sentences and relation queries (trackstar_jax.data.lama, lama_mixed)."""

  VERSION = tfds.core.Version(records.DATASET_VERSION)
  BUILDER_CONFIGS = [LamaTrexConfig.from_relations(None)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Pass {lama.MANUAL_DIR_FLAG}=<dir> holding {lama.EVIDENCE_DIR}/P*.jsonl and"
    f" {lama.TEMPLATES_FILE} (e.g. ../shared/data/lama_trex)."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    metadata = dict(relations=list(cfg.relations), source=cfg.source)
    if cfg.mixed.active:
      metadata["mixed"] = cfg.mixed.key()
    return tfds.core.DatasetInfo(
      builder=self,
      description="LAMA T-REx: deduplicated evidence sentences (+ template statements if mixed) and relation queries.",
      features=_features(mixed=cfg.mixed.active),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(metadata),
    )

  def _split_generators(self, dl_manager):
    manual_dir = str(dl_manager.manual_dir)
    cfg = self.builder_config
    source = cfg.source
    current = lama.source_fingerprint(manual_dir, relations=cfg.relations, patterns=cfg.mixed.active)
    if source and current != source:
      raise ValueError(f"The files in {manual_dir} changed while building {cfg.name}; rerun.")
    data = lama.read_lama(manual_dir, relations=cfg.relations, mixed=cfg.mixed)
    self.info.metadata["manual_dir"] = manual_dir
    return _split_generators(self, data)

  def _generate_examples(self, recs, key):
    return _generate(recs, key, mixed=self.builder_config.mixed.active)
