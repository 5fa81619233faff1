r"""Checks every committed chunk of an encoding store (missing, truncated, checksum) and repairs it.

  python -m launch.verify_store --store=/tmp/ts_synth/encodings.zarr
  python -m launch.verify_store --store=gs://bucket/enc.zarr --repair
  python -m launch.encode --config=configs/lama.py --workdir=/tmp/ts_lama ...   # re-encodes the repaired chunks

Exits 1 when damaged chunks are found and not repaired. --repair drops their
commit markers, so that re-running the encode job (same config and workdir)
re-encodes exactly them.
"""

import sys

from absl import app, flags, logging

from trackstar_jax.jobs import verify_store

_STORE = flags.DEFINE_string("store", None, "Encoding store URL (path, file://, gs://).")
_REPAIR = flags.DEFINE_bool("repair", False, "Unmark damaged chunks so that launch.encode re-encodes them.")
flags.mark_flag_as_required("store")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  bad = verify_store.run(url=_STORE.value, repair=_REPAIR.value)
  if bad and not _REPAIR.value:
    logging.error("%d damaged chunks in %s; rerun with --repair.", len(bad), _STORE.value)
    sys.exit(1)
  logging.info("Done.")


if __name__ == "__main__":
  app.run(main)
