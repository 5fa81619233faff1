"""A user's corpus as examples: documents read from a file, tokenized, split into windows, numbered 0..N-1.

  tok = tokenizers.load_tokenizer("spm.model")
  corpus = load_corpus("docs.jsonl", tokenizer=tok, seq_len=512, text_field="body", id_field="url")
  store = trackstar_jax.encode(encoder, corpus.examples, store="/tmp/enc.zarr")
  corpus.id_of(17), corpus.text_of(17)                 # "https://a.org/x#2", the text window 2 covers
  results.to_records(queries=queries.records, text_of=corpus.text_of)

Documents: each record has a text field (`text_field`, default "text") or a
pre-tokenized list of ids (`ids_field`), and an optional id (`id_field`;
default the row number; ints and strings are kept as they are). Documents
with no text or no tokens are skipped, counted in `CorpusStats` and logged.

Windows: a document is the sequence s = [BOS] + tokens + [EOS] (as the
tokenizer's add_bos / add_eos say). An example holds up to seq_len + 1
tokens of s (inputs = s[a:b-1], targets = s[a+1:b]). `overflow="window"`
(default) covers a longer document with windows starting every `stride`
tokens (default seq_len: consecutive windows share one token, the last
target of one being the first input of the next), and each target token
counts in the loss of exactly one window (with stride < seq_len, a window
scores only the tokens the previous one did not: the rest is context).
`overflow="truncate"` keeps window 0 only; `"error"` refuses long documents.

Ids: examples are numbered densely in corpus order, (document row, window),
so example 0 is window 0 of the first non-empty document. Each example
carries its document id, window index, token span and character span
(`ExampleSource`); `id_of` names it "doc_id#window".

Hosts: with process_index / process_count, a host reads only its contiguous
range of rows (`sources.host_rows`) and numbers its examples from the sum of
the example counts of the hosts before it (one allgather of a count, or
`gather_counts=`). Contiguous slices make every host's ids one contiguous
range, so the union of the slices, in process order, is exactly the
single-process corpus, ids included. To encode a store host by host, load
with `align_rows=` the store's chunk_rows and pass `corpus.host_view()` to
`trackstar_jax.encode`: each host encodes the chunks that start in its own
examples (reading on into the next host's first rows to finish its last
chunk), and the store is the same as one process's. `fingerprint()` is
split-invariant too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
from typing import Any

from absl import logging
import numpy as np

from trackstar_jax.data import sources as sources_lib
from trackstar_jax.data.batching import Examples, pack

OVERFLOW = ("window", "truncate", "error")


@dataclasses.dataclass(frozen=True)
class ExampleSource:
  """Where an example comes from: a window of a document.

  token_start, token_end: [start, end) of the document's tokens (no BOS/EOS) in the window.
  char_start, char_end: the [start, end) characters of the document text they
  cover (None for pre-tokenized documents).
  """

  doc_id: int | str
  window: int
  token_start: int
  token_end: int
  char_start: int | None = None
  char_end: int | None = None


@dataclasses.dataclass
class CorpusStats:
  """What reading a corpus did (this host's rows)."""

  source: str = ""
  row_range: tuple[int, int] = (0, 0)  # [lo, hi) rows of the source this host read
  documents: int = 0  # non-empty documents made into examples
  empty: int = 0  # skipped: no text / no ids / no tokens, or a single token with no BOS/EOS (nothing to predict)
  empty_rows: list[int] = dataclasses.field(default_factory=list)  # the first few skipped rows
  examples: int = 0
  windowed: int = 0  # documents split into more than one window
  truncated: int = 0  # documents cut to one window (overflow="truncate")
  tokens: int = 0  # tokens of the documents, BOS/EOS included
  dropped_tokens: int = 0  # tokens cut by truncation
  example_offset: int = 0  # the global id of this host's first example
  total_examples: int = 0  # examples of all hosts
  extra_examples: int = 0  # examples read past this host's rows (align_rows), not counted above

  def summary(self) -> str:
    lo, hi = self.row_range
    return (
      f"{self.source} rows [{lo}, {hi}): {self.documents} documents -> {self.examples} examples"
      f" (ids {self.example_offset}..{self.example_offset + self.examples - 1}); {self.windowed} windowed,"
      f" {self.truncated} truncated ({self.dropped_tokens} tokens dropped), {self.empty} empty skipped"
      + (f" (rows {self.empty_rows})" if self.empty else "")
    )


def windows(
  n: int, *, seq_len: int, stride: int | None = None, overflow: str = "window"
) -> list[tuple[int, int, int, int]]:
  """The windows of a sequence of `n` tokens: (start, end, loss_lo, loss_hi) per window.

  The window holds tokens [start, end) (inputs [start, end - 1), targets
  [start + 1, end)); the loss covers its target positions [loss_lo, loss_hi)
  (in window coordinates). Every target of the sequence is in exactly one
  window's loss. Raises ValueError for overflow="error" and n > seq_len + 1.

  Example:
    >>> windows(10, seq_len=4)
    [(0, 5, 0, 4), (4, 9, 0, 4), (8, 10, 0, 1)]
    >>> windows(10, seq_len=4, stride=2)
    [(0, 5, 0, 4), (2, 7, 2, 4), (4, 9, 2, 4), (6, 10, 2, 3)]
  """
  if overflow not in OVERFLOW:
    raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}.")
  stride = seq_len if stride is None else int(stride)
  if not 1 <= stride <= seq_len:
    raise ValueError(f"stride={stride} must be in [1, seq_len={seq_len}].")
  if n < 2:
    return []
  if n > seq_len + 1 and overflow == "error":
    raise ValueError(f"{n} tokens exceed seq_len + 1 = {seq_len + 1}")
  out, start, scored = [], 0, 1  # scored: targets [1, scored) are in some window's loss
  while True:
    end = min(n, start + seq_len + 1)
    out.append((start, end, scored - start - 1, end - start - 1))
    scored = end
    if end == n or overflow == "truncate":
      return out
    start += stride


