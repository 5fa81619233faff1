r"""Greedy query accuracy of a checkpoint, on a fixed dev / test split of relations.

  python -m launch.accuracy --config=configs/lama.py:mixed=True --workdir=/tmp/lama_a   # -> accuracy.json
  python -m launch.accuracy --config=configs/lama.py:mixed=True --workdir=/tmp/lama_a \
      --compare=a=/tmp/lama_a --compare=b=/tmp/lama_b      # table of variants, selected on dev relations

With --compare, each NAME=WORKDIR must already hold its accuracy.json (the
first form writes it); the variant with the best dev accuracy on facts stated
>= 3 times (--metric) is marked, and its test columns are what to report.
"""

from absl import flags, logging

from trackstar_jax.jobs import accuracy, cli

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(workdir_help="Training workdir: checkpoints, tokenizer.")
_COMPARE = flags.DEFINE_multi_string("compare", None, "NAME=WORKDIR of a variant to compare (repeat the flag).")
_METRIC = flags.DEFINE_string("metric", ">=3", "Selection metric on dev relations: accuracy or a frequency bucket.")


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  if _COMPARE.value:
    pairs = [v.split("=", 1) for v in _COMPARE.value]
    bad = [v for v, p in zip(_COMPARE.value, pairs) if len(p) != 2 or not all(p)]
    if bad:
      raise ValueError(f"--compare takes NAME=WORKDIR, got {bad}.")
    best, table = accuracy.compare(dict(pairs), metric=_METRIC.value)
    print(table, flush=True)
    logging.info("Selected on dev relations: %s", best)
    return
  table = accuracy.run(config, WORKDIR.value)
  cli.finish(config, WORKDIR.value, "accuracy", test_accuracy=table["test"]["accuracy"], test_ge3=table["test"][">=3"])


if __name__ == "__main__":
  cli.run(main)
