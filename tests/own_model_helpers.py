"""A user's model, checkpoint, tokenizer, corpus and queries made the user's way, for the own-model tests.

Nothing here uses this project's training, checkpoint layout or tokenizer:
`write_user_files(root)` writes

  root/my_lm.py                  a Flax Linen LM (module names `layers_{i}`, `attn`, `ffn`: not DecoderLM's)
  root/ckpt/<step>/state/        an Orbax CheckpointManager item `state` = {params, opt_state, step}, trained
                                 a few steps with optax.chain(clip, inject_hyperparams(adamw))
  root/tokenizer.json            a Hugging Face WordLevel tokenizer with <s> / </s>
  root/corpus.jsonl, .parquet    the same documents (one empty, some longer than a window)
  root/queries.jsonl             prompt / target / id / relation / gold doc ids
"""

from __future__ import annotations

import json
import os
import sys

MY_LM = '''
"""A small causal LM written by a user (not this project): Linen, its own names."""
import flax.linen as nn
import jax.numpy as jnp


class Layer(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm(name="ln1")(x)
    q = nn.DenseGeneral((self.heads, self.d // self.heads), name="q")(h)
    k = nn.DenseGeneral((self.heads, self.d // self.heads), name="k")(h)
    v = nn.DenseGeneral((self.heads, self.d // self.heads), name="v")(h)
    a = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1])
    a = jnp.where(mask[:, None], a, -1e9)
    o = jnp.einsum("bhts,bshk->bthk", nn.softmax(a, axis=-1), v)
    x = x + nn.DenseGeneral(self.d, axis=(-2, -1), name="o")(o)
    h = nn.LayerNorm(name="ln2")(x)
    return x + nn.Dense(self.d, name="down")(nn.gelu(nn.Dense(2 * self.d, name="up")(h)))


class MyLM(nn.Module):
  vocab: int
  d: int = 16
  n_layers: int = 2

  @nn.compact
  def __call__(self, tokens, pad_mask):
    t = tokens.shape[1]
    x = nn.Embed(self.vocab, self.d, name="tok")(tokens) + self.param("pos", nn.initializers.normal(0.02), (64, self.d))[:t]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & pad_mask[:, None, :]
    mask = mask | jnp.eye(t, dtype=bool)[None]
    for i in range(self.n_layers):
      x = Layer(self.d, 2, name=f"layers_{i}")(x, mask)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


def make_model(model_config, *, vocab_size, seq_len, **unused):
  return MyLM(vocab=int(model_config.get("my_vocab", 0) or vocab_size), d=16, n_layers=2)


class NoKernels(nn.Module):
  """Its matrices are raw params multiplied by hand: nothing the encoder can trace."""

  vocab: int

  @nn.compact
  def __call__(self, tokens, pad_mask):
    w = self.param("layers_0/attn/w/kernel".replace("/", "_"), nn.initializers.normal(0.02), (self.vocab, 8))
    return w[tokens] @ w.T


def make_no_kernels(model_config, *, vocab_size, **unused):
  return NoKernels(vocab=vocab_size)
'''

WORDS = tuple(
  [
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "fish",
    "sat",
    "ran",
    "flew",
    "swam",
    "on",
    "in",
    "under",
    "over",
    "mat",
    "log",
    "tree",
    "pond",
    "red",
    "blue",
    "green",
    "small",
    "big",
  ]
  + ["paris", "london", "rome", "is", "capital", "of", "france", "england", "italy", "city", "river", "house", "garden"]
)

PARAM_REGEX = r"layers_\d+/.*/kernel$"
BLOCK_REGEX = r"layers_(?P<layer>\d+)/"
SEQ_LEN = 12


def documents() -> list[dict]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  docs = []
  for i in range(36):
    n = int(rng.integers(3, 9)) if i % 7 else int(rng.integers(20, 40))  # every 7th is long: windowed
    docs.append({"url": f"doc{i}", "body": " ".join(rng.choice(WORDS, n))})
  docs[5]["body"] = "   "  # empty: skipped and counted
  docs[11]["body"] = "paris is the capital of france"
  docs[17]["body"] = "rome is the capital of italy"
  return docs


