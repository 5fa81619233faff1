r"""Trains the fact LM (params + optimizer state checkpoints for TrackStar).

  python -m launch.train --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.train --config=configs/lama.py:model=small \
      --config.manual_dir=../shared/data/lama_trex --workdir=/tmp/ts_lama

Restarted with the same --workdir, it resumes from the latest checkpoint.
Multi-host: run the same command on every host (see
`trackstar_jax.mesh.maybe_initialize_distributed`).
"""

from absl import logging

from trackstar_jax.jobs import cli, train

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(
  workdir_help="Output directory: checkpoints, metrics.jsonl, tokenizer, config."
)


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  metrics = train.run(config, WORKDIR.value)
  cli.finish(config, WORKDIR.value, "train", **{k: v for k, v in metrics.items() if k != "correct"})
  logging.info(
    "Done: step %d, query accuracy %.3f (>=3 gold sentences: %.3f), train time %.1fs",
    metrics["step"],
    metrics["query_accuracy"],
    metrics.get("query_accuracy/freq_>=3", float("nan")),
    metrics["train_time_s"],
  )


if __name__ == "__main__":
  cli.run(main)
