r"""Writes a self-contained HTML page of the proponents and opponents of every query, with metrics and charts.

  python -m launch.report --results=trackstar=/tmp/ts/results.jsonl --results=bm25=/tmp/ts/bm25.jsonl \
      --evaluation=/tmp/ts/evaluation.json --ablation=/tmp/ts/ablation.json --output=/tmp/ts/report.html

Open the page from disk (file://); it needs no network. URL hash parameters
select a view, e.g. report.html#relation=P20&q=Paris&compare=bm25.
"""

from absl import app, flags

from trackstar_jax.jobs import report

_RESULTS = flags.DEFINE_multi_string(
  "results",
  None,
  "Results JSONL file (TrackStar schema), PATH or NAME=PATH; repeat the flag for several "
  "methods. The first is shown by default. Local path, file:// or gs://.",
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the HTML page (e.g. report.html).")
_EVALUATION = flags.DEFINE_string(
  "evaluation",
  None,
  "Optional evaluation.json from launch/evaluate.py: metrics summary, MRR by frequency / relation / model correctness.",
)
_ABLATION = flags.DEFINE_string(
  "ablation", None, "Optional ablation.json from launch/pipeline.py: the ladder table and its MRR / tail-patch charts."
)
_COMPARE = flags.DEFINE_string(
  "compare",
  None,
  "Optional second results file (PATH or NAME=PATH) to compare with the first side by side, joined on example_id.",
)
_TITLE = flags.DEFINE_string("title", None, "Page title (default: 'TrackStar results: <dataset>').")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 50, "Queries per page of the viewer.", lower_bound=1)
flags.mark_flags_as_required(["results", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    out = report.run(
      results=_RESULTS.value,
      output=_OUTPUT.value,
      evaluation=_EVALUATION.value,
      ablation=_ABLATION.value,
      compare=_COMPARE.value,
      title=_TITLE.value,
      page_size=_PAGE_SIZE.value,
    )
  except report.ReportInputError as e:  # a bad input file: its name and line, no traceback
    raise SystemExit(f"launch/report.py: {e}") from e
  print(f"Wrote {out['output']}: {out['queries']:,} queries, methods {', '.join(out['methods'])}.", flush=True)


if __name__ == "__main__":
  app.run(main)