class Corpus:
  """Examples of a corpus (this host's slice) and the way back from an example id to its document.

  Attributes:
    examples: `data.batching.Examples` (ids = the dense global example ids).
    sources: one `ExampleSource` per example, in order.
    stats: `CorpusStats`.
  """

  def __init__(
    self, examples: Examples, sources: list[ExampleSource], texts: dict, tokens: dict, tokenizer, stats, hosts=(0, 1)
  ):
    self.examples = examples
    self.sources = sources
    self.stats = stats
    self._texts = texts  # doc id -> text (text documents)
    self._tokens = tokens  # doc id -> ids (pre-tokenized documents)
    self._tokenizer = tokenizer
    self._offset = int(stats.example_offset)
    self._hosts = hosts  # (process_index, process_count) of the slice
    self._doc_examples: dict[Any, list[int]] = {}
    for i, s in enumerate(sources):
      self._doc_examples.setdefault(s.doc_id, []).append(self._offset + i)

  # The examples protocol of `trackstar_jax.encode` (len, batch, ids): a Corpus can be passed as is.
  def __len__(self) -> int:
    return len(self.examples)

  def batch(self, rows) -> dict[str, np.ndarray]:
    return self.examples.batch(rows)

  @property
  def ids(self) -> np.ndarray:
    return self.examples.ids

  def source_of(self, example_id: int) -> ExampleSource:
    """The document, window and spans of `example_id`."""
    i = int(example_id) - self._offset
    if not 0 <= i < len(self.sources):
      raise KeyError(
        f"Example id {int(example_id)} is not in this corpus (ids {self._offset}..{self._offset + len(self) - 1})."
      )
    return self.sources[i]

  def id_of(self, example_id: int) -> str:
    """ "doc_id#window" of `example_id`, e.g. "doc7#2"."""
    s = self.source_of(example_id)
    return f"{s.doc_id}#{s.window}"

  def text_of(self, example_id: int) -> str:
    """The text `example_id` covers: its characters of the document (or its tokens decoded, for ids)."""
    s = self.source_of(example_id)
    if s.char_start is not None:
      return self._texts[s.doc_id][s.char_start : s.char_end]
    ids = self._tokens[s.doc_id][s.token_start : s.token_end]
    return self._tokenizer.decode(ids) if self._tokenizer is not None else " ".join(str(i) for i in ids)

  def fingerprint(self, *, gather: Callable[[np.ndarray], np.ndarray] | None = None) -> str:
    """A hash of the examples (ids, tokens, loss masks) that is the same for every host split of the corpus.

    Each example is hashed on its own and the hashes are summed (mod 2^128), so
    the hosts' partial sums add up to the single-process value. With a host
    slice, `gather` (default: an allgather over the JAX processes) collects them.
    """
    n = int(self.stats.examples)  # this host's own examples (not the ones read past them)
    b = self.examples.batch(np.arange(n))
    total = 0
    for i in range(n):
      h = hashlib.blake2b(digest_size=16)
      for k in ("ids", "inputs", "loss_mask"):
        h.update(np.ascontiguousarray(b[k][i]).tobytes())
      total += int.from_bytes(h.digest(), "little")
    if self._hosts[1] > 1:
      mine = np.frombuffer((total % 2**128).to_bytes(16, "little"), np.uint8)[None]
      if gather is None:
        from trackstar_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

        gather = mesh_lib.allgather
      total = sum(int.from_bytes(np.asarray(row, np.uint8).tobytes(), "little") for row in gather(mine))
    return f"corpus-{total % 2**128:032x}"

  def host_view(self) -> HostView:
    """This host's examples as rows of the whole corpus (for `trackstar_jax.encode` into a store)."""
    return HostView(self.examples, offset=self._offset, own=int(self.stats.examples), total=self.stats.total_examples)

  def example_ids_of(self, doc_id) -> list[int]:
    """The example ids of a document's windows (empty when it is not in this corpus)."""
    return list(self._doc_examples.get(doc_id, []))

  def example_ids_of_each(self, doc_ids: Sequence, *, gather: Callable[[Any], list] | None = None) -> list[list[int]]:
    """`example_ids_of` each of `doc_ids`, over the whole corpus (gold documents of queries).

    With a host slice this is collective: every host passes the same `doc_ids`,
    names the windows of the documents in its own rows, and `gather` (default:
    `mesh.allgather_object`, every host's object in process order) collects them.
    A document's rows lie in one host's slice, so its ids keep their order.
    """
    if self._hosts[1] == 1:
      return [self.example_ids_of(d) for d in doc_ids]
    lo, hi = self._offset, self._offset + int(self.stats.examples)  # not the examples read past them (align_rows)
    mine = [
      [j, ids] for j, d in enumerate(doc_ids) if (ids := [i for i in self._doc_examples.get(d, []) if lo <= i < hi])
    ]
    if gather is None:
      from trackstar_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

      gather = mesh_lib.allgather_object
    out = [[] for _ in doc_ids]
    for host in gather(mine):
      for j, ids in host:
        out[int(j)].extend(int(i) for i in ids)
    return out


