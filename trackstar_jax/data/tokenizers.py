"""A user's tokenizer behind one small interface: a SentencePiece model or a Hugging Face `tokenizers` JSON.

  tok = load_tokenizer("/models/spm.model")                   # or "tokenizer.json" (Hugging Face tokenizers)
  tok = load_tokenizer("tokenizer.json", add_bos=True, add_eos=False, bos_token="<s>")
  check_vocab(tok, model_vocab_size=32000)                     # a clear error if the model cannot embed its ids
  ids = tok.encode("The cat sat.")                             # no special tokens: the sequence rules add them
  ids, spans = tok.encode_with_offsets("The cat sat.")         # + each token's [start, end) character span

Special tokens are never added by `encode`; the sequence builders
(`data.corpus`, `data.queries`) put BOS before and EOS after a document as
`add_bos` / `add_eos` say. Their defaults come from the tokenizer's own
special tokens: a SentencePiece model's bos_id / eos_id (-1: none); for a
Hugging Face tokenizer the first of `BOS_TOKENS` / `EOS_TOKENS` in its
vocabulary, or the `bos_token` / `eos_token` given. Asking for a BOS or EOS
the tokenizer does not have is an error.

SentencePiece is the project's dependency; Hugging Face `tokenizers` is
optional (`pip install tokenizers`, or `trackstar_jax[data]`).
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np

# Hugging Face special tokens tried, in order, for BOS / EOS when none is named.
BOS_TOKENS = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>")
EOS_TOKENS = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>")


class TextTokenizer:
  """The interface: encode, encode_with_offsets, decode, vocab_size, bos_id, eos_id, add_bos, add_eos."""

  kind = ""
  bos_id: int | None = None  # None: the tokenizer has no such token
  eos_id: int | None = None
  add_bos: bool = False
  add_eos: bool = False

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return self.encode_with_offsets(text)[0]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, [start, end) character span of each token in `text`)."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens dropped."""
    raise NotImplementedError

  def _set_specials(self, add_bos: bool | None, add_eos: bool | None) -> None:
    for what, add, tid in (("bos", add_bos, self.bos_id), ("eos", add_eos, self.eos_id)):
      if add and tid is None:
        raise ValueError(f"add_{what}=True but this {self.kind} tokenizer has no {what.upper()} token.")
      setattr(self, f"add_{what}", tid is not None if add is None else bool(add))

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id},"
      f" add_bos={self.add_bos}, add_eos={self.add_eos})"
    )


def _char_offsets(text: str, byte_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """UTF-8 byte spans of `text` -> character spans."""
  ends = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])  # byte offset of each character boundary
  flat = np.searchsorted(ends, np.asarray(byte_spans, np.int64).reshape(-1))
  return [(int(a), int(b)) for a, b in flat.reshape(-1, 2)]


class SentencePieceTokenizer(TextTokenizer):
  """A SentencePiece model (its serialized proto, e.g. the bytes of a `.model` file)."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, *, add_bos: bool | None = None, add_eos: bool | None = None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._sp = spm.SentencePieceProcessor(model_proto=bytes(model_proto))
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self._specials = {i for i in (self.bos_id, self.eos_id, self._sp.pad_id()) if i is not None and i >= 0}
    self._set_specials(add_bos, add_eos)

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_with_offsets(self, text):
    try:
      proto = self._sp.encode(text, return_type="proto")
    except TypeError:  # sentencepiece < 0.2.1
      proto = self._sp.encode(text, out_type="immutable_proto")
    ids = [int(p.id) for p in proto.pieces]
    return ids, _char_offsets(text, [(p.begin, p.end) for p in proto.pieces])

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids if int(i) not in self._specials])


def _hf_tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
      "A Hugging Face tokenizer.json needs the `tokenizers` package, an optional dependency: "
      "pip install tokenizers (or 'trackstar_jax[data]')."
    ) from None
  return tokenizers


class HFTokenizer(TextTokenizer):
  """A Hugging Face `tokenizers.Tokenizer` (e.g. loaded from a tokenizer.json)."""

  kind = "huggingface"

  def __init__(
    self,
    tokenizer,
    *,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
  ):
    self._tok = tokenizer
    self.bos_id = self._special(bos_token, BOS_TOKENS, "bos_token")
    self.eos_id = self._special(eos_token, EOS_TOKENS, "eos_token")
    self._set_specials(add_bos, add_eos)

  def _special(self, token: str | None, candidates: Sequence[str], arg: str) -> int | None:
    if token is not None:
      tid = self._tok.token_to_id(token)
      if tid is None:
        raise ValueError(f"{arg}={token!r} is not in the tokenizer's vocabulary.")
      return int(tid)
    for t in candidates:
      tid = self._tok.token_to_id(t)
      if tid is not None:
        return int(tid)
    return None

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode_with_offsets(self, text):
    enc = self._tok.encode(text, add_special_tokens=False)
    return [int(i) for i in enc.ids], [(int(a), int(b)) for a, b in enc.offsets]

  def encode(self, text):
    return [int(i) for i in self._tok.encode(text, add_special_tokens=False).ids]

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(
  path: str,
  *,
  kind: str | None = None,
  add_bos: bool | None = None,
  add_eos: bool | None = None,
  bos_token: str | None = None,
  eos_token: str | None = None,
) -> TextTokenizer:
  """The tokenizer at `path`: a SentencePiece model, or a Hugging Face tokenizer.json.

  Args:
    path: a SentencePiece `.model` file or a Hugging Face `tokenizers` JSON file.
    kind: "sentencepiece" | "huggingface" (default: "huggingface" for .json files).
    add_bos, add_eos: put BOS before / EOS after each document (default: where
      the tokenizer has the token).
    bos_token, eos_token: the Hugging Face special tokens to use (default: the
      first of `BOS_TOKENS` / `EOS_TOKENS` in the vocabulary).

  Example:
    >>> tok = load_tokenizer("tokenizer.json", add_eos=False)
    >>> tok.decode(tok.encode("the cat sat"))
    'the cat sat'
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No tokenizer file at {path}.")
  kind = kind or ("huggingface" if path.lower().endswith(".json") else "sentencepiece")
  if kind == "huggingface":
    tok = _hf_tokenizers().Tokenizer.from_file(path)
    return HFTokenizer(tok, add_bos=add_bos, add_eos=add_eos, bos_token=bos_token, eos_token=eos_token)
  if kind != "sentencepiece":
    raise ValueError(f"Unknown tokenizer kind {kind!r}; known: 'sentencepiece', 'huggingface'.")
  if bos_token is not None or eos_token is not None:
    raise ValueError("bos_token / eos_token name Hugging Face tokens; a SentencePiece model has its own bos/eos ids.")
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return SentencePieceTokenizer(proto, add_bos=add_bos, add_eos=add_eos)
  except RuntimeError as e:
    raise ValueError(f"{path} is not a SentencePiece model ({e}); a Hugging Face tokenizer is a .json file.") from e


def check_vocab(tokenizer: TextTokenizer, model_vocab_size: int) -> None:
  """Raises ValueError when `tokenizer` can emit ids the model cannot embed (vocab_size > model_vocab_size).

  Example:
    >>> check_vocab(tok, model_vocab_size=model.config.vocab_size)
  """
  if tokenizer.vocab_size > int(model_vocab_size):
    raise ValueError(
      f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has {int(model_vocab_size)}: "
      f"ids >= {int(model_vocab_size)} would index past the embedding table. Use the tokenizer the model was "
      "trained with."
    )
