"""The encode job: raw TrackStar phi of every corpus example into the encoding store.

  store = run(config, workdir)     # <workdir>/encodings.zarr (config.store.url)

Reads the training workdir (checkpoint with optimizer state, tokenizer) and
the dataset of `config`, or a user's checkpoint and corpus (configs/own_model.py:
each host then reads only its slice of the corpus). Killed at any point and rerun, it encodes only the
chunks not yet committed and yields the same store (`trackstar_jax.encode`).
Raw phi is task-independent: one corpus store serves every query set.
"""

from __future__ import annotations

from typing import Any

from absl import logging

from trackstar_jax import api, checkpointing
from trackstar_jax import store as store_lib
from trackstar_jax.jobs import workdir as workdir_lib


def provenance(config, encoder, *, step: int, dataset) -> dict[str, Any]:
  """What an encoding of this run is made from, recorded in (and checked against) the store.

  The checkpoint is identified by content (`checkpointing.params_fingerprint`), not by its path.
  """
  return dict(
    checkpoint=checkpointing.params_fingerprint(encoder.params),
    step=int(step),
    corpus_fingerprint=str(dataset.fingerprint),
    extra=dict(dataset=dataset.name, seq_len=int(config.seq_len)),
  )


def run(config, workdir: str, *, dataset=None) -> store_lib.EncodingStore:
  rd = workdir_lib.load_data(config, workdir, dataset=dataset, host_slice=True)  # a user corpus: this host's slice
  encoder, step = workdir_lib.load_encoder(config, workdir, rd.tokenizer)
  url = workdir_lib.store_url(config, workdir)
  store = api.encode(
    encoder,
    rd.corpus,
    store=url,
    batch_size=int(config.encoder.batch_size),
    dtype=config.store.dtype,
    chunk_rows=int(config.store.chunk_rows),
    provenance=provenance(config, encoder, step=step, dataset=rd.dataset),
  )
  logging.info("encode: %d x %d encodings in %s", store.num_rows, store.dim, store.url)
  if getattr(rd, "stats", None):  # a user corpus: documents, empty ones skipped, windowed, truncated
    logging.info("encode: corpus %s", rd.stats)
    workdir_lib.append_metrics(
      f"{url.rstrip('/').rpartition('/')[0] or '.'}/encode_metrics.jsonl", dict(corpus=rd.stats)
    )
  return store
