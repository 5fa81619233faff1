"""The workdir: where each job's outputs live, and loading what training left there.

Layout of a workdir (every path can be redirected in the config):

  config.json                      the training run's resolved config
  <job>_config.json, <job>_metrics.jsonl   each job's resolved config and a metrics line per run, written
                                   when it succeeds, next to its outputs (the workdir unless redirected)
  checkpoints/<step>/              Orbax: params, opt_state, meta (`checkpointing`)
  tokenizer.model                  the corpus-trained sentencepiece model
  metrics.jsonl                    training metrics, one JSON object a line
  hessian.npz                      fit_hessian   (config.hessian.path)
  encodings.zarr/                  encode        (config.store.url)
  results.jsonl (+ .meta.json)     retrieve      (config.retrieve.output)
  evaluation.{md,json}             evaluate
  ../tfds/                         TFDS builds   (config.data_dir, or $TFDS_DATA_DIR)

  run = load_run(workdir)      # config, model, params, opt_state, tokenizer, dataset, corpus, queries
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from trackstar_jax import checkpointing, fileio, training
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import optimizer_correction as oc
from trackstar_jax import sharding as sharding_lib
from trackstar_jax.data import batching
from trackstar_jax.data import tokenizer as tokenizer_lib
from trackstar_jax.data import tokenizers as tokenizers_lib
from trackstar_jax.encoder import TrackStarEncoder
from trackstar_jax.jobs import own_model
from trackstar_jax.models import DecoderLM
from trackstar_jax.models import factory as model_factory

# ----------------------------------------------------------------------------
# Paths.


def data_dir(config, workdir: str) -> str:
  """config.data_dir, else $TFDS_DATA_DIR, else <workdir>/../tfds."""
  if config.data_dir:
    return config.data_dir
  if os.environ.get("TFDS_DATA_DIR"):
    return os.environ["TFDS_DATA_DIR"]
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), "tfds")


def tokenizer_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "tokenizer.model")


def store_url(config, workdir: str) -> str:
  return config.store.url or os.path.join(os.path.abspath(workdir), "encodings.zarr")


def hessian_path(config, workdir: str) -> str:
  return config.hessian.path or os.path.join(os.path.abspath(workdir), "hessian.npz")


def results_path(config, workdir: str) -> str:
  return config.retrieve.output or os.path.join(os.path.abspath(workdir), "results.jsonl")


def write_job_config(config, directory: str, job: str) -> str:
  """The resolved config of a job as <directory>/<job>_config.json (process 0): call it when the job succeeded."""
  path = f"{directory.rstrip('/')}/{job}_config.json"
  if mesh_lib.is_chief():
    fileio.write_json(path, checkpointing.config_to_dict(config))
  return path


def append_metrics(path: str, row: dict[str, Any]) -> None:
  """Appends one JSON line to `path` (process 0; local or kvstore: rewritten whole, atomically)."""
  if not mesh_lib.is_chief():
    return
  old = fileio.read_text(path) if fileio.exists(path) else ""
  fileio.write_text(path, old + json.dumps({k: _to_py(v) for k, v in row.items()}, default=str) + "\n")


class MetricsWriter:
  """Appends JSON lines to `<workdir>/<name>` (process 0 only).

  A resumed run appends too; steps between the last checkpoint and a crash
  appear twice (readers keep the last row per step and kind).
  """

  def __init__(self, workdir: str, name: str = "metrics.jsonl"):
    self.path = os.path.join(workdir, name)
    self.enabled = mesh_lib.is_chief()

  def write(self, step: int, **metrics) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _to_py(v) for k, v in metrics.items()})
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def _to_py(v):
  if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
    return float(v)
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v


# ----------------------------------------------------------------------------
# Data, model and checkpoint.


@dataclasses.dataclass
class RunData:
  """The dataset of a config, its tokenizer and the tokenized corpus and queries."""

  dataset: Any  # data.FactDataset: .corpus, .queries (record sequences), .name, .fingerprint
  tokenizer: tokenizer_lib.Tokenizer
  tokenizer_path: str
  corpus: batching.Examples
  queries: batching.Examples

  def text_of(self, example_id: int) -> str:
    """A corpus example's text by its id (the corpus record's `sentence_id`)."""
    return self.dataset.corpus[self._row_of()[int(example_id)]]["text"]

  def source_of(self, example_id: int) -> None:
    """Built-in datasets' examples are whole sentences: no document/window to name."""
    del example_id

  def texts_for_rows(self, rows, ids) -> dict[int, str]:
    """{sentence id: text} of store rows `rows` (ids: the store's example ids by row); checks the corpus order."""
    texts = {}
    for row in rows:
      if row >= 0:
        rec = self.dataset.corpus[int(row)]
        if int(rec["sentence_id"]) != int(ids[row]):
          raise ValueError(
            f"Corpus order changed: row {row} is sentence {rec['sentence_id']}, the store has {ids[row]}."
          )
        texts[int(rec["sentence_id"])] = rec["text"]
    return texts

  def _row_of(self) -> dict[int, int]:
    if not hasattr(self, "_rows"):
      self._rows = {int(i): r for r, i in enumerate(self.corpus.ids)}
    return self._rows

  @property
  def query_records(self) -> list[dict]:
    return [self.dataset.queries[i] for i in range(len(self.dataset.queries))]


