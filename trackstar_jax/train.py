"""Training the fact LM: data-parallel jit loop, checkpoints, query accuracy.

`train_and_evaluate(config, workdir)` is the whole `train` job:

  1. load the fact dataset (TFDS) and the corpus-trained tokenizer
     (trained once and saved in the workdir),
  2. tokenize corpus and queries,
  3. train `DecoderLM` with `make_optimizer(config.train)` under `jax.jit`
     with explicit shardings on `make_mesh(config.mesh)` (batch split over
     the "data" axis, params and optimizer state replicated),
  4. log loss / tokens/s / ETA, write metrics to `<workdir>/metrics.jsonl`,
     evaluate query accuracy every `eval_every` steps and at the end,
  5. checkpoint params + optimizer state every `checkpoint_every` steps and
     at the end; restarted, it resumes from the latest checkpoint and sees
     the same batches as an uninterrupted run (the epoch and position in the
     epoch are derived from the step).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from typing import Any, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trackstar_jax import checkpointing
from trackstar_jax import data
from trackstar_jax import losses
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import optim
from trackstar_jax.data import batching
from trackstar_jax.data import tokenizer as tokenizer_lib
from trackstar_jax.models import DecoderLM, TransformerConfig
from trackstar_jax.progress import Progress

TRAIN_KEYS = ("inputs", "targets", "loss_mask", "pad_mask")


def build_model(config, tokenizer) -> DecoderLM:
  """`DecoderLM` of `config.model` with the tokenizer's vocabulary size."""
  return DecoderLM(TransformerConfig.from_config(config.model, vocab_size=int(tokenizer.vocab_size)))


@functools.lru_cache(maxsize=8)
def _jitted_init(model: DecoderLM, sharding):
  return jax.jit(model.init, out_shardings=sharding)


def init_params(model: DecoderLM, *, seq_len: int, seed: int, sharding=None) -> Any:
  """Initial params (float32), placed with `sharding` (default: one device)."""
  return _jitted_init(model, sharding)(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))


@functools.lru_cache(maxsize=8)
def _cached_optimizer(train_cfg_json: str) -> optax.GradientTransformation:
  return optim.make_optimizer(ml_collections.ConfigDict(json.loads(train_cfg_json)))


def optimizer_for(train_cfg) -> optax.GradientTransformation:
  """`make_optimizer(train_cfg)`, memoized on the config's values.

  The same optimizer object for equal configs lets jitted steps built on it
  be reused (no recompilation when a notebook or test trains again).
  """
  return _cached_optimizer(json.dumps(checkpointing.config_to_dict(train_cfg), sort_keys=True))


