"""The verify_store job: check every committed chunk of an encoding store and, if asked, unmark the damaged ones.

  python -m launch.verify_store --store=gs://bucket/enc.zarr            # report only
  python -m launch.verify_store --store=gs://bucket/enc.zarr --repair   # then re-run launch.encode

A chunk is damaged when its data is missing, truncated or fails its crc32c
checksum. Repair drops the damaged chunks' commit markers; the encode job's
resume (`EncodingStore.pending_chunks`) then re-encodes exactly those chunks,
and, since encoding is deterministic, the store ends bitwise equal to an
undamaged one.
"""

from __future__ import annotations

from absl import logging

from trackstar_jax import store as store_lib


def run(*, url: str, repair: bool = False) -> list[store_lib.BadChunk]:
  """Verifies the store at `url`; with `repair`, unmarks its damaged chunks.

  Args:
    url: the encoding store (path, file://, gs://, memory://).
    repair: drop the damaged chunks' commit markers so that encode redoes them.

  Returns:
    The damaged chunks found (before any repair).
  """
  store = store_lib.open_store(url)
  bad = store.verify()
  pending = store.num_chunks - len(store.marked_chunks())
  for b in bad:
    logging.error("Damaged chunk %d (rows [%d, %d)) of %s: %s", b.chunk, b.start, b.stop, url, b.reason)
  logging.info(
    "verify_store %s: %d chunks, %d committed and checked, %d damaged, %d never committed.",
    url,
    store.num_chunks,
    store.num_chunks - pending,
    len(bad),
    pending,
  )
  if bad and repair:
    n = store.unmark([b.chunk for b in bad])
    logging.info(
      "Unmarked %d damaged chunks. Now re-run the encode job (same config and --workdir=%s): it "
      "re-encodes exactly them.",
      n,
      store.meta.checkpoint or "<its workdir>",
    )
  elif bad:
    logging.error("%s", store_lib.repair_command(url, store.meta.checkpoint))
  return bad
