r"""The whole TrackStar ablation ladder in one command.

  python -m launch.pipeline --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.pipeline --config=configs/synthetic.py --workdir=/tmp/ts_synth --stages=retrieve,evaluate
  python -m launch.pipeline --config=configs/lama.py --workdir=/tmp/ts_lama --stages=retrieve --methods=dense

Trains the LM (or reuses the finished checkpoint in --workdir), fits the
Hessians and encodes the corpus for every encoding variant (no correction,
the optimizer correction, Adam rank-1, half projection size), retrieves with
every ladder method plus BM25 / dense / random, tail-patches and writes one
table to <workdir>/ablation.{md,json}. Every stage is skipped when its output
is up to date and resumes when killed. See trackstar_jax/jobs/pipeline.py.

--methods restricts the run to some rows (names or kinds: gradient, bm25, dense,
random), e.g. exact Adam against its rank-1 fit alone:
  --methods="+ R_mixed = TrackStar" --methods="TrackStar, Adam rank-1"
Text baselines need no checkpoint, so e.g. the dense baseline can be computed
on a machine that has its packages and its results folder
(<workdir>/ladder/results) copied into the GPU run's workdir.
"""

from absl import flags

from trackstar_jax.jobs import cli, pipeline

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(
  workdir_help="Workdir: checkpoints, stores, results, the ablation table."
)
_STAGES = flags.DEFINE_list("stages", list(pipeline.STAGES), f"Stages to run, a subset of {pipeline.STAGES}.")
_METHODS = flags.DEFINE_multi_string(
  "methods",
  [],
  "Only these methods (names, or kinds gradient/bm25/dense/random; comma-separated, or the flag repeated for a "
  'name with a comma: --methods="TrackStar, Adam rank-1"); default all.',
)
_CACHE = cli.define_compilation_cache_flag()


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  cli.use_compilation_cache(_CACHE, WORKDIR.value)
  table = pipeline.run(config, WORKDIR.value, stages=_STAGES.value, only=_METHODS.value)
  cli.finish(config, WORKDIR.value, "pipeline", stage_seconds=(table or {}).get("stage_seconds"))


if __name__ == "__main__":
  cli.run(main)
