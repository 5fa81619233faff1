r"""Trains the fact LM (params + optimizer state checkpoints for TrackStar).

  python -m launch.train --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.train --config=configs/lama.py:model=small \
      --config.manual_dir=../shared/data/lama_trex --workdir=/tmp/ts_lama

Restarted with the same --workdir, it resumes from the latest checkpoint.
Multi-host: run the same command on every host (see
`trackstar_jax.mesh.maybe_initialize_distributed`).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from trackstar_jax import checkpointing
from trackstar_jax import mesh
from trackstar_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory: checkpoints, metrics, tokenizer.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpointing.quiet_orbax_logging()
  mesh.maybe_initialize_distributed(force=_DISTRIBUTED.value)
  metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Done: step %d, query accuracy %.3f (>=3 gold sentences: %.3f), train time %.1fs",
               metrics["step"], metrics["query_accuracy"], metrics.get("query_accuracy/freq_>=3", float("nan")),
               metrics["train_time_s"])


if __name__ == "__main__":
  app.run(main)