@functools.lru_cache(maxsize=8)
def make_train_step(model: DecoderLM, optimizer: optax.GradientTransformation, mesh):
  """jit(params, opt_state, batch) -> (params, opt_state, metrics), donating state.

  The batch is split over the mesh's "data" axis; params and optimizer state
  are replicated. The loss is the mean NLL over all masked tokens of the
  global batch (so it does not depend on the device count). Memoized.
  """
  repl = mesh_lib.replicated(mesh)
  batch_sharding = {k: mesh_lib.data_sharding(mesh, 2) for k in TRAIN_KEYS}

  def loss_fn(params, batch):
    logits = model.apply(params, batch["inputs"], batch["pad_mask"])
    return losses.mean_token_loss(logits, batch)

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), tokens=jnp.sum(batch["loss_mask"]))
    return params, opt_state, metrics

  return jax.jit(train_step, in_shardings=(repl, repl, batch_sharding), out_shardings=(repl, repl, repl),
                 donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _jitted_opt_init(optimizer: optax.GradientTransformation, sharding):
  return jax.jit(optimizer.init, out_shardings=sharding)


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def train_batches(examples, *, batch_size: int, seed: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of the global batches from step `start_step` on, forever.

  Epoch e is shuffled with `epoch_seed(seed, e)` (the last batch of an epoch
  is padded with rows whose loss_mask is 0); step s is batch
  s % batches_per_epoch of epoch s // batches_per_epoch, so a restarted run
  sees exactly the batches of an uninterrupted one without replaying them.
  """
  per_epoch = batching.num_batches(len(examples.inputs), batch_size=batch_size, pad_last=True)
  if per_epoch == 0:
    raise ValueError("The training corpus is empty.")
  epoch, skip = divmod(int(start_step), per_epoch)
  while True:
    it = batching.iterate_batches(
        examples,
        batch_size=batch_size,
        shuffle=True,
        seed=epoch_seed(seed, epoch),
        epochs=1,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pad_last=True,
    )
    yield from itertools.islice(it, skip, None)
    epoch, skip = epoch + 1, 0


class MetricsWriter:
  """Appends JSON lines to `<workdir>/metrics.jsonl` (process 0 only).

  A resumed run appends too; steps between the last checkpoint and a crash
  appear twice (readers keep the last row per step and kind).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, step: int, **metrics) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _to_py(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def _to_py(v):
  if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
    return float(v)
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v


def resolve_data_dir(config, workdir: str) -> str:
  """config.data_dir, else $TFDS_DATA_DIR, else <workdir>/../tfds."""
  if config.get("data_dir"):
    return config.data_dir
  if os.environ.get("TFDS_DATA_DIR"):
    return os.environ["TFDS_DATA_DIR"]
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), "tfds")


def tokenizer_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "tokenizer.model")


# ----------------------------------------------------------------------------
# Query accuracy.

# (name, lo, hi) inclusive frequency buckets: how many corpus sentences state the fact.
FREQUENCY_BUCKETS = (("1", 1, 1), ("2", 2, 2), ("3-9", 3, 9), ("10+", 10, None), (">=3", 3, None))


@functools.partial(jax.jit, static_argnums=0)
def _greedy_tokens(model: DecoderLM, params, inputs, pad_mask):
  return jnp.argmax(model.apply(params, inputs, pad_mask), axis=-1).astype(jnp.int32)