def load_data(config, workdir: str, *, dataset=None, host_slice: bool = False, queries: bool | None = None):
  """The dataset (TFDS, built once), the tokenizer (trained on the corpus once, saved in the workdir), tokenized.

  With `config.corpus.path` set: the user's corpus, tokenizer file and queries
  instead (`own_model.OwnData`); `host_slice=True` (the encode, fit_hessian and
  retrieve jobs) then reads only this process's slice of the corpus, aligned to
  `config.store.chunk_rows`, and the queries only if `queries` (default: not).
  """
  if own_model.is_own_data(config):
    return own_model.load_own_data(
      config, host_slice=host_slice, align_rows=int(config.store.chunk_rows), queries=queries
    )
  from trackstar_jax import data  # pylint: disable=g-import-not-at-top  (TFDS: only jobs that read datasets)

  if dataset is None:
    dataset = data.load_dataset(config, data_dir=data_dir(config, workdir))
  tok_path = tokenizer_path(workdir)
  if jax.process_count() > 1:  # process 0 trains and saves it; the others load it
    if mesh_lib.is_chief():
      tokenizer_lib.get_tokenizer(dataset, config, path=tok_path)
    mesh_lib.sync("trackstar_tokenizer")
  tokenizer = tokenizer_lib.get_tokenizer(dataset, config, path=tok_path)
  corpus = batching.tokenize_corpus(tokenizer, dataset.corpus, seq_len=config.seq_len)
  queries = batching.tokenize_queries(tokenizer, dataset.queries, seq_len=config.seq_len)
  return RunData(dataset=dataset, tokenizer=tokenizer, tokenizer_path=tok_path, corpus=corpus, queries=queries)


def build_model(config, tokenizer) -> DecoderLM:
  """`DecoderLM` of `config.model` with the tokenizer's vocabulary size (the model this project trains).

  Other models are named by `config.model.factory` (`own_model.build_model`).
  """
  spec = model_factory.factory_name(config.model)
  if spec != model_factory.DEFAULT:
    raise ValueError(f"model.factory={spec!r}: this job trains and restores only the project's DecoderLM.")
  return model_factory.decoder_lm(config.model, vocab_size=int(tokenizer.vocab_size))


def uses_own_model(config) -> bool:
  """A user's model or checkpoint: model.factory names another model, or checkpoint.path is set."""
  return own_model.is_own_checkpoint(config) or model_factory.factory_name(config.model) != model_factory.DEFAULT


def checkpoint_step(config, workdir: str) -> int:
  """config.encoder.step, or the latest step when it is -1."""
  step = config.encoder.step
  if step in (None, -1):
    step = checkpointing.latest_step(workdir)
    if step is None:
      raise FileNotFoundError(
        f"No checkpoint in {checkpointing.checkpoint_dir(workdir)!r}: run "
        "launch/train.py with this --workdir first, or pass the training --workdir."
      )
  return int(step)


def encoder_correction_options(config) -> dict[str, Any]:
  """The correction's Adam eps / b2: the training optimizer's (unless the encoder config sets b2)."""
  b2 = config.encoder.b2 if config.encoder.b2 is not None else config.train.b2
  return dict(eps=float(config.train.eps), b2=float(b2))


