"""A SentencePiece BPE tokenizer trained on the corpus, deterministically.

Same corpus + same settings => a byte-identical model file (one thread, no
input sampling or shuffling, fixed seed). Special ids: pad 0, unk 1, bos 2,
eos 3. Words are never merged across whitespace, and a leading space becomes
the word-boundary piece "▁", so `encode(prompt) + encode(" " + object)` equals
the tokens of the object inside a corpus sentence: queries are tokenized as
prompt and target separately (see `batching.tokenize_queries`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import io
import json
import os
import re
import tempfile

from absl import logging
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """Thin wrapper around a `SentencePieceProcessor` with our special ids."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError(
        "SentencePiece model must have pad_id=0, bos_id=2, eos_id=3; got"
        f" {self._sp.pad_id()}, {self._sp.bos_id()}, {self._sp.eos_id()}."
      )

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  pad_id = PAD_ID
  unk_id = UNK_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad/bos/eos are dropped."""
    return self._sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def save(self, path: str) -> None:
    """Writes the model file atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-")
    with os.fdopen(fd, "wb") as f:
      f.write(self._proto)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    if not os.path.exists(path):
      raise FileNotFoundError(f"No tokenizer model at {path}.")
    with open(path, "rb") as f:
      return cls(f.read())


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, byte_fallback: bool | None = None) -> Tokenizer:
  """Trains a BPE SentencePiece model on `texts`, deterministically.

  If the corpus is too small for `vocab_size`, SentencePiece says how large
  the vocabulary may be; we retrain with that size and log it.
  `byte_fallback` (default: vocab_size >= 2048) spells rare characters as
  bytes instead of <unk>; it needs 256 vocabulary entries.
  """
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("Cannot train a tokenizer on an empty corpus.")
  if byte_fallback is None:
    byte_fallback = vocab_size >= 2048
  options = dict(
    model_type="bpe",
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    character_coverage=0.9995 if byte_fallback else 1.0,
    byte_fallback=byte_fallback,
    normalization_rule_name="identity",
    split_digits=True,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    max_sentence_length=1 << 16,
    minloglevel=2,
  )
  spm.set_random_generator_seed(0)  # unused without sampling; set for safety
  size = int(vocab_size)
  for _ in range(2):
    writer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=writer, vocab_size=size, **options)
      break
    except RuntimeError as e:
      m = re.search(r"Vocabulary size (?:is )?too high.*?<=\s*(\d+)", str(e))
      if not m:
        raise
      logging.warning(
        "config.tokenizer.vocab_size=%d is too large for this corpus; SentencePiece accepts at most %s: using %s.",
        vocab_size,
        m.group(1),
        m.group(1),
      )
      size = int(m.group(1))
  else:
    raise RuntimeError(f"Tokenizer training failed for vocab_size={vocab_size}.")
  tok = Tokenizer(writer.getvalue())
  logging.info("Trained a BPE tokenizer on %d texts: %d pieces.", len(texts), tok.vocab_size)
  return tok


def get_tokenizer(dataset, config, *, path: str) -> Tokenizer:
  """Loads the tokenizer at `path`, training it on `dataset.corpus` first if absent.

  A sidecar `<path>.json` records the dataset fingerprint and vocabulary size;
  a model trained on another corpus or size, or one without that record, is an
  error, not a silent reuse.
  Training is deterministic, so processes that race to create `path` write
  identical bytes (each write is atomic).
  """
  vocab_size = int(config.tokenizer.vocab_size)
  byte_fallback = config.tokenizer.byte_fallback
  want = dict(dataset=dataset.name, fingerprint=dataset.fingerprint, vocab_size=vocab_size, byte_fallback=byte_fallback)
  meta_path = path + ".json"
  if os.path.exists(path):
    if not os.path.exists(meta_path):
      raise ValueError(
        f"Tokenizer {path} has no record of the corpus it was trained on ({meta_path} is missing), so it "
        "cannot be checked against this dataset. Delete it (it is retrained) or use another workdir."
      )
    with open(meta_path) as f:
      have = json.load(f)
    diff = {k: (have.get(k), v) for k, v in want.items() if k != "dataset" and have.get(k) != v}
    if diff:
      raise ValueError(
        f"Tokenizer {path} was trained for another dataset/config ({diff}, as"
        " (stored, wanted)). Delete it or use another workdir."
      )
    logging.info("Loading tokenizer from %s.", path)
    return Tokenizer.load(path)
  texts = [rec["text"] for rec in dataset.corpus]
  tok = train_tokenizer(texts, vocab_size=vocab_size, byte_fallback=byte_fallback)
  # The record first: a tokenizer file always has one (a crash in between leaves a record and no tokenizer,
  # which the next run retrains).
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tokenizer-")
  with os.fdopen(fd, "w") as f:
    json.dump(want, f, indent=1)
  os.replace(tmp, meta_path)
  tok.save(path)
  logging.info("Saved tokenizer (%d pieces) to %s.", tok.vocab_size, path)
  return tok
