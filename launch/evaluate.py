r"""Evaluates retrieval results: fact-tracing metrics and tail-patch, one table.

  python -m launch.evaluate --config=configs/synthetic.py --workdir=/tmp/ts_synth \
      --results=trackstar=/tmp/ts_synth/results.jsonl --results=bm25=/tmp/ts_synth/bm25.jsonl

--workdir is the training workdir (checkpoint with optimizer state, tokenizer);
--results names one or more results files (name=path; a bare path is named by
its file name). Writes <workdir>/evaluation.{md,json} (or --output=PREFIX).
--compare=A,B compares two of them query by query on the dev / test split of
relations (A the costlier method; the report says which one dev MRR keeps):
  --results=exact=e.jsonl --results=rank1=r.jsonl --compare=exact,rank1
The whole ladder (train -> encode -> retrieve -> evaluate): launch/pipeline.py.
"""

import os

from absl import flags, logging

from trackstar_jax.evaluation import ablation
from trackstar_jax.jobs import cli, evaluate

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(workdir_help="Training workdir: checkpoints, tokenizer.")
_RESULTS = flags.DEFINE_multi_string(
  "results",
  None,
  "Results file(s) to evaluate, as name=path (repeat the flag; a bare path is named by its file name).",
  required=True,
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Output prefix of the .md and .json report (default <workdir>/evaluation)."
)
_COMPARE = flags.DEFINE_multi_string(
  "compare", [], "A,B: compare results A (the costlier method) with B on the relation split (repeatable)."
)
_TAIL_PATCH = flags.DEFINE_bool("tail_patch", True, "Tail-patch each query's proponents (slower than the metrics).")


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  results = evaluate.parse_results_flag(_RESULTS.value)
  table = evaluate.run(
    config,
    WORKDIR.value,
    results=results,
    output_prefix=_OUTPUT.value,
    tail_patch=_TAIL_PATCH.value,
    compare=evaluate.parse_compare_flag(_COMPARE.value),
  )
  prefix = _OUTPUT.value or os.path.join(WORKDIR.value, "evaluation")
  cli.finish(config, cli.output_dir(prefix), "evaluate", report=prefix, methods=len(table["rows"]))
  print(ablation.report_markdown(table), flush=True)
  logging.info("Done: %d methods evaluated.", len(table["rows"]))


if __name__ == "__main__":
  cli.run(main)