def load_encoder(config, workdir: str, tokenizer, *, mesh=None) -> tuple[TrackStarEncoder, int]:
  """(TrackStarEncoder, step) from the checkpoint at config.encoder.step (default: latest).

  Only the optimizer's second moments of the traced parameters are restored
  (Orbax partial restore), not the whole optimizer state. Params and moments
  are placed on `mesh` (default `config.mesh`) by `config.sharding`.
  """
  from trackstar_jax import api  # pylint: disable=g-import-not-at-top

  mesh = mesh or mesh_lib.make_mesh(config.mesh)
  if uses_own_model(config):
    apply_fn, params, opt_state, step = _own_model_and_checkpoint(config, tokenizer)
    param_sharding = sharding_lib.from_config(params, config, mesh)  # the encoder places params and moments
  else:
    step = checkpoint_step(config, workdir)
    apply_fn = build_model(config, tokenizer).apply
    params = checkpointing.restore_params(
      workdir, step=step, sharding=lambda t: sharding_lib.from_config(t, config, mesh)
    )
    param_sharding = jax.tree.map(lambda a: a.sharding, params)
    opt_state = None
    if config.encoder.correction != "none":
      _, opt_state = oc.restore_second_moments(
        workdir, step=step, paths=config.encoder.param_regex, param_sharding=param_sharding
      )
  encoder = api.build_encoder(
    apply_fn=apply_fn,
    params=params,
    opt_state=opt_state,
    mesh=mesh,
    param_sharding=param_sharding,
    seq_len=config.seq_len,
    config=config.encoder,
    **encoder_correction_options(config),
  )
  return encoder, step


def _own_model_and_checkpoint(config, tokenizer):
  """(apply_fn, params, second moments, step) of `config.model.factory` and `config.checkpoint`."""
  if not own_model.is_own_checkpoint(config):
    raise ValueError(
      f"model.factory={config.model.factory!r} names your own model: set checkpoint.path (and checkpoint.params, "
      "checkpoint.opt_state) to its Orbax checkpoint."
    )
  model = own_model.build_model(config, vocab_size=int(tokenizer.vocab_size))
  tokenizers_lib.check_vocab(tokenizer, model.vocab_size)
  params, opt_state, step = own_model.restore_checkpoint(config, model, param_regex=config.encoder.param_regex)
  return model.apply_fn, params, opt_state, step


@dataclasses.dataclass
class TrainedRun:
  """What a training workdir holds, restored (see `load_run`)."""

  config: ml_collections.ConfigDict  # the run's config (from the checkpoint)
  model: DecoderLM
  params: Any
  opt_state: Any  # the full optax state (None when not restored)
  tokenizer: tokenizer_lib.Tokenizer
  step: int
  data: RunData | None = None  # dataset + tokenized corpus and queries (load_run(..., data=True))

  @property
  def corpus(self) -> batching.Examples:
    return self._data().corpus

  @property
  def queries(self) -> batching.Examples:
    return self._data().queries

  def _data(self) -> RunData:
    if self.data is None:
      raise ValueError("Loaded without data: use load_run(workdir, data=True).")
    return self.data


def load_run(
  workdir: str,
  *,
  step: int | None = None,
  opt_state: bool = True,
  data: bool = True,
  config=None,
  sharding=None,
  mesh=None,
) -> TrainedRun:
  """Model, params, optimizer state, tokenizer (and data) of a training workdir (default: latest step).

  The config comes from the checkpoint's metadata unless given; the tokenizer
  from `<workdir>/tokenizer.model` (or the path recorded at training time).
  `sharding`: where to place params and optimizer state (default replicated);
  `mesh` instead: params and optimizer state placed on it by `config.sharding`.
  """
  meta = checkpointing.load_meta(workdir, step=step)
  config = config or ml_collections.ConfigDict(meta["config"])
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    path = meta.get("tokenizer_path") or path
  if not os.path.exists(path):
    raise FileNotFoundError(f"No tokenizer at {tokenizer_path(workdir)!r} or {path!r} for workdir {workdir!r}.")
  tokenizer = tokenizer_lib.Tokenizer.load(path)
  model = build_model(config, tokenizer)
  abstract = jax.eval_shape(lambda: training.init_params(model, seq_len=config.seq_len, seed=0))
  abstract_opt = None
  if opt_state:
    abstract_opt = jax.eval_shape(training.optimizer_for(config.train).init, abstract)
  opt_sharding = None
  if mesh is not None:
    sharding, opt_sharding = training.state_shardings(
      model, training.optimizer_for(config.train), config, mesh, seq_len=config.seq_len
    )
  ckpt = checkpointing.restore(
    workdir,
    step=meta["step"],
    abstract_params=abstract,
    abstract_opt_state=abstract_opt,
    restore_opt_state=opt_state,
    sharding=sharding,
    opt_sharding=opt_sharding,
  )
  run_data = load_data(config, workdir) if data else None
  return TrainedRun(
    config=config,
    model=model,
    params=ckpt.params,
    opt_state=ckpt.opt_state,
    tokenizer=tokenizer,
    step=int(meta["step"]),
    data=run_data,
  )
