r"""Your own model and data: a model factory, its Orbax checkpoint, a corpus file, a tokenizer and queries.

Nothing is trained here: the model, its params and its optimizer state come
from your checkpoint; the workdir receives the outputs (encodings.zarr,
hessian.npz, results.jsonl, each job's config and metrics).

  W=/tmp/ts_own
  FLAGS="--config=configs/own_model.py --workdir=$W \
    --config.model.factory=my_pkg.lm:make_model \
    --config.checkpoint.path=/ckpts/run7 \
    --config.checkpoint.params=state/params --config.checkpoint.opt_state=state/opt_state \
    --config.tokenizer.path=/data/spm.model \
    --config.corpus.path=/data/corpus.jsonl --config.queries.path=/data/queries.jsonl \
    --config.encoder.param_regex='layers_\d+/(attn|mlp)/.*/kernel$' \
    --config.encoder.block_regex='layers_(?P<layer>\d+)/(?P<kind>attn|mlp)/'"
  python -m launch.encode      $FLAGS      # $W/encodings.zarr: phi of every corpus window
  python -m launch.fit_hessian $FLAGS      # $W/hessian.npz
  python -m launch.retrieve    $FLAGS      # $W/results.jsonl: proponents / opponents of every query

(launch/evaluate.py, whose tail-patch needs this project's training workdir,
refuses this config for now: with queries.gold_field set, the results mark
each proponent with proponent_correct.)

`my_pkg` must be importable (installed, or on PYTHONPATH). Multi-host: the
same command on every host (`--distributed` or the JAX_* variables); the
encode, fit_hessian and retrieve jobs read only their host's slice of the corpus.

Arguments (`--config=configs/own_model.py:runlocal=True`): `runlocal`
(smaller Hessian sample and batches: a smoke run on a laptop CPU).

Fields (`--config.<section>.<field>=value`):

  seq_len                 T: tokens per example (documents longer than T + 1 tokens are windowed)
  dataset                 a name for your corpus in the results' metadata (default "own")

  model.factory           "package.module:function" returning the model (trackstar_jax/models/factory.py:
                          a Flax Linen module, an NNX module, or (apply_fn, params)); called as
                          factory(config.model, vocab_size=<tokenizer's>, seq_len=T). Add your own
                          fields to `model` for it (--config.model.d_model=... needs them in this file).
  checkpoint.path         an Orbax checkpoint: a CheckpointManager directory (step folders), one step's
                          folder, or a PyTree checkpoint directory
  checkpoint.step         the CheckpointManager step (-1: the latest)
  checkpoint.params       where the params are: item folders, then keys inside the item's tree,
                          '/'-joined ("state/params": item `state`, key `params`; "params": an item `params`)
  checkpoint.opt_state    where the optax state is, likewise ("" with encoder.correction=none). The second
                          moments are found in any optax chain, inject_hyperparams, masked, multi_transform
                          or MultiSteps state; only they are read (Orbax partial restore)

  tokenizer.path          a sentencepiece .model file, or a Hugging Face tokenizers .json file
  tokenizer.kind          sentencepiece | huggingface ("": by the file's extension, .json = huggingface)
  tokenizer.add_bos       put BOS before each document and query (None: when the tokenizer has one)
  tokenizer.add_eos       put EOS after each document (never after a query); None: when it has one
  tokenizer.bos_token     Hugging Face only: the BOS token ("": the first of <s>, <bos>, [BOS], ... it has)
  tokenizer.eos_token     Hugging Face only: the EOS token, likewise

  corpus.path             .jsonl, .parquet, .array_record (JSON records), or "tfds:NAME" (tfds.data_source)
  corpus.format           jsonl | parquet | array_record | tfds ("": from the path)
  corpus.split            the TFDS split ("": train); data_dir: the TFDS data directory
  corpus.text_field       the record field holding a document's text
  corpus.ids_field        or a field of pre-tokenized ids ("": use text_field)
  corpus.id_field         the field with the document's id ("": its row number); results name each
                          example "doc_id#window" (proponent_sources)
  corpus.overflow         documents longer than T + 1 tokens: window (split into windows, every token
                          scored in exactly one) | truncate (the first window only) | error
  corpus.stride           tokens between window starts (0: T; smaller: overlapping context, not rescored)

  queries.path            JSONL, one query a line: {"prompt": ..., "target": ..., "id": ..., any metadata}
  queries.prompt_field    the prompt's field; target_field: the target's (loss on the target only)
  queries.id_field        the query id's field ("" or absent in a line: the row number)
  queries.gold_field      a field listing the ids of documents that support the answer ("": none);
                          gives proponent_correct in the results and the evaluate job's metrics
  queries.overflow        error | truncate_prompt (drop prompt tokens from the left)

  encoder.param_regex     which kernels are traced ('/'-joined parameter paths; default: DecoderLM's)
  encoder.block_regex     how they group into projection blocks (named groups; `layer` is numeric)
  encoder.correction      auto | adam | adam_rank1 | adafactor | none; d_in, d_out: the projection size
  encoder.batch_size, hessian.*, store.*, retrieve.*: as for every config (trackstar_jax/configs.py)

Empty documents (no text, no tokens) are skipped, counted and reported in the
encode job's log and `encode_metrics.jsonl`; a record without the text field
is refused naming the file and the row, a query with an empty target too.
"""

from trackstar_jax import configs


def get_config(arg=None):
  a = configs.parse_arg(arg, runlocal=False)
  c = configs.base_config(dataset="own", model="tiny", seq_len=32 if a.runlocal else 128)
  c.model.factory = ""  # your "package.module:function" ("" = the project's DecoderLM of the model fields)
  c.checkpoint.params = "state/params"
  c.checkpoint.opt_state = "state/opt_state"
  c.encoder.correction = "auto"
  c.encoder.batch_size = 32
  c.hessian.train_sample = 4096
  if a.runlocal:
    c.encoder.batch_size = 8
    c.hessian.train_sample = 64
    c.store.chunk_rows = 64
  return c
