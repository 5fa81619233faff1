"""The train job: trains (or resumes) the fact LM, with checkpoints of params and optimizer state.

metrics = run(config, workdir)

1. load the fact dataset (TFDS) and the corpus-trained tokenizer
   (trained once and saved in the workdir), tokenize corpus and queries;
2. train `DecoderLM` with `optim.make_optimizer(config.train)` under
   `jax.jit` on `make_mesh(config.mesh)` (batch split over "data", params and
   optimizer state placed by `config.sharding`, replicated by default;
   `training.make_train_step`);
3. log loss / tokens/s / ETA, write `<workdir>/metrics.jsonl`, evaluate query
   accuracy every `eval_every` steps and at the end (`lm_eval`);
4. checkpoint params + optimizer state every `checkpoint_every` steps and at
   the end; restarted, it resumes from the latest checkpoint and sees the same
   batches as an uninterrupted run (epoch and position derive from the step).
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from trackstar_jax import checkpointing, lm_eval, optim, training
from trackstar_jax import mesh as mesh_lib
from trackstar_jax.jobs import workdir as workdir_lib
from trackstar_jax.progress import Progress


def run(config, workdir: str, *, dataset=None) -> dict[str, Any]:
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
    for the buckets of `lm_eval.FREQUENCY_BUCKETS`, and `correct`
    ([num_queries] bool, per query, in `dataset.queries` order).

  Raises:
    ValueError: the workdir holds a checkpoint of an incompatible config
      (the differing fields are listed), or the batch size does not divide
      over the mesh.
  """
  from trackstar_jax import data  # pylint: disable=g-import-not-at-top

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

  if dataset is None:
    dataset = data.load_dataset(config, data_dir=workdir_lib.data_dir(config, workdir))
  manager = checkpointing.make_manager(workdir, keep=tc.keep_checkpoints)
  start_step = manager.latest_step()
  if start_step is not None:  # refuse before anything in the workdir is touched
    saved = checkpointing.load_meta(workdir, step=start_step)
    checkpointing.check_compatible(saved, config, workdir=workdir, dataset_fingerprint=dataset.fingerprint)
  rd = workdir_lib.load_data(config, workdir, dataset=dataset)
  corpus, query_ex, tokenizer = rd.corpus, rd.queries, rd.tokenizer
  frequencies = np.asarray([int(q["frequency"]) for q in dataset.queries])
  logging.info(
    "corpus: %d examples, queries: %d, vocab %d", len(corpus.inputs), len(query_ex.inputs), tokenizer.vocab_size
  )

  model = workdir_lib.build_model(config, tokenizer)
  optimizer = training.optimizer_for(tc)
  meta = checkpointing.make_meta(
    step=0,
    config=config,
    dataset_name=dataset.name,
    dataset_fingerprint=dataset.fingerprint,
    tokenizer_path=rd.tokenizer_path,
  )
  param_sh, opt_sh = training.state_shardings(model, optimizer, config, mesh, seq_len=config.seq_len)
  if start_step is None:
    params = training.init_params(model, seq_len=config.seq_len, seed=tc.seed, sharding=param_sh)
    opt_state = training.init_opt_state(optimizer, params, sharding=opt_sh)
    start_step = 0
  else:
    abstract_params = jax.eval_shape(lambda: training.init_params(model, seq_len=config.seq_len, seed=tc.seed))
    ckpt = checkpointing.restore(
      workdir,
      step=start_step,
      abstract_params=abstract_params,
      abstract_opt_state=jax.eval_shape(optimizer.init, abstract_params),
      sharding=param_sh,
      opt_sharding=opt_sh,
    )
    params, opt_state = ckpt.params, ckpt.opt_state
    logging.info("Resuming from step %d", start_step)
  checkpointing.write_config(config, workdir)

  train_step = training.make_train_step(model.apply, optimizer, mesh, param_sharding=param_sh, opt_sharding=opt_sh)
  schedule = optim.learning_rate_schedule(tc)
  writer = workdir_lib.MetricsWriter(workdir)
  batches = training.train_batches(corpus, batch_size=tc.batch_size, seed=tc.seed, start_step=start_step)
  num_steps = int(tc.num_steps)
  progress = Progress(total=num_steps, start=start_step, name="train")

  def evaluate(step):
    res = lm_eval.query_accuracy(
      model.apply, params, query_ex, batch_size=int(tc.eval_batch_size), frequencies=frequencies
    )
    m = lm_eval.accuracy_metrics(res)
    writer.write(step, **m)
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in m.items()))
    return res, m

  t_start = time.perf_counter()
  last = {}
  pending = []  # device metrics not yet fetched (fetching every step would sync)
  for step in range(start_step, num_steps):
    host_batch = next(batches)
    batch = mesh_lib.shard_batch({k: host_batch[k] for k in training.TRAIN_KEYS}, mesh)
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
      last = dict(
        loss=float(fetched[-1]["loss"]),
        grad_norm=float(fetched[-1]["grad_norm"]),
        learning_rate=float(schedule(step)),
        steps_per_s=steps_s,
        tokens_per_s=tokens_s,
      )
      writer.write(done, **last)
      logging.info("%s, loss %.4f, lr %.2e", progress.line(), last["loss"], last["learning_rate"])
    if done % tc.checkpoint_every == 0 or done == num_steps:
      checkpointing.save(manager, step=done, params=params, opt_state=opt_state, meta=meta)
    if tc.eval_every and done % tc.eval_every == 0 and done != num_steps:
      evaluate(done)
  manager.wait_until_finished()
  train_time = time.perf_counter() - t_start

  final_step = max(num_steps, start_step)
  res, acc = evaluate(final_step)
  if start_step >= num_steps:
    logging.info("Checkpoint at step %d already reaches num_steps=%d: evaluated only.", start_step, num_steps)
  samples = lm_eval.sample_answers(
    model.apply, params, tokenizer, dataset.queries, max_len=int(config.model.max_len), n=int(tc.num_sample_answers)
  )
  for row in samples:
    logging.info("sample: %r -> %r (target %r)", row["prompt"], row["answer"], row["target"])
  out = dict(step=final_step, train_time_s=train_time, **last, **acc)
  out["correct"] = res["correct"]
  return out