QUERIES = [
  {"id": "q0", "prompt": "paris is the capital of", "target": " france", "relation": "capital", "gold": ["doc11"]},
  {"id": "q1", "prompt": "rome is the capital of", "target": " italy", "relation": "capital", "gold": ["doc17"]},
  {"id": "q2", "prompt": "the cat sat on the", "target": " mat", "relation": "place", "gold": []},
]


def write_tokenizer(path: str) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(path)


def write_jsonl(path: str, rows) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def train_and_save(root: str, *, steps: int = 3) -> str:
  """Trains MyLM a few optax steps on the corpus and saves it the user's way; returns the checkpoint dir."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, root)
  import my_lm  # pylint: disable=g-import-not-at-top

  vocab = len(WORDS) + 3
  model = my_lm.MyLM(vocab=vocab)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(3, vocab, (8, SEQ_LEN + 1)), jnp.int32)
  params = model.init(jax.random.key(0), tokens[:, :-1], jnp.ones((8, SEQ_LEN), bool))["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3, b2=0.99))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.apply({"params": p}, tokens[:, :-1], jnp.ones((8, SEQ_LEN), bool))
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    g = jax.grad(loss)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  ckpt = os.path.join(root, "ckpt")
  mgr = ocp.CheckpointManager(ckpt, item_names=("state",))
  mgr.save(steps, args=ocp.args.Composite(state=ocp.args.PyTreeSave(dict(params=params, opt_state=opt_state))))
  mgr.wait_until_finished()
  mgr.close()
  return ckpt


def write_user_files(root: str) -> dict[str, str]:
  """Every file of the user's setup under `root`; returns their paths."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "my_lm.py"), "w") as f:
    f.write(MY_LM)
  paths = dict(
    tokenizer=os.path.join(root, "tokenizer.json"),
    jsonl=os.path.join(root, "corpus.jsonl"),
    parquet=os.path.join(root, "corpus.parquet"),
    queries=os.path.join(root, "queries.jsonl"),
  )
  write_tokenizer(paths["tokenizer"])
  docs = documents()
  write_jsonl(paths["jsonl"], docs)
  pq.write_table(pa.Table.from_pylist(docs), paths["parquet"], row_group_size=10)
  write_jsonl(paths["queries"], QUERIES)
  paths["checkpoint"] = train_and_save(root)
  paths["root"] = root
  return paths


def overrides(paths: dict[str, str], *, corpus: str = "jsonl", **extra) -> dict[str, object]:
  """Config fields (dotted) of configs/own_model.py:runlocal=True for the user's files."""
  out = {
    "seq_len": SEQ_LEN,
    "model.factory": "my_lm:make_model",
    "checkpoint.path": paths["checkpoint"],
    "tokenizer.path": paths["tokenizer"],
    "corpus.path": paths[corpus],
    "corpus.text_field": "body",
    "corpus.id_field": "url",
    "queries.path": paths["queries"],
    "queries.gold_field": "gold",
    "encoder.param_regex": PARAM_REGEX,
    "encoder.block_regex": BLOCK_REGEX,
    "encoder.d_in": 4,
    "encoder.d_out": 4,
    "encoder.batch_size": 8,
    "store.chunk_rows": 16,
    "store.dtype": "float32",
    "hessian.train_sample": 32,
    "retrieve.k": 4,
    "retrieve.matmul_dtype": "float32",
  }
  out.update(extra)
  return out


def config(paths, **kw):
  """The config object (configs/own_model.py:runlocal=True with `overrides`)."""
  from configs import own_model  # pylint: disable=g-import-not-at-top

  c = own_model.get_config("runlocal=True")
  for key, value in overrides(paths, **kw).items():
    section, _, field = key.rpartition(".")
    node = c[section] if section else c
    node[field] = value
  return c
