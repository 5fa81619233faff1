r"""The linear datamodeling score (LDS) of every ablation-ladder method.

  python -m launch.lds --config=configs/synthetic.py --workdir=/tmp/ts_synth
  python -m launch.lds --config=configs/synthetic.py --workdir=/tmp/ts_synth \
      --config.lds.num_models=64 --config.lds.models_per_step=64 --config.lds.methods='("random","bm25")'

Uses (or first makes, with the pipeline's train / hessian / encode stages)
the full-data model and its encodings in --workdir, trains
`lds.num_models` models on random `lds.fraction` subsets of the corpus
(`lds.models_per_step` at once under vmap), measures every query's target
loss under each and writes <workdir>/lds.{json,md} (config.lds.output): per
method, the mean over queries of the Spearman correlation between predicted
effect and -loss, with bootstrap intervals. Restarted, it reuses the models
already trained. See trackstar_jax/jobs/lds.py.
"""

from absl import logging

from trackstar_jax.jobs import cli, lds

CONFIG, WORKDIR, DISTRIBUTED = cli.define_flags(
  workdir_help="Training workdir (the full-data model, the ladder's stores); the LDS report goes here too."
)
_CACHE = cli.define_compilation_cache_flag()


def main(argv):
  config = cli.start(argv, CONFIG, DISTRIBUTED)
  cli.use_compilation_cache(_CACHE, WORKDIR.value)
  report = lds.run(config, WORKDIR.value)
  out = lds.output_path(config, WORKDIR.value)
  cli.finish(config, cli.output_dir(out), "lds", report=out, **{k: v["lds"] for k, v in report["methods"].items()})
  print(lds.to_markdown(report), flush=True)
  logging.info("Done: LDS of %d methods in %.1fs -> %s", len(report["methods"]), report["seconds"]["total"], out)


if __name__ == "__main__":
  cli.run(main)
