r"""Retrieves each query's proponents and opponents over the whole encoding store.

  python -m launch.retrieve --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.retrieve --config=configs/synthetic.py --workdir=/tmp/ts_synth \
      --config.retrieve.use_hessian=False --config.retrieve.method=cosine

--workdir is the training workdir, after launch/encode.py and
launch/fit_hessian.py. Writes <workdir>/results.jsonl (or
config.retrieve.output) in the TrackStar results schema, with
<results>.meta.json. Multi-host: run the same command on every host.
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
  pipeline.write_job_config(_CONFIG.value, _WORKDIR.value, "retrieve")
  path = pipeline.retrieve_job(_CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", path)


if __name__ == "__main__":
  app.run(main)
