r"""Does a config fit a TPU pod slice? Compiles its steps ahead of time for the slice, on any CPU machine.

  pip install -e ".[tpu-aot]"      # libtpu, at the version jax[tpu] pins for the installed jax
  python -m launch.compile_check --config=configs/lama.py:model=paper_8b \
      --config.mesh='(("data",-1),("model",4))' --config.sharding.preset=fsdp_tp \
      --config.encoder.layers_per_group=4 --topology=v5p-256,v5p-512,v5e-256

For each `--topology` (a Cloud TPU accelerator type: v5p-256 is 128 chips, v5e-256 256 chips) it builds
the slice's devices with `jax.experimental.topologies.get_topology_desc` (libtpu's compiler, no TPU
attached), the mesh of `config.mesh` over them and the parameter shardings of `config.sharding`, and
compiles with abstract inputs (`jax.ShapeDtypeStruct`s carrying their shardings: nothing is allocated):

  train          the training step (`training.make_train_step`) at batch `train.batch_size`
  encode_fused   the encode step (`TrackStarEncoder`) with the fused correction adam_rank1, at
                 `encoder.batch_size`
  encode_adam    the same with the exact element-wise Adam correction (per-layer G)
  hessian        one `hessian.SecondMoment.update` of R (full or block-diagonal) with an encode batch
  retrieve       one `retrieval.StreamingTopK` chunk step on one host's chips, at `retrieve.chunk_rows`
                 rows, `--queries` queries

Per step it prints XLA's per-device memory (`compiled.memory_analysis()`: arguments + outputs +
temporaries - aliased (donated) buffers) against the chip's HBM, whether it fits, and the largest
batch that fits (per-device batch doubled until it does not: one compile each; the compiler's own
out-of-memory error counts as "does not fit", with the size it reports). `--output` writes the table
as JSON lines. The model's vocabulary is `tokenizer.vocab_size` (or `--vocab_size`).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from trackstar_jax.jobs import cli
from trackstar_jax.jobs import compile_check as cc

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lama.py", "Experiment config (configs/*.py).")
TOPOLOGY = flags.DEFINE_list("topology", ["v5p-256", "v5e-256"], "Cloud TPU accelerator types, e.g. v5p-256,v5e-256.")
STEP_FLAG = flags.DEFINE_list("steps", list(cc.STEPS), f"Which steps to compile: {', '.join(cc.STEPS)}.")
VOCAB = flags.DEFINE_integer("vocab_size", 0, "Model vocabulary (0: config.tokenizer.vocab_size).")
QUERIES = flags.DEFINE_integer("queries", 8192, "Queries scored by the retrieve step.")
SEARCH = flags.DEFINE_bool("search", True, "Search the largest fitting batch (more compiles).")
MAX_PER_DEVICE = flags.DEFINE_integer("max_per_device_batch", 256, "Upper end of the batch search, per device.")
OUTPUT = flags.DEFINE_string("output", "", "Also write the table as JSON lines here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  rows = cc.run(
    config,
    topologies=TOPOLOGY.value,
    steps=STEP_FLAG.value,
    vocab_size=VOCAB.value,
    queries=QUERIES.value,
    search=SEARCH.value,
    max_per_device_batch=MAX_PER_DEVICE.value,
  )
  print(cc.format_table(rows))
  if OUTPUT.value:
    with open(OUTPUT.value, "w") as f:
      for r in rows:
        f.write(json.dumps(dataclasses.asdict(r)) + "\n")
  sys.exit(0 if all(r.fits for r in rows) else 1)


if __name__ == "__main__":
  cli.run(main, default_config="configs/lama.py")
