"""Config defaults shared by the experiment files in `configs/`.

Every job reads one `ml_collections.ConfigDict` with these sections:

  dataset, data_dir, manual_dir   which fact dataset and where it lives
  world                           synthetic fact-world generator settings
  tokenizer                       vocab size of the corpus-trained tokenizer; or a user's tokenizer file
  corpus, queries, checkpoint     a user's own corpus, queries and Orbax checkpoint (configs/own_model.py)
  seq_len                         padded length of every example
  model                           `TransformerConfig` fields; `factory`: the model's import path
  train                           optimizer, schedule, batch, checkpoint cadence
  mesh                            (("data", -1),) style mesh axes; -1 = the rest
  sharding                        parameter sharding rules over the mesh axes (FSDP / tensor parallel)
  encoder                         traced params, projection, optimizer correction
  hessian                         R_train / R_eval sample sizes, damping, lambda
  store, retrieve, evaluate       later pipeline stages

Fields that users override from the command line are tuples, not lists.
"""

from __future__ import annotations

from collections.abc import Sequence
import difflib
import importlib.util
import os

from absl import flags
import ml_collections

from trackstar_jax import encoder as encoder_lib
from trackstar_jax import hessian as hessian_lib
from trackstar_jax import optim, options, retrieval
from trackstar_jax import store as store_lib
from trackstar_jax.models import factory as model_factory

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
  Values are converted to the type of the default; booleans accept exactly
  true/false/1/0/yes/no (any case), anything else is an error.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"Config argument {item!r} is not of the form key=value.")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}{_did_you_mean(key, defaults)}; known: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      value = parse_bool(value, what=f"config argument {key}")
    elif default is not None:
      try:
        value = type(default)(value)
      except ValueError:
        raise ValueError(f"Config argument {key}={value!r} is not a {type(default).__name__}.") from None
    out[key] = value
  return out


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_bool(value: str, *, what: str = "value") -> bool:
  """true/false/1/0/yes/no (any case) -> bool; anything else raises ValueError (with a "did you mean")."""
  low = value.strip().lower()
  if low in _TRUE or low in _FALSE:
    return low in _TRUE
  hint = difflib.get_close_matches(low, ("true", "false", "yes", "no"), n=1, cutoff=0.5)
  hint = f" Did you mean {hint[0]!r}?" if hint else ""
  raise ValueError(f"{what}={value!r} is not a boolean: use one of true/false/1/0/yes/no (any case).{hint}")


def _did_you_mean(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted path of `config`: sections and leaves."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _paths(value, prefix + key + ".")
  return out


def _override_paths(argv: Sequence[str], flag: str) -> list[tuple[str, str]]:
  """(the argument, its dotted path) of every `--flag.a.b[=v]` / `--noflag.a.b` in argv."""
  out = []
  for arg in argv:
    name = arg.split("=", 1)[0].lstrip("-")
    for head in (flag + ".", "no" + flag + "."):
      if arg.startswith("-") and name.startswith(head):
        out.append((arg, name[len(head) :]))
        break
  return out


def _config_file_arg(argv: Sequence[str], flag: str) -> str | None:
  """The value of `--flag=...` / `--flag ...` in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    name, eq, rest = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == flag:
      value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of config file `path[:arg]`, as `config_flags.DEFINE_config_file` loads it."""
  file, *arg = path.split(":", 1)
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(file))[0] + "_config", file)
  if spec is None or not os.path.isfile(file):
    raise FileNotFoundError(f"Config file {file!r} not found (--config={path}).")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def check_overrides(
  *, argv: Sequence[str], config: ml_collections.ConfigDict | None = None, flag: str = "config", default_file: str = ""
) -> None:
  """Refuses `--config.a.b=...` overrides that name no field of the config, with "did you mean".

  ml_collections' `config_flags` fails on an unknown leaf (`--config.retrieve.kk=5`)
  with a long traceback ending in AttributeError 'kk'. Launchers call this
  first thing, before absl parses the flags:

    if __name__ == "__main__":
      configs.check_overrides(argv=sys.argv, default_file="configs/synthetic.py")
      app.run(main)

  Args:
    argv: the command line (flagfiles are expanded as absl does).
    config: the config the overrides apply to; default: loaded from argv's
      `--config=path[:arg]` (or `default_file`) the way `config_flags` loads it
      (`load_config_file`), which also runs the config file's own argument checks.
    flag: the name of the config flag.
    default_file: the config flag's default, used when argv has no `--config`.

  Raises:
    ValueError: an override names no section or field; the message names the
      closest existing path.
  """
  argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  overrides = _override_paths(argv, flag)
  if not overrides:
    return
  if config is None:
    path = _config_file_arg(argv, flag) or default_file
    if not path:
      return  # no config to check against: config_flags reports that itself
    config = load_config_file(path)
  known = _paths(config)
  for arg, dotted in overrides:
    if dotted in known:
      continue
    parts, node, depth = dotted.split("."), config, 0
    while depth < len(parts) and isinstance(node, ml_collections.ConfigDict) and parts[depth] in node:
      node, depth = node[parts[depth]], depth + 1
    where = ".".join(parts[:depth])
    if not isinstance(node, ml_collections.ConfigDict):
      siblings, what = [where], f"{where!r} is a field ({type(node).__name__}), not a section"
    elif where:
      siblings, what = [f"{where}.{k}" for k in node], f"section {where!r} has no field {parts[depth]!r}"
    else:
      siblings, what = list(node.keys()), f"the config has no section or field {parts[depth]!r}"
    close = difflib.get_close_matches(dotted, known, n=3, cutoff=0.6)
    close = close or difflib.get_close_matches(dotted, siblings, n=3, cutoff=0.0)
    hint = f" Did you mean --{flag}.{close[0]}?" if close else ""
    others = f" (closest: {', '.join(close)})" if len(close) > 1 else ""
    raise ValueError(f"Unknown config override {arg!r}: {what}.{hint}{others}")


