r"""Fits the Hessian approximation R (R_train, R_eval, lambda) and saves R^{-1/2}.

  python -m launch.fit_hessian --config=configs/synthetic.py --workdir=/tmp/ts_synth

--workdir is the training workdir; writes <workdir>/hessian.npz (or
config.hessian.path). Encodes config.hessian.train_sample corpus examples and,
with config.hessian.mixed, every query. Short: a rerun redoes it.
"""

from absl import logging

from trackstar_jax.jobs import cli, fit_hessian, workdir

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(
  workdir_help="Training workdir (checkpoint with optimizer state, tokenizer); hessian.npz goes here."
)


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  h = fit_hessian.run(config, WORKDIR.value)
  path = workdir.hessian_path(config, WORKDIR.value)
  cli.finish(
    config,
    cli.output_dir(path),
    "fit_hessian",
    hessian=path,
    dim=h.dim,
    **{k: v for k, v in h.meta.items() if k != "encoding"},
  )
  logging.info("Done: lambda %.4f, dim %d", h.lam, h.dim)


if __name__ == "__main__":
  cli.run(main)
