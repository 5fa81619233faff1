"""Where a query's target and subject occur in a passage: highlight spans for the report page.

Spans are `(start, end, kind)` with `kind` one of `KINDS` ("target", "subject"),
in UTF-16 code units: the page's JavaScript slices strings by UTF-16 index, so a
passage with characters outside the Basic Multilingual Plane (emoji, rare CJK)
is still highlighted at the right place.

The subject of a query is rarely a field of a results file. `infer_subjects`
recovers it from the prompts of one relation: they share the relation's template
("[X] died in", "The capital of [X] is"), so the words common to the start and
to the end of every prompt are the template and what remains is the subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import re

KINDS = ("target", "subject")
_WORD = re.compile(r"\S+")
_EDGE_PUNCTUATION = " ,;:.!?\"'()[]"


def utf16_index(text: str, index: int) -> int:
  """The UTF-16 code unit offset of code point `index` of `text`."""
  head = text[:index]
  return index + sum(1 for c in head if ord(c) > 0xFFFF)


def _pattern(needle: str) -> re.Pattern | None:
  needle = needle.strip()
  if not needle:
    return None
  return re.compile(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", re.IGNORECASE)


def find_spans(text: str, needle: str, *, kind: str) -> list[tuple[int, int, str]]:
  """Case-insensitive, whole-word occurrences of `needle` in `text` (code point offsets).

  Whole-word: the match is neither preceded nor followed by a letter or digit, so
  the target " Paris" marks "Paris," and "(Paris)" but not "Parisian".

  Args:
    text: the passage.
    needle: what to find; leading/trailing whitespace is ignored; "" finds nothing.
    kind: the span's label (one of `KINDS`).

  Returns:
    [(start, end, kind)] in code points, in order.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {KINDS}.")
  pattern = _pattern(needle)
  return [(m.start(), m.end(), kind) for m in pattern.finditer(text)] if pattern else []


class Highlighter:
  """`highlight_spans` for one query, its patterns compiled once for all of its passages."""

  def __init__(self, *, target: str, subject: str | None = None):
    # (kind, stripped needle, its lower case for a quick substring test); patterns compiled on first use
    self._needles = [
      (kind, n.strip(), n.strip().lower()) for kind, n in (("target", target), ("subject", subject)) if n and n.strip()
    ]
    self._patterns: dict[str, re.Pattern] = {}

  def _find(self, kind: str, needle: str, text: str) -> list[tuple[int, int, str]]:
    pattern = self._patterns.get(kind)
    if pattern is None:
      pattern = self._patterns[kind] = _pattern(needle)
    return [(m.start(), m.end(), kind) for m in pattern.finditer(text)]

  def __call__(self, text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping target and subject spans of `text`, sorted, in UTF-16 offsets."""
    low = text.lower()
    spans = [
      s for kind, needle, low_needle in self._needles if low_needle in low for s in self._find(kind, needle, text)
    ]
    if not spans:
      return []
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0]), KINDS.index(s[2])))
    out: list[tuple[int, int, str]] = []
    for s in spans:
      if out and s[0] < out[-1][1]:
        if s[1] - s[0] > out[-1][1] - out[-1][0]:
          out[-1] = s
        continue
      out.append(s)
    if len(text.encode("utf-16-le")) != 2 * len(text):  # characters outside the BMP: shift the offsets
      out = [(utf16_index(text, a), utf16_index(text, b), k) for a, b, k in out]
    return out


def highlight_spans(text: str, *, target: str, subject: str | None = None) -> list[tuple[int, int, str]]:
  """Non-overlapping target and subject spans of `text`, sorted, in UTF-16 offsets.

  Where a target and a subject occurrence overlap (a subject "Paris Hilton" and a
  target "Paris"), the longer one wins; on a tie, the target.
  """
  return Highlighter(target=target, subject=subject)(text)


def _common_prefix(seqs: Sequence[Sequence[str]]) -> int:
  n = min(len(s) for s in seqs)
  for i in range(n):
    if any(s[i] != seqs[0][i] for s in seqs):
      return i
  return n


def infer_subjects(prompts_by_relation: Mapping[str, Iterable[str]]) -> dict[str, str]:
  """Each prompt's subject, from the template shared by the prompts of its relation.

  For each relation with at least two distinct prompts, the words shared by the
  start of every prompt and by its end are the template; the words between are
  the subject ("Allan Peiper died in", "Ada Lovelace died in" -> "Allan Peiper",
  "Ada Lovelace"). Every prompt keeps at least one word. A relation with one
  prompt, or whose prompts share no word at either end, gives no subjects.

  Args:
    prompts_by_relation: relation -> its queries' prompts.

  Returns:
    prompt -> subject, for the prompts whose subject could be inferred.
  """
  out = {}
  for prompts in prompts_by_relation.values():
    distinct = sorted(set(prompts))
    if len(distinct) < 2:
      continue
    words = [[m.group() for m in _WORD.finditer(p)] for p in distinct]
    if any(not w for w in words):
      continue
    shortest = min(len(w) for w in words)
    pre = min(_common_prefix(words), shortest - 1)
    suf = min(_common_prefix([w[::-1] for w in words]), shortest - 1 - pre)
    if pre + suf == 0:
      continue
    for p in distinct:
      spans = [m.span() for m in _WORD.finditer(p)]
      start, end = spans[pre][0], spans[len(spans) - 1 - suf][1]
      subject = p[start:end].strip(_EDGE_PUNCTUATION)
      if subject:
        out[p] = subject
  return out