def model_config(preset: str, *, max_len: int) -> ml_collections.ConfigDict:
  if preset not in MODEL_PRESETS:
    raise ValueError(f"Unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}.")
  cfg = ml_collections.ConfigDict(dict(MODEL_PRESETS[preset]))
  cfg.preset = preset
  cfg.factory = model_factory.DEFAULT  # "pkg.module:function" building the model (models/factory.py)
  cfg.max_len = max_len
  cfg.dtype = "float32"
  return cfg


def add_own_data_sections(c: ml_collections.ConfigDict) -> None:
  """The sections naming a user's own corpus, queries, tokenizer file and checkpoint; empty = not used.

  Every field is explained in configs/own_model.py. With `corpus.path` set,
  the jobs read that corpus and `queries.path` instead of `dataset`; with
  `checkpoint.path` set, they restore `checkpoint.params` / `.opt_state` from
  it instead of the workdir's own checkpoints.
  """
  bool_or_none = lambda: ml_collections.FieldReference(None, field_type=bool)
  c.tokenizer.path = ""  # a sentencepiece .model or a Hugging Face tokenizer.json ("" = corpus-trained)
  c.tokenizer.kind = ""  # sentencepiece | huggingface ("" = by the file's extension)
  c.tokenizer.add_bos = bool_or_none()  # None: where the tokenizer has the token
  c.tokenizer.add_eos = bool_or_none()
  c.tokenizer.bos_token = ""  # Hugging Face only ("" = the first of data.tokenizers.BOS_TOKENS it has)
  c.tokenizer.eos_token = ""
  c.corpus = ml_collections.ConfigDict(
    dict(path="", format="", split="", text_field="text", ids_field="", id_field="", overflow="window", stride=0)
  )
  c.queries = ml_collections.ConfigDict(
    dict(path="", prompt_field="prompt", target_field="target", id_field="id", gold_field="", overflow="error")
  )
  c.checkpoint = ml_collections.ConfigDict(dict(path="", step=-1, params="params", opt_state="opt_state"))


def base_config(*, dataset: str, model: str, seq_len: int) -> ml_collections.ConfigDict:
  """The full default config; experiment files override parts of it."""
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.data_dir = ""  # TFDS data dir; "" = <workdir>/../tfds or $TFDS_DATA_DIR.
  c.manual_dir = ""  # lama_trex: the folder holding evidences/ and lama_templates/.
  c.lama_relations = ()  # lama_trex: relation ids to keep, e.g. ("P20", "P27"); () = all
  # lama_trex mixed training (data/lama_mixed.py): template statements for `fraction` of each relation's facts.
  c.lama_mixed = ml_collections.ConfigDict(dict(fraction=0.0, paraphrases=5, seed=0))  # fraction 0: no mixing
  c.lama_queries = "heldout"  # lama_trex with mixing: "heldout" (facts without statements) | "all"

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
  add_own_data_sections(c)

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
  # Parameter sharding over the mesh axes (trackstar_jax/sharding.py): a preset ("" | fsdp | tp | fsdp_tp) and
  # rules ((path regex, (mesh axis | None, ...)), ...) searched before it; unmatched params are replicated.
  c.sharding = ml_collections.ConfigDict(dict(preset="", rules=()))

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
  # bfloat16 | float32 | int8 (per-row scale, 2x smaller than bf16) | int4 (per-128-column scales, 3.8x); quantize.py
  c.store.dtype = store_lib.StoreMeta.dtype
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

  # Query accuracy on a fixed split of relations (jobs/accuracy.py): variants are chosen on "dev", reported on "test".
  c.accuracy = ml_collections.ConfigDict(dict(dev_fraction=0.5, split_seed=0))

  # Linear datamodeling score (jobs/lds.py): M models on random subsets, the ladder's predicted effects vs their losses.
  c.lds = ml_collections.ConfigDict()
  c.lds.num_models = 64  # M subset models
  c.lds.fraction = 0.5  # of the corpus in each subset
  c.lds.models_per_step = 8  # models trained together by one jit(vmap(step)) (memory: x params + opt state)
  c.lds.num_steps = -1  # steps per model; -1 = train.num_steps (the main run's recipe)
  c.lds.seed = 0  # subsets, the models' seeds, random scores, bootstrap
  c.lds.shared_init = False  # True: every model starts from train.seed's init (less noise, one init only)
  c.lds.methods = ()  # ladder method names or kinds; () = every method but dense
  c.lds.bootstrap_samples = 1000
  c.lds.output = ""  # "" = <workdir>/lds.json (+ lds.md, lds_models.npz, lds_per_query.npz)
  return c
