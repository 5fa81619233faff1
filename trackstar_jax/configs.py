"""Config defaults shared by the experiment files in `configs/`.

Every job reads one `ml_collections.ConfigDict` with these sections:

  dataset, data_dir, manual_dir   which fact dataset and where it lives
  world                           synthetic fact-world generator settings
  tokenizer                       vocab size of the corpus-trained tokenizer
  seq_len                         padded length of every example
  model                           `TransformerConfig` fields
  train                           optimizer, schedule, batch, checkpoint cadence
  mesh                            (("data", -1),) style mesh axes; -1 = the rest
  encoder                         traced params, projection, optimizer correction
  hessian                         R_train / R_eval sample sizes, damping, lambda
  store, retrieve, evaluate       later pipeline stages

Fields that users override from the command line are tuples, not lists.
"""

from __future__ import annotations

import ml_collections

from trackstar_jax import encoder as encoder_lib
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import optim
from trackstar_jax import options
from trackstar_jax import retrieval
from trackstar_jax import store as store_lib

# Model shapes. `small` is our GPU benchmark model (~33M parameters with a 16k
# vocabulary); the `paper_*` shapes approximate the TrackStar paper's three
# model sizes and serve compile/throughput checks, not training here.
MODEL_PRESETS = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, tied_embeddings=True),
    "small": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, tied_embeddings=True),
    "paper_154m": dict(d_model=1024, n_layers=8, n_heads=16, d_ff=4096, tied_embeddings=False),
    "paper_1b": dict(d_model=2048, n_layers=16, n_heads=16, d_ff=8192, tied_embeddings=False),
    "paper_8b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=14336, tied_embeddings=False),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,key=value` config-file arguments over defaults.

  `--config=configs/lama.py:model=small,runlocal=True` gives
  `parse_arg("model=small,runlocal=True", model="tiny", runlocal=False)`.
  Values are converted to the type of the default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"Config argument {item!r} is not of the form key=value.")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def model_config(preset: str, *, max_len: int) -> ml_collections.ConfigDict:
  if preset not in MODEL_PRESETS:
    raise ValueError(f"Unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}.")
  cfg = ml_collections.ConfigDict(dict(MODEL_PRESETS[preset]))
  cfg.preset = preset
  cfg.max_len = max_len
  cfg.dtype = "float32"
  return cfg


def base_config(*, dataset: str, model: str, seq_len: int) -> ml_collections.ConfigDict:
  """The full default config; experiment files override parts of it."""
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.data_dir = ""  # TFDS data dir; "" = <workdir>/../tfds or $TFDS_DATA_DIR.
  c.manual_dir = ""  # lama_trex: the folder holding evidences/ and lama_templates/.
  c.lama_relations = ()  # lama_trex: relation ids to keep, e.g. ("P20", "P27"); () = all

  c.world = ml_collections.ConfigDict()
  c.world.seed = 0
  c.world.n_entities = 400
  c.world.n_facts = 600
  c.world.max_frequency = 200
  c.world.zipf_a = 1.3
  c.world.n_distractors = 2000

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 1024
  c.tokenizer.byte_fallback = None  # None: on from 2048 pieces

  c.seq_len = seq_len
  c.model = model_config(model, max_len=seq_len)

  # Library options (defaults in their dataclasses) plus the jobs' own fields.
  c.train = ml_collections.ConfigDict(options.defaults(optim.OptimizerOptions))
  c.train.batch_size = 64
  c.train.seed = 0
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.eval_batch_size = 256
  c.train.num_sample_answers = 5

  c.mesh = (("data", -1),)

  c.encoder = ml_collections.ConfigDict(options.defaults(encoder_lib.EncoderOptions))
  c.encoder.b2 = ml_collections.FieldReference(None, field_type=float)  # None: from the state (or train.b2)
  c.encoder.batch_size = 64  # examples per encoder call (global)
  c.encoder.step = -1  # checkpoint step to encode with (-1 = latest)

  c.hessian = ml_collections.ConfigDict(options.defaults(hessian_lib.HessianOptions))
  c.hessian.train_sample = 4096  # corpus examples sampled for R_train
  c.hessian.seed = 0  # corpus-sample seed for R_train
  c.hessian.path = ""  # "" = <workdir>/hessian.npz

  c.store = ml_collections.ConfigDict()
  c.store.url = ""  # "" = <workdir>/encodings.zarr
  c.store.dtype = store_lib.StoreMeta.dtype  # bfloat16 | float32
  c.store.chunk_rows = store_lib.StoreMeta.chunk_rows

  c.retrieve = ml_collections.ConfigDict(options.defaults(retrieval.RetrieveOptions))
  c.retrieve.use_hessian = True  # False: no R^{-1/2} (ablation rungs 1-3)
  c.retrieve.method = ""  # name in the results metadata ("" = trackstar)
  c.retrieve.output = ""  # "" = <workdir>/results.jsonl

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.tail_patch_k = 10
  c.evaluate.query_chunk = 8  # queries per tail-patch step (x k param copies)
  c.evaluate.seed = 0  # random-proponent floor
  c.evaluate.baselines = ("bm25", "dense", "random")  # dense needs the [dense] extra
  c.evaluate.subset = "model_correct"  # headline rows: queries the model gets right
  return c