class HostView:
  """One host's examples seen as the rows of the whole corpus, for encoding into a store host by host.

  `len()` is the whole corpus's example count and `.batch(rows)` serves the
  global rows this host read; `local_rows` = [lo, hi) are its own examples:
  `encoding.encode_to_store` then encodes just the chunks that start in them
  (reading past hi into the rows `load_corpus(align_rows=chunk_rows)` added),
  so every chunk is encoded by one host and every host reads only its slice.
  """

  def __init__(self, examples: Examples, *, offset: int, own: int, total: int):
    self._examples, self._offset = examples, int(offset)
    self.local_rows = (int(offset), int(offset) + int(own))
    self._total = int(total)
    self.ids = np.full((self._total,), -1, np.int64)  # known for the rows this host read
    self.ids[self._offset : self._offset + len(examples)] = examples.ids

  def __len__(self) -> int:
    return self._total

  def batch(self, rows) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, np.int64) - self._offset
    if rows.size and (rows.min() < 0 or rows.max() >= len(self._examples)):
      have = (self._offset, self._offset + len(self._examples))
      raise IndexError(
        f"Rows {int(rows.min()) + self._offset}..{int(rows.max()) + self._offset} are not in this host's slice "
        f"[{have[0]}, {have[1]}): load the corpus with align_rows= the store's chunk_rows."
      )
    return self._examples.batch(rows)

  def select(self, rows) -> HostView:
    """The sorted global `rows` (a sample of the whole corpus, the same on every host) as a HostView.

    Its rows are positions in `rows`; this host owns the ones that fall in its
    `local_rows`, so each sampled example is encoded by exactly one host (the
    fit_hessian job's R_train sample).
    """
    rows = np.asarray(rows, np.int64)
    if rows.size > 1 and np.any(np.diff(rows) <= 0):
      raise ValueError("HostView.select takes sorted, distinct rows (the same sample on every host).")
    lo, hi = self.local_rows
    first, last = np.searchsorted(rows, lo), np.searchsorted(rows, hi)
    mine = self._examples.select(rows[first:last] - self._offset)
    return HostView(mine, offset=int(first), own=int(last - first), total=len(rows))


def _chunk_tail(offset: int, n: int, total: int, chunk_rows: int) -> int:
  """Examples past [offset, offset + n) a host needs: to the end of the last chunk that starts in that range."""
  if n == 0:
    return 0
  start = (offset + n - 1) // chunk_rows * chunk_rows  # the chunk holding this host's last example
  if start < offset:
    return 0  # it starts on an earlier host, which encodes it (and every row of this host)
  return max(0, min(start + chunk_rows, total) - (offset + n))


