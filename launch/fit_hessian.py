r"""Fits the Hessian approximation R (R_train, R_eval, lambda) and saves R^{-1/2}.

  python -m launch.fit_hessian --config=configs/synthetic.py --workdir=/tmp/ts_synth

--workdir is the training workdir; writes <workdir>/hessian.npz (or
config.hessian.path). Encodes config.hessian.train_sample corpus examples and,
with config.hessian.mixed, every query. Short: a rerun redoes it.
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
  pipeline.write_job_config(_CONFIG.value, _WORKDIR.value, "fit_hessian")
  h = pipeline.fit_hessian_job(_CONFIG.value, _WORKDIR.value)
  logging.info("Done: lambda=%.4f, dim %d -> %s", h.lam, h.dim, pipeline.hessian_path(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
