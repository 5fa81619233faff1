r"""Encodes every corpus example (raw TrackStar phi) into the encoding store.

  python -m launch.encode --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.encode --config=configs/lama.py:model=small \
      --config.manual_dir=../shared/data/lama_trex --config.store.url=gs://bucket/enc.zarr --workdir=/tmp/ts_lama

--workdir is the training workdir (checkpoint with optimizer state, tokenizer).
Killed at any point and restarted with the same command, it continues with
the chunks not yet committed and produces the same store. Multi-host: run the
same command on every host; each writes its own chunks.
"""

from absl import logging

from trackstar_jax.jobs import cli, encode

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(
  workdir_help="Training workdir (checkpoint with optimizer state, tokenizer); encodings.zarr goes here."
)


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  store = encode.run(config, WORKDIR.value)
  cli.finish(config, cli.output_dir(store.url), "encode", store=store.url, rows=store.num_rows, dim=store.dim)
  logging.info("Done: %d x %d encodings in %s", store.num_rows, store.dim, store.url)


if __name__ == "__main__":
  cli.run(main)