def _doc_id(source, row: int, rec: dict, id_field: str | None):
  if id_field is None:
    return row
  if id_field not in rec:
    raise ValueError(f"{source.name}, row {row}: no id field {id_field!r} (fields: {sorted(rec)}).")
  v = rec[id_field]
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return int(v)
  if isinstance(v, str) and v:
    return v
  raise ValueError(f"{source.name}, row {row}: id field {id_field!r} must be an int or a non-empty string, got {v!r}.")


def _tokens(source, row: int, rec: dict, *, text_field: str, ids_field: str | None, tokenizer):
  """(tokens, character spans or None, text or None) of one record; tokens may be empty."""
  field = ids_field or text_field
  if field not in rec:
    raise ValueError(
      f"{source.name}, row {row}: no {'ids' if ids_field else 'text'} field {field!r} (fields: {sorted(rec)}); "
      f"set {'ids_field' if ids_field else 'text_field'}= to the field that holds the document."
    )
  v = rec[field]
  if ids_field:
    if v is None:
      return [], None, None
    ids = np.asarray(v)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
      raise ValueError(f"{source.name}, row {row}: ids field {field!r} must be a list of ints, got {v!r:.80}.")
    if ids.size and ids.min() < 0:
      raise ValueError(f"{source.name}, row {row}: ids field {field!r} has negative token ids.")
    if tokenizer is not None and ids.size and ids.max() >= tokenizer.vocab_size:
      raise ValueError(
        f"{source.name}, row {row}: token id {int(ids.max())} is not below the tokenizer's vocab_size "
        f"{tokenizer.vocab_size}."
      )
    return ids.astype(np.int64).tolist(), None, None
  if v is None:
    return [], None, None
  if not isinstance(v, str):
    raise ValueError(f"{source.name}, row {row}: text field {field!r} must be a string, got {type(v).__name__}.")
  if not v.strip():
    return [], None, v
  ids, spans = tokenizer.encode_with_offsets(v)
  return ids, spans, v


def _exchange_counts(count: int, *, process_index: int, process_count: int, gather_counts) -> list[int]:
  if process_count == 1:
    return [count]
  if gather_counts is None:
    import jax  # pylint: disable=g-import-not-at-top

    if jax.process_count() != process_count or jax.process_index() != process_index:
      raise ValueError(
        f"process_index={process_index}, process_count={process_count} are not this JAX run's "
        f"({jax.process_index()}, {jax.process_count()}): pass gather_counts= (every host's example count, "
        "in process order) to number the examples."
      )
    from trackstar_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

    return [int(c) for c in mesh_lib.allgather(np.asarray([count], np.int64))]
  counts = [int(c) for c in gather_counts(count)]
  if len(counts) != process_count or counts[process_index] != count:
    raise ValueError(
      f"gather_counts returned {counts}: expected {process_count} counts with {count} at {process_index}."
    )
  return counts