def _padded_chunks(arrays: dict[str, np.ndarray], batch_size: int):
  n = len(next(iter(arrays.values())))
  for start in range(0, n, batch_size):
    chunk = {k: np.asarray(v[start : start + batch_size]) for k, v in arrays.items()}
    m = len(chunk["inputs"])
    if m < batch_size:  # pad to a fixed shape: one compilation
      chunk = {k: np.concatenate([v, np.zeros((batch_size - m,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
    yield start, m, chunk


def query_accuracy(model: DecoderLM, params, query_examples, *, batch_size: int = 64, frequencies=None) -> dict:
  """Fraction of queries whose greedy answer equals the target.

  A query counts as correct when the teacher-forced argmax equals every
  target token (the positions where `loss_mask` is 1). That is equivalent to
  greedy decoding of the target's length from the prompt: if all argmaxes
  match, greedy decoding reproduces the target token by token; at the first
  mismatch greedy decoding emits a different token.

  Args:
    model: the `DecoderLM`.
    params: its params.
    query_examples: tokenized queries (`tokenize_queries`): arrays `inputs`,
      `targets`, `loss_mask`, `pad_mask`, `ids` with one row per query.
    batch_size: rows per forward pass (the last batch is padded).
    frequencies: [N] gold-sentence count of each query's fact (optional);
      gives accuracy per bucket of `FREQUENCY_BUCKETS`.

  Returns:
    dict with `accuracy` (float), `n`, `correct` ([N] bool, per query, in row
    order), `ids` ([N]) and, with frequencies, `by_frequency`
    {bucket: accuracy} and `count_by_frequency` {bucket: n}.
  """
  arrays = {k: getattr(query_examples, k) for k in ("inputs", "targets", "loss_mask", "pad_mask")}
  n = len(arrays["inputs"])
  correct = np.zeros((n,), bool)
  for start, m, chunk in _padded_chunks(arrays, batch_size):
    pred = np.asarray(_greedy_tokens(model, params, chunk["inputs"], chunk["pad_mask"]))
    ok = (pred == chunk["targets"]) | (chunk["loss_mask"] == 0)
    correct[start : start + m] = ok.all(axis=-1)[:m]
  out = dict(accuracy=float(correct.mean()) if n else float("nan"), n=n, correct=correct,
             ids=np.asarray(query_examples.ids))
  if frequencies is not None:
    freq = np.asarray(frequencies)
    if freq.shape != (n,):
      raise ValueError(f"frequencies has shape {freq.shape}; expected one per query ({n},).")
    out["by_frequency"], out["count_by_frequency"] = {}, {}
    for name, lo, hi in FREQUENCY_BUCKETS:
      sel = (freq >= lo) & (freq <= (hi if hi is not None else np.inf))
      out["count_by_frequency"][name] = int(sel.sum())
      out["by_frequency"][name] = float(correct[sel].mean()) if sel.any() else float("nan")
  return out


def accuracy_metrics(result: dict, prefix: str = "query_accuracy") -> dict[str, float]:
  """Flat scalar metrics of a `query_accuracy` result (for metrics.jsonl)."""
  out = {prefix: result["accuracy"]}
  for name, acc in result.get("by_frequency", {}).items():
    out[f"{prefix}/freq_{name}"] = acc
  return out


def greedy_decode(model: DecoderLM, params, prompt_tokens: list[int], *, max_new_tokens: int,
                  eos_id: int | None = None) -> list[int]:
  """Greedy continuation of one prompt (no KV cache: for a few samples only)."""
  max_len = model.config.max_len
  tokens = list(prompt_tokens)
  out = []
  for _ in range(max_new_tokens):
    if len(tokens) >= max_len:
      break
    buf = np.zeros((1, max_len), np.int32)
    buf[0, : len(tokens)] = tokens
    mask = np.arange(max_len)[None] < len(tokens)
    nxt = int(np.asarray(_greedy_tokens(model, params, buf, mask))[0, len(tokens) - 1])
    if eos_id is not None and nxt == eos_id:
      break
    tokens.append(nxt)
    out.append(nxt)
  return out


def sample_answers(model: DecoderLM, params, tokenizer, queries, *, n: int = 5, extra_tokens: int = 2) -> list[dict]:
  """Greedy answers (decoded text) for the first `n` query records.

  Each query's prompt is encoded with a leading BOS and continued greedily
  for the target's token count + `extra_tokens` (stopping at EOS).

  Returns:
    dicts with prompt, target, answer and `correct` (answer starts with the
    target).
  """
  rows = []
  for q in list(itertools.islice(iter(queries), n)):
    prompt_ids = [tokenizer.bos_id] + list(tokenizer.encode(q["prompt"]))
    n_target = len(tokenizer.encode(q["target"]))  # tokenized separately, as in tokenize_queries
    new = greedy_decode(model, params, prompt_ids, max_new_tokens=max(n_target, 1) + extra_tokens,
                        eos_id=tokenizer.eos_id)
    answer = tokenizer.decode(new)
    rows.append(dict(prompt=q["prompt"], target=q["target"], answer=answer,
                     correct=answer.strip().startswith(q["target"].strip())))
  return rows


# ----------------------------------------------------------------------------
# The train job.


def load_data(config, workdir: str, *, dataset=None):
  """(dataset, tokenizer, tokenizer path, corpus examples, query examples).

  The tokenizer is trained on the corpus once and saved in the workdir.
  """
  if dataset is None:
    dataset = data.load_dataset(config, data_dir=resolve_data_dir(config, workdir))
  tok_path = tokenizer_path(workdir)
  if jax.process_count() > 1:  # process 0 trains and saves it; the others load it
    if jax.process_index() == 0:
      tokenizer_lib.get_tokenizer(dataset, config, path=tok_path)
    multihost_utils.sync_global_devices("trackstar_tokenizer")
  tokenizer = tokenizer_lib.get_tokenizer(dataset, config, path=tok_path)
  corpus = batching.tokenize_corpus(tokenizer, dataset.corpus, seq_len=config.seq_len)
  queries = batching.tokenize_queries(tokenizer, dataset.queries, seq_len=config.seq_len)
  return dataset, tokenizer, tok_path, corpus, queries


@dataclasses.dataclass
class TrainedModel:
  """A trained LM restored from a workdir (see `load_trained`)."""

  config: Any  # ml_collections.ConfigDict of the run
  model: DecoderLM
  params: Any
  tokenizer: Any
  step: int


def load_trained(workdir: str, *, step: int | None = None, sharding=None) -> TrainedModel:
  """Model, params and tokenizer of a training workdir (default: latest step).

  The config comes from the checkpoint's metadata; the tokenizer from
  `<workdir>/tokenizer.model` (or the path recorded at training time).
  """
  meta = checkpointing.load_meta(workdir, step=step)
  config = ml_collections.ConfigDict(meta["config"])
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    path = meta.get("tokenizer_path") or path
  if not os.path.exists(path):
    raise FileNotFoundError(f"No tokenizer at {tokenizer_path(workdir)!r} or {path!r} for workdir {workdir!r}.")
  tokenizer = tokenizer_lib.Tokenizer.load(path)
  model = build_model(config, tokenizer)
  abstract = jax.eval_shape(lambda: init_params(model, seq_len=config.seq_len, seed=0))
  params = checkpointing.restore_params(workdir, step=meta["step"], abstract_params=abstract, sharding=sharding)
  return TrainedModel(config=config, model=model, params=params, tokenizer=tokenizer, step=int(meta["step"]))


def train_and_evaluate(config, workdir: str, *, dataset=None) -> dict[str, Any]:
  """Trains (or resumes) the LM of `config` in `workdir`; returns final metrics.

  Args:
    config: the experiment config (`configs/*.py`).
    workdir: output directory (checkpoints, metrics.jsonl, tokenizer, config).
    dataset: optional in-memory dataset with `.corpus`, `.queries`, `.name`,
      `.fingerprint` (default: `trackstar_jax.data.load_dataset(config)`).

  Returns:
    dict with `step`, `train_time_s` (this invocation, without data loading
    and the final evaluation), the last logged `loss`, `grad_norm`,
    `learning_rate`, `steps_per_s`, `tokens_per_s` (absent when there was
    nothing left to train), `query_accuracy` and `query_accuracy/freq_<bucket>`
    for the buckets of `FREQUENCY_BUCKETS`, and `correct` ([num_queries]
    bool, per query, in `dataset.queries` order).

  Raises:
    ValueError: the workdir holds a checkpoint of an incompatible config
      (the differing fields are listed), or the batch size does not divide
      over the mesh.
  """
  tc = config.train
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh)
  n_data = mesh.shape["data"]
  if tc.batch_size % n_data or tc.batch_size % jax.process_count():
    raise ValueError(
        f"train.batch_size={tc.batch_size} must be divisible by the data-parallel mesh size {n_data}"
        f" and the process count {jax.process_count()}."
    )
  repl = mesh_lib.replicated(mesh)

  if dataset is None:
    dataset = data.load_dataset(config, data_dir=resolve_data_dir(config, workdir))
  manager = checkpointing.make_manager(workdir, keep=tc.get("keep_checkpoints", None))
  start_step = manager.latest_step()
  if start_step is not None:  # refuse before anything in the workdir is touched
    saved = checkpointing.load_meta(workdir, step=start_step)
    checkpointing.check_compatible(saved, config, workdir=workdir, dataset_fingerprint=dataset.fingerprint)
  dataset, tokenizer, tok_path, corpus, query_ex = load_data(config, workdir, dataset=dataset)
  frequencies = np.asarray([int(q["frequency"]) for q in dataset.queries])
  logging.info("corpus: %d examples, queries: %d, vocab %d", len(corpus.inputs), len(query_ex.inputs),
               tokenizer.vocab_size)

  model = build_model(config, tokenizer)
  optimizer = optimizer_for(tc)
  meta = checkpointing.make_meta(step=0, config=config, dataset_name=dataset.name,
                                 dataset_fingerprint=dataset.fingerprint, tokenizer_path=tok_path)
  if start_step is None:
    params = init_params(model, seq_len=config.seq_len, seed=tc.seed, sharding=repl)
    opt_state = _jitted_opt_init(optimizer, repl)(params)
    start_step = 0
  else:
    abstract_params = jax.eval_shape(lambda: init_params(model, seq_len=config.seq_len, seed=tc.seed))
    ckpt = checkpointing.restore(workdir, step=start_step, abstract_params=abstract_params,
                                 abstract_opt_state=jax.eval_shape(optimizer.init, abstract_params), sharding=repl)
    params, opt_state = ckpt.params, ckpt.opt_state
    logging.info("Resuming from step %d", start_step)
  checkpointing.write_config(config, workdir)

  train_step = make_train_step(model, optimizer, mesh)
  schedule = optim.learning_rate_schedule(tc)
  writer = MetricsWriter(workdir)
  batches = train_batches(corpus, batch_size=tc.batch_size, seed=tc.seed, start_step=start_step)
  num_steps = int(tc.num_steps)
  progress = Progress(total=num_steps, start=start_step, name="train")
  eval_bs = int(tc.get("eval_batch_size", 256))

  def evaluate(step):
    res = query_accuracy(model, params, query_ex, batch_size=eval_bs, frequencies=frequencies)
    m = accuracy_metrics(res)
    writer.write(step, **m)
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in m.items()))
    return res, m

  t_start = time.perf_counter()
  last = {}
  pending = []  # device metrics not yet fetched (fetching every step would sync)
  for step in range(start_step, num_steps):
    host_batch = next(batches)
    batch = mesh_lib.shard_batch({k: host_batch[k] for k in TRAIN_KEYS}, mesh)
    params, opt_state, metrics = train_step(params, opt_state, batch)
    done = step + 1
    first = done == start_step + 1
    pending.append((metrics, not first))
    if first:  # the rate window starts after the compiling first step
      jax.block_until_ready(metrics)
      progress.update(done)
      progress.mark()
    if done % tc.log_every == 0 or done == num_steps:
      fetched = [m for m, _ in jax.device_get(pending)]
      tokens = sum(float(m["tokens"]) for m, (_, counted) in zip(fetched, pending) if counted)
      pending = []
      progress.update(done, items=int(tokens))
      steps_s, tokens_s = progress.rates()
      last = dict(loss=float(fetched[-1]["loss"]), grad_norm=float(fetched[-1]["grad_norm"]),
                  learning_rate=float(schedule(step)), steps_per_s=steps_s, tokens_per_s=tokens_s)
      writer.write(done, **last)
      logging.info("%s, loss %.4f, lr %.2e", progress.line(), last["loss"], last["learning_rate"])
    if done % tc.checkpoint_every == 0 or done == num_steps:
      checkpointing.save(manager, step=done, params=params, opt_state=opt_state, meta=meta)
    if tc.get("eval_every", 0) and done % tc.eval_every == 0 and done != num_steps:
      evaluate(done)
  manager.wait_until_finished()
  train_time = time.perf_counter() - t_start

  final_step = max(num_steps, start_step)
  res, acc = evaluate(final_step)
  if start_step >= num_steps:
    logging.info("Checkpoint at step %d already reaches num_steps=%d: evaluated only.", start_step, num_steps)
  for row in sample_answers(model, params, tokenizer, dataset.queries, n=int(tc.get("num_sample_answers", 5))):
    logging.info("sample: %r -> %r (target %r)", row["prompt"], row["answer"], row["target"])
  out = dict(step=final_step, train_time_s=train_time, **last, **acc)
  out["correct"] = res["correct"]
  return out
