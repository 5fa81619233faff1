r"""Evaluates retrieval results: fact-tracing metrics and tail-patch, one table.

  python -m launch.evaluate --config=configs/synthetic.py --workdir=/tmp/ts_synth \
      --results=trackstar=/tmp/ts_synth/results.jsonl --results=bm25=/tmp/ts_synth/bm25.jsonl

--workdir is the training workdir (checkpoint with optimizer state, tokenizer);
--results names one or more results files (name=path; a bare path is named by
its file name). Writes <workdir>/evaluation.{md,json} (or --output=PREFIX).
The whole ladder (train -> encode -> retrieve -> evaluate): launch/pipeline.py.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from trackstar_jax import checkpointing
from trackstar_jax import pipeline
from trackstar_jax.evaluation import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: checkpoints, tokenizer.")
_RESULTS = flags.DEFINE_multi_string("results", None, "Results file(s) as name=path (repeat the flag).")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix (default <workdir>/evaluation).")
_TAIL_PATCH = flags.DEFINE_bool("tail_patch", True, "Tail-patch the proponents (slower than the metrics).")
flags.mark_flags_as_required(["workdir", "results"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpointing.quiet_orbax_logging()
  results = run.parse_results_flag(_RESULTS.value)
  pipeline.write_job_config(_CONFIG.value, _WORKDIR.value, "evaluate")
  table = run.evaluate_job(_CONFIG.value, _WORKDIR.value, results=results, output_prefix=_OUTPUT.value,
                           tail_patch=_TAIL_PATCH.value)
  print(run.to_markdown(table), flush=True)
  logging.info("Done: %d methods evaluated.", len(table["rows"]))


if __name__ == "__main__":
  app.run(main)