def load_corpus(
  source: str | sources_lib.Source,
  *,
  tokenizer=None,
  seq_len: int,
  text_field: str = "text",
  ids_field: str | None = None,
  id_field: str | None = None,
  overflow: str = "window",
  stride: int | None = None,
  split: str | None = None,
  data_dir: str | None = None,
  process_index: int = 0,
  process_count: int = 1,
  gather_counts: Callable[[int], Sequence[int]] | None = None,
  align_rows: int | None = None,
) -> Corpus:
  """Reads, tokenizes and windows a corpus into examples (this host's slice; default: all of it).

  Args:
    source: a path (.jsonl, .parquet, .array_record), "tfds:NAME", or a `sources.Source`.
    tokenizer: a `tokenizers.TextTokenizer` (needed for text; optional for
      pre-tokenized ids, where it gives BOS/EOS, the id range check and `text_of`).
    seq_len: T, the examples' padded length (a window holds up to T + 1 tokens).
    text_field: the record field with the document's text.
    ids_field: the field with pre-tokenized ids instead (then `text_field` is unused).
    id_field: the field with the document id (default: the row number).
    overflow: documents longer than T + 1 tokens: "window", "truncate" or "error".
    stride: tokens between window starts (default T; smaller: overlapping context).
    split, data_dir: for "tfds:NAME" sources.
    process_index, process_count: read only this host's contiguous slice of rows.
    gather_counts: `count -> every host's count` (process order); default: an
      allgather over the JAX processes (needed only when process_count > 1).
    align_rows: with host slices, the store's chunk size: the host also reads
      the first examples of the next hosts' rows, up to the end of the last
      chunk that starts in its own examples (`Corpus.host_view`).

  Returns:
    A `Corpus`: `.examples`, `.sources`, `.stats`, `.text_of`, `.id_of`.

  Example:
    >>> corpus = load_corpus("docs.jsonl", tokenizer=tok, seq_len=8, id_field="name")
    >>> corpus.examples.inputs.shape, corpus.id_of(0), corpus.stats.empty
    ((5, 8), 'intro#0', 1)
  """
  if ids_field is None and tokenizer is None:
    raise ValueError("A text corpus needs tokenizer= (or give ids_field= for pre-tokenized documents).")
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be positive.")
  windows(0, seq_len=seq_len, stride=stride, overflow=overflow)  # validates overflow and stride
  src = (
    source
    if isinstance(source, sources_lib.Source)
    else sources_lib.open_source(source, split=split, data_dir=data_dir)
  )
  lo, hi = sources_lib.host_rows(len(src), process_index=process_index, process_count=process_count)
  stats = CorpusStats(source=src.name, row_range=(lo, hi))
  bos = [tokenizer.bos_id] if tokenizer is not None and tokenizer.add_bos else []
  eos = [tokenizer.eos_id] if tokenizer is not None and tokenizer.add_eos else []
  fields = [f for f in (ids_field or text_field, id_field) if f]
  seqs, ranges, example_sources, texts, tokens, seen = [], [], [], {}, {}, {}

  def read(lo: int, hi: int, *, stats: CorpusStats, limit: int | None = None) -> None:
    """Rows [lo, hi) into examples; with `limit`, stops once that many examples were added."""
    start = len(seqs)
    for row, rec in src.rows(lo, hi, fields=fields):
      if limit is not None and len(seqs) - start >= limit:
        return
      doc_id = _doc_id(src, row, rec, id_field)
      toks, spans, text = _tokens(src, row, rec, text_field=text_field, ids_field=ids_field, tokenizer=tokenizer)
      s = bos + toks + eos
      if not toks or len(s) < 2:
        stats.empty += 1
        if len(stats.empty_rows) < 10:
          stats.empty_rows.append(row)
        continue
      if doc_id in seen:
        raise ValueError(f"{src.name}, row {row}: document id {doc_id!r} already used by row {seen[doc_id]}.")
      seen[doc_id] = row
      try:
        wins = windows(len(s), seq_len=seq_len, stride=stride, overflow=overflow)
      except ValueError as e:
        raise ValueError(
          f"{src.name}, row {row} (document {doc_id!r}): {e}; use overflow='window' or 'truncate'."
        ) from e
      stats.documents += 1
      stats.tokens += len(s)
      stats.windowed += len(wins) > 1
      if wins[-1][1] < len(s):
        stats.truncated += 1
        stats.dropped_tokens += len(s) - wins[-1][1]
      if text is None:
        tokens[doc_id] = toks
      else:
        texts[doc_id] = text
      for w, (a, b, loss_lo, loss_hi) in enumerate(wins):
        t0, t1 = max(a - len(bos), 0), min(b - len(bos), len(toks))  # the document's tokens in the window
        c0 = c1 = None
        if spans is not None:
          c0, c1 = spans[t0][0], max(e for _, e in spans[t0:t1])
        seqs.append(s[a:b])
        ranges.append((loss_lo, loss_hi))
        example_sources.append(ExampleSource(doc_id, w, t0, t1, c0, c1))

  read(lo, hi, stats=stats)
  stats.examples = len(seqs)
  counts = _exchange_counts(
    len(seqs), process_index=process_index, process_count=process_count, gather_counts=gather_counts
  )
  stats.example_offset = int(sum(counts[:process_index]))
  stats.total_examples = int(sum(counts))
  if align_rows:  # read on past this host's rows to the end of the last chunk that starts in them
    extra = _chunk_tail(stats.example_offset, stats.examples, stats.total_examples, int(align_rows))
    if extra:
      read(hi, len(src), stats=CorpusStats(), limit=extra)
      del seqs[stats.examples + extra :], ranges[stats.examples + extra :]
      del example_sources[stats.examples + extra :]
      stats.extra_examples = len(seqs) - stats.examples
  examples = pack(seqs, ranges, np.arange(len(seqs)) + stats.example_offset, seq_len=seq_len)
  logging.info("load_corpus: %s", stats.summary())
  if stats.empty:
    logging.warning(
      "load_corpus: skipped %d empty documents of %s (first rows %s).", stats.empty, src.name, stats.empty_rows
    )
  return Corpus(examples, example_sources, texts, tokens, tokenizer, stats, hosts=(process_index, process_count))
