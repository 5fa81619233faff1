r"""Encodes every corpus example (raw TrackStar phi) into the encoding store.

  python -m launch.encode --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.encode --config=configs/lama.py:model=small \
      --config.manual_dir=../shared/data/lama_trex --config.store.url=gs://bucket/enc.zarr --workdir=/tmp/ts_lama

--workdir is the training workdir (checkpoint with optimizer state, tokenizer).
Killed at any point and restarted with the same command, it continues with
the chunks not yet committed and produces the same store. Multi-host: run the
same command on every host; each writes its own chunks.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from trackstar_jax import mesh
from trackstar_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: checkpoints, tokenizer; outputs go here.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  mesh.maybe_initialize_distributed(force=_DISTRIBUTED.value)
  pipeline.write_job_config(_CONFIG.value, _WORKDIR.value, "encode")
  store = pipeline.encode_corpus(_CONFIG.value, _WORKDIR.value)
  logging.info("Done: %d x %d encodings in %s", store.num_rows, store.dim, store.url)


if __name__ == "__main__":
  app.run(main)
