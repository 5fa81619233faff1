r"""Retrieves each query's proponents and opponents over the whole encoding store.

  python -m launch.retrieve --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.retrieve --config=configs/synthetic.py --workdir=/tmp/ts_synth \
      --config.retrieve.use_hessian=False --config.retrieve.method=cosine

--workdir is the training workdir, after launch/encode.py and
launch/fit_hessian.py. Writes <workdir>/results.jsonl (or
config.retrieve.output) in the TrackStar results schema, with
<results>.meta.json. Multi-host: run the same command on every host.
"""

from absl import logging

from trackstar_jax.jobs import cli, retrieve

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(
  workdir_help="Training workdir (checkpoint, tokenizer, hessian.npz, encodings.zarr); results.jsonl goes here."
)


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  path = retrieve.run(config, WORKDIR.value)
  cli.finish(config, cli.output_dir(path), "retrieve", results=path)
  logging.info("Done: %s", path)


if __name__ == "__main__":
  cli.run(main)
