r"""The whole TrackStar ablation ladder in one command.

  python -m launch.pipeline --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.pipeline --config=configs/synthetic.py --workdir=/tmp/ts_synth --stages=retrieve,evaluate
  python -m launch.pipeline --config=configs/lama.py --workdir=/tmp/ts_lama --stages=retrieve --methods=dense

Trains the LM (or reuses the finished checkpoint in --workdir), fits the
Hessians and encodes the corpus for every encoding variant (no correction,
the optimizer correction, Adam rank-1, half projection size), retrieves with
every ladder method plus BM25 / dense / random, tail-patches and writes one
table to <workdir>/ablation.{md,json}. Every stage is skipped when its output
is up to date and resumes when killed. See trackstar_jax/evaluation/ladder.py.

--methods restricts the run to some rows (names or kinds: gradient, bm25, dense,
random). Text baselines need no checkpoint, so e.g. the dense baseline can be
computed on a machine that has its packages and its results folder
(<workdir>/ladder/results) copied into the GPU run's workdir.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from trackstar_jax import mesh
from trackstar_jax import pipeline
from trackstar_jax.evaluation import ladder

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir: checkpoints, stores, results, ablation table.")
_STAGES = flags.DEFINE_list("stages", list(ladder.STAGES), f"Stages to run, a subset of {ladder.STAGES}.")
_METHODS = flags.DEFINE_list("methods", [], "Only these methods (names or kinds gradient/bm25/dense/random); "
                             "default all.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache dir "
                              "(default <workdir>/jax_cache; 'none' to disable).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  mesh.maybe_initialize_distributed(force=_DISTRIBUTED.value)
  if _CACHE.value != "none":
    ladder.enable_compilation_cache(_CACHE.value or os.path.join(_WORKDIR.value, "jax_cache"))
  pipeline.write_job_config(_CONFIG.value, _WORKDIR.value, "pipeline")
  ladder.run_ladder(_CONFIG.value, _WORKDIR.value, stages=_STAGES.value, only=_METHODS.value)


if __name__ == "__main__":
  app.run(main)
