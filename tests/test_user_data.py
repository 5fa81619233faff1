"""A user's corpus, tokenizer and queries -> examples: every reader, windows and ids, host slices, bad inputs, the API."""

import io
import json
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trackstar_jax as tsj
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import queries as queries_lib
from trackstar_jax.data import sources as sources_lib
from trackstar_jax.data import tokenizers as tok_lib
from trackstar_jax.models import DecoderLM, TransformerConfig

WORDS = [
  "the",
  "cat",
  "dog",
  "sat",
  "ran",
  "on",
  "under",
  "a",
  "mat",
  "rug",
  "red",
  "blue",
  "big",
  "small",
  "bird",
  "fish",
  "saw",
  "ate",
]


def _docs():
  """Documents of varied length (one long, one empty, one whitespace-only, one with non-ASCII text)."""
  rng = np.random.default_rng(0)
  docs = []
  for i in range(9):
    n = 40 if i == 3 else int(rng.integers(2, 7))
    docs.append({"name": f"doc{i}", "text": " ".join(rng.choice(WORDS, n)), "source": f"s{i % 2}"})
  docs[5]["text"] = ""
  docs[7]["text"] = "   "
  docs[8]["text"] = "the café cat sat"
  return docs


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
  import sentencepiece as spm

  texts = [d["text"] for d in _docs() if d["text"].strip()] + [" ".join(WORDS)] * 4
  w = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts), model_writer=w, vocab_size=48, model_type="bpe", pad_id=0, unk_id=1, bos_id=2,
    eos_id=3, num_threads=1, minloglevel=2, character_coverage=1.0, normalization_rule_name="identity",
  )  # fmt: skip
  path = tmp_path_factory.mktemp("tok") / "spm.model"
  path.write_bytes(w.getvalue())
  return str(path)


def _hf_json(path, *, specials=("<s>", "</s>")):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", *specials, *WORDS, "café"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  tok.add_special_tokens(list(specials))
  tok.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
  return _hf_json(tmp_path_factory.mktemp("hf") / "tokenizer.json")


def _build_tfds(data_dir, docs):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TrackstarTestUserCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      feats = tfds.features.FeaturesDict({k: tfds.features.Text() for k in ("name", "text", "source")})
      return tfds.core.DatasetInfo(builder=self, features=feats, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate(docs)

  TrackstarTestUserCorpus(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return "tfds:trackstar_test_user_corpus"


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
  """The same documents as JSONL, Parquet, array_record and a TFDS dataset."""
  from array_record.python import array_record_module

  d = tmp_path_factory.mktemp("corpus")
  docs = _docs()
  files = {"jsonl": _write_jsonl(d / "docs.jsonl", docs)}
  try:  # optional: pip install pyarrow (the `parquet` extra)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(docs), str(d / "docs.parquet"), row_group_size=3)  # several row groups
    files["parquet"] = str(d / "docs.parquet")
  except ImportError:
    pass
  writer = array_record_module.ArrayRecordWriter(str(d / "docs.array_record"), "group_size:1")
  for r in docs:
    writer.write(json.dumps(r).encode())
  writer.close()
  files["array_record"] = str(d / "docs.array_record")
  files["tfds"] = _build_tfds(d / "tfds", docs)
  return dict(files=files, docs=docs, tfds_dir=str(d / "tfds"))


def _load(path, tok, *, seq_len=8, **kw):
  data_dir = kw.pop("data_dir", None)
  return corpus_lib.load_corpus(
    path, tokenizer=tok, seq_len=seq_len, id_field="name", split="train" if path.startswith("tfds:") else None,
    data_dir=data_dir, **kw,
  )  # fmt: skip


def _same(a, b):
  for k in ("inputs", "targets", "loss_mask", "pad_mask", "ids"):
    np.testing.assert_array_equal(getattr(a.examples, k), getattr(b.examples, k), err_msg=k)
  assert a.sources == b.sources
  assert [a.text_of(i) for i in a.ids] == [b.text_of(i) for i in b.ids]


# ----------------------------------------------------------------------------
# Readers.


def test_every_format_gives_the_same_examples(corpus_files, spm_tok):
  tok = tok_lib.load_tokenizer(spm_tok)
  files = corpus_files["files"]
  ref = _load(files["jsonl"], tok)
  if "parquet" not in files:
    pytest.skip("pyarrow is not installed (the `parquet` extra)")
  for fmt in ("parquet", "array_record", "tfds"):
    _same(ref, _load(files[fmt], tok, data_dir=corpus_files["tfds_dir"]))
  # Two empty documents (rows 5 and 7) are skipped and reported; the long one is windowed.
  assert (ref.stats.empty, ref.stats.empty_rows, ref.stats.documents) == (2, [5, 7], 7)
  n_windows = {
    d["name"]: len(corpus_lib.windows(len(tok.encode(d["text"])) + 2, seq_len=8)) for d in corpus_files["docs"]
  }
  assert n_windows["doc3"] > 1 and ref.stats.truncated == 0
  assert [s.doc_id for s in ref.sources] == [
    n for n, w in n_windows.items() for _ in range(w) if n not in ("doc5", "doc7")
  ]
  assert [s.window for s in ref.sources if s.doc_id == "doc3"] == list(range(n_windows["doc3"]))
  assert {s.doc_id for s in ref.sources} == {d["name"] for i, d in enumerate(corpus_files["docs"]) if i not in (5, 7)}
  np.testing.assert_array_equal(ref.ids, np.arange(len(ref)))
  # Character (not byte) spans of non-ASCII text: "é" is two bytes, and the windows end at the last character.
  cafe = [i for i in ref.ids if ref.source_of(i).doc_id == "doc8"]
  assert ref.source_of(cafe[0]).char_start == 0 and ref.source_of(cafe[-1]).char_end == len("the café cat sat")
  assert "".join(ref.text_of(i) for i in cafe).startswith("the café c")
  assert ref.text_of(cafe[-1]) and "the café cat sat".endswith(ref.text_of(cafe[-1]))


def test_default_ids_are_row_numbers_and_string_ids_are_kept(corpus_files, spm_tok):
  tok = tok_lib.load_tokenizer(spm_tok)
  by_row = corpus_lib.load_corpus(corpus_files["files"]["jsonl"], tokenizer=tok, seq_len=8)
  by_name = _load(corpus_files["files"]["jsonl"], tok)
  assert [s.doc_id for s in by_row.sources] == [int(n.removeprefix("doc")) for n in (s.doc_id for s in by_name.sources)]
  assert by_name.id_of(0) == "doc0#0" and by_row.id_of(0) == "0#0"
  np.testing.assert_array_equal(by_row.examples.inputs, by_name.examples.inputs)


def test_pre_tokenized_ids(tmp_path, spm_tok):
  tok = tok_lib.load_tokenizer(spm_tok)
  texts = ["the cat sat", "a big red bird saw the fish", ""]
  rows = [{"ids": tok.encode(t), "k": f"d{i}"} for i, t in enumerate(texts)]
  c = corpus_lib.load_corpus(
    _write_jsonl(tmp_path / "ids.jsonl", rows), tokenizer=tok, seq_len=8, ids_field="ids", id_field="k"
  )
  from_text = corpus_lib.load_corpus(
    _write_jsonl(tmp_path / "t.jsonl", [{"text": t, "k": f"d{i}"} for i, t in enumerate(texts)]),
    tokenizer=tok,
    seq_len=8,
    id_field="k",
  )
  np.testing.assert_array_equal(c.examples.inputs, from_text.examples.inputs)
  np.testing.assert_array_equal(c.examples.loss_mask, from_text.examples.loss_mask)
  assert c.stats.empty == 1
  assert c.text_of(0) == "the cat sat"  # decoded by the tokenizer
  no_tok = corpus_lib.load_corpus(str(tmp_path / "ids.jsonl"), seq_len=8, ids_field="ids")  # no BOS/EOS without one
  assert no_tok.examples.pad_mask[0].sum() == len(tok.encode("the cat sat")) - 1
  assert no_tok.text_of(0) == " ".join(str(i) for i in tok.encode("the cat sat"))


# ----------------------------------------------------------------------------
# Windows.


def test_windows_cover_every_target_once():
  assert corpus_lib.windows(10, seq_len=4) == [(0, 5, 0, 4), (4, 9, 0, 4), (8, 10, 0, 1)]
  assert corpus_lib.windows(10, seq_len=4, stride=2) == [(0, 5, 0, 4), (2, 7, 2, 4), (4, 9, 2, 4), (6, 10, 2, 3)]
  assert corpus_lib.windows(10, seq_len=4, overflow="truncate") == [(0, 5, 0, 4)]
  assert corpus_lib.windows(5, seq_len=4) == [(0, 5, 0, 4)] and corpus_lib.windows(1, seq_len=4) == []
  for n in range(2, 30):
    for stride in range(1, 6):
      scored = np.zeros(n, int)
      for a, b, lo, hi in corpus_lib.windows(n, seq_len=5, stride=stride):
        assert b - a <= 6 and 0 <= lo < hi <= b - a - 1
        scored[a + 1 + lo : a + 1 + hi] += 1
      np.testing.assert_array_equal(scored, [0] + [1] * (n - 1), err_msg=f"n={n} stride={stride}")
  with pytest.raises(ValueError, match="stride"):
    corpus_lib.windows(10, seq_len=4, stride=5)
  with pytest.raises(ValueError, match="exceed"):
    corpus_lib.windows(10, seq_len=4, overflow="error")


@pytest.mark.parametrize("stride", [None, 3])
def test_long_documents_are_windowed_with_ids_and_spans(tmp_path, hf_tok, stride):
  tok = tok_lib.load_tokenizer(hf_tok)
  long_text = " ".join(WORDS)  # 18 words + BOS + EOS = 20 tokens
  path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, {"text": long_text}, {"text": "a mat"}])
  c = corpus_lib.load_corpus(path, tokenizer=tok, seq_len=6, stride=stride)
  s = [tok.bos_id, *tok.encode(long_text), tok.eos_id]
  wins = corpus_lib.windows(len(s), seq_len=6, stride=stride)
  assert len(wins) == (4 if stride is None else 6)
  assert [c.id_of(i) for i in c.ids] == ["0#0"] + [f"1#{w}" for w in range(len(wins))] + ["2#0"]
  np.testing.assert_array_equal(c.ids, np.arange(len(wins) + 2))
  for w, (a, b, lo, hi) in enumerate(wins):
    i = 1 + w
    m = b - a - 1
    np.testing.assert_array_equal(c.examples.inputs[i, :m], s[a : b - 1])
    np.testing.assert_array_equal(c.examples.targets[i, :m], s[a + 1 : b])
    assert c.examples.pad_mask[i].sum() == m and not c.examples.pad_mask[i, m:].any()
    np.testing.assert_array_equal(np.nonzero(c.examples.loss_mask[i])[0], np.arange(lo, hi))
    # The text span is exactly the window's document tokens (BOS/EOS are not text).
    src = c.source_of(i)
    assert tok.encode(c.text_of(i)) == s[a:b][(1 if a == 0 else 0) :][: src.token_end - src.token_start]
    assert c.text_of(i) == long_text[src.char_start : src.char_end]
  assert c.source_of(1).char_start == 0 and c.source_of(len(wins)).char_end == len(long_text)
  # Every target of the document counts once: the loss tokens of its windows are its tokens after BOS.
  assert c.examples.loss_mask[1 : 1 + len(wins)].sum() == len(s) - 1
  with pytest.raises(KeyError, match="not in this corpus"):
    c.source_of(len(c))


def test_truncate_and_error_overflow(tmp_path, hf_tok):
  tok = tok_lib.load_tokenizer(hf_tok)
  path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}, {"text": " ".join(WORDS)}])
  c = corpus_lib.load_corpus(path, tokenizer=tok, seq_len=6, overflow="truncate")
  assert len(c) == 2 and (c.stats.truncated, c.stats.dropped_tokens) == (1, 20 - 7)
  assert c.text_of(1) == " ".join(WORDS[:6])
  with pytest.raises(ValueError, match=r"d\.jsonl, row 1 \(document 1\).*exceed"):
    corpus_lib.load_corpus(path, tokenizer=tok, seq_len=6, overflow="error")


# ----------------------------------------------------------------------------
# Hosts.


def _threaded_hosts(path, tok, process_count, **kw):
  """Every host's corpus, the hosts run as threads exchanging their example counts."""
  counts, barrier, out = [None] * process_count, threading.Barrier(process_count, timeout=60), [None] * process_count

  def gather(pi, n):
    counts[pi] = n
    barrier.wait()
    return list(counts)

  def host(pi):
    out[pi] = corpus_lib.load_corpus(
      path, tokenizer=tok, process_index=pi, process_count=process_count, gather_counts=lambda n: gather(pi, n), **kw
    )

  threads = [threading.Thread(target=host, args=(pi,)) for pi in range(process_count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert all(o is not None for o in out), "a host failed"
  return out


@pytest.mark.parametrize("process_count", [2, 3])
def test_host_slices_union_is_the_single_process_corpus(corpus_files, spm_tok, process_count):
  tok = tok_lib.load_tokenizer(spm_tok)
  path = corpus_files["files"].get("parquet", corpus_files["files"]["jsonl"])
  one = corpus_lib.load_corpus(path, tokenizer=tok, seq_len=8, id_field="name")
  hosts = _threaded_hosts(path, tok, process_count, seq_len=8, id_field="name")
  assert all(0 < len(h) < len(one) for h in hosts)  # each host read a real slice
  assert [h.stats.row_range for h in hosts][0][0] == 0 and hosts[-1].stats.row_range[1] == len(corpus_files["docs"])
  for k in ("inputs", "targets", "loss_mask", "pad_mask", "ids"):
    np.testing.assert_array_equal(np.concatenate([getattr(h.examples, k) for h in hosts]), getattr(one.examples, k))
  assert [s for h in hosts for s in h.sources] == one.sources
  assert [h.id_of(i) for h in hosts for i in h.ids] == [one.id_of(i) for i in one.ids]
  assert [h.text_of(i) for h in hosts for i in h.ids] == [one.text_of(i) for i in one.ids]


def test_a_sample_of_host_views_is_the_sample_of_the_corpus(corpus_files, spm_tok):
  """HostView.select (fit_hessian's R_train sample): every sampled row is owned by exactly one host."""
  tok = tok_lib.load_tokenizer(spm_tok)
  path = corpus_files["files"]["jsonl"]
  one = corpus_lib.load_corpus(path, tokenizer=tok, seq_len=8, id_field="name")
  rows = np.sort(np.random.default_rng(0).choice(len(one.examples), len(one.examples) // 2, replace=False))
  views = [h.host_view().select(rows) for h in _threaded_hosts(path, tok, 3, seq_len=8, id_field="name")]
  assert all(len(v) == len(rows) for v in views)
  assert [v.local_rows for v in views][0][0] == 0 and views[-1].local_rows[1] == len(rows)
  assert all(a.local_rows[1] == b.local_rows[0] for a, b in zip(views, views[1:]))  # contiguous, disjoint
  got = [v.batch(np.arange(*v.local_rows)) for v in views]
  want = one.examples.select(rows).batch(np.arange(len(rows)))
  for k in want:
    np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
  with pytest.raises(ValueError, match="sorted"):
    views[0].select(rows[::-1])


def _on_threads(fn, n, monkeypatch):
  """[fn(0), ..., fn(n - 1)] run as n hosts on threads, `mesh.allgather_object` exchanging between them.

  An exception is returned as the host's result.
  """
  from trackstar_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  barrier, slots, index, out = threading.Barrier(n, timeout=60), [None] * n, {}, [None] * n

  def gather(obj):
    pi = index[threading.get_ident()]
    barrier.wait()  # every host read the previous exchange
    slots[pi] = json.dumps(obj)
    barrier.wait()
    return [json.loads(x) for x in slots]

  def host(pi):
    index[threading.get_ident()] = pi
    try:
      out[pi] = fn(pi)
    except Exception as e:  # pylint: disable=broad-exception-caught
      out[pi] = e

  monkeypatch.setattr(mesh_lib, "allgather_object", gather)
  threads = [threading.Thread(target=host, args=(pi,)) for pi in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  return out


def test_gold_documents_resolve_across_host_slices(corpus_files, spm_tok, tmp_path, monkeypatch):
  """Each host knows only its documents' windows; together they resolve every query's gold as one process does."""
  tok = tok_lib.load_tokenizer(spm_tok)
  path = corpus_files["files"]["jsonl"]
  one = corpus_lib.load_corpus(path, tokenizer=tok, seq_len=8, id_field="name")
  # align_rows: host 0 also reads the first windows of doc3 (host 1's), which must not count twice.
  hosts = _threaded_hosts(path, tok, 3, seq_len=8, id_field="name", align_rows=4)
  assert hosts[0].stats.extra_examples and hosts[0].example_ids_of("doc3")
  queries = [
    {"id": "a", "prompt": "the cat", "target": " sat", "gold": ["doc3", "doc0"]},
    {"id": "b", "prompt": "a red", "target": " bird", "gold": "doc8"},
    {"id": "c", "prompt": "the dog", "target": " ran"},
    {"id": "d", "prompt": "the dog", "target": " sat", "gold": ["doc3"]},
  ]
  qpath = _write_jsonl(tmp_path / "q.jsonl", queries)
  load = lambda c, p=qpath: queries_lib.load_queries(p, tokenizer=tok, seq_len=8, gold_field="gold", corpus=c)
  want = load(one).records
  assert want[0]["gold_sentence_ids"] == one.example_ids_of("doc3") + one.example_ids_of("doc0")
  assert len(one.example_ids_of("doc3")) > 2 and "gold_sentence_ids" in want[2] and not want[2]["gold_sentence_ids"]
  got = _on_threads(lambda pi: load(hosts[pi]).records, 3, monkeypatch)
  assert got == [want] * 3
  bad = _write_jsonl(tmp_path / "bad.jsonl", [*queries, {"prompt": "a", "target": " b", "gold": ["doc5"]}])  # empty
  errors = _on_threads(lambda pi: load(hosts[pi], bad), 3, monkeypatch)
  with pytest.raises(ValueError) as one_error:
    load(one, bad)
  assert "bad.jsonl, row 4: gold document 'doc5' is not in the corpus" in str(one_error.value)
  assert [str(e) for e in errors] == [str(one_error.value)] * 3


def test_host_rows_and_count_exchange_errors(corpus_files, spm_tok):
  assert [sources_lib.host_rows(7, process_index=i, process_count=3) for i in range(3)] == [(0, 2), (2, 4), (4, 7)]
  with pytest.raises(ValueError, match="process_index"):
    sources_lib.host_rows(7, process_index=2, process_count=2)
  tok = tok_lib.load_tokenizer(spm_tok)
  with pytest.raises(ValueError, match="gather_counts"):  # 2 hosts asked for, but this JAX run has one process
    corpus_lib.load_corpus(corpus_files["files"]["jsonl"], tokenizer=tok, seq_len=8, process_index=0, process_count=2)


# ----------------------------------------------------------------------------
# Tokenizers.


def test_sentencepiece_tokenizer(spm_tok):
  tok = tok_lib.load_tokenizer(spm_tok)
  assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == ("sentencepiece", 2, 3, True, True)
  assert tok.vocab_size == 48
  text = "the big cat ate a fish"
  ids, spans = tok.encode_with_offsets(text)
  assert ids == tok.encode(text) and tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
  assert "".join(text[a:b] for a, b in spans).replace(" ", "") == text.replace(" ", "")
  no_eos = tok_lib.load_tokenizer(spm_tok, add_eos=False)
  assert (no_eos.add_bos, no_eos.add_eos) == (True, False)
  with pytest.raises(ValueError, match="Hugging Face"):
    tok_lib.load_tokenizer(spm_tok, bos_token="<s>")


def test_huggingface_tokenizer(hf_tok, tmp_path):
  tok = tok_lib.load_tokenizer(hf_tok)
  assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == ("huggingface", 2, 3, True, True)
  assert tok.vocab_size == 4 + len(WORDS) + 1
  ids, spans = tok.encode_with_offsets("the cat  sat")
  assert ids == [4 + WORDS.index(w) for w in ("the", "cat", "sat")] and spans == [(0, 3), (4, 7), (9, 12)]
  assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "the cat sat"
  # A tokenizer without the usual special tokens: no BOS/EOS by default, an error when asked for one.
  plain = _hf_json(tmp_path / "plain.json", specials=("<start>",))
  t = tok_lib.load_tokenizer(plain)
  assert (t.bos_id, t.eos_id, t.add_bos, t.add_eos) == (None, None, False, False)
  assert tok_lib.load_tokenizer(plain, bos_token="<start>").bos_id == 2
  with pytest.raises(ValueError, match="add_eos=True but this huggingface tokenizer has no EOS"):
    tok_lib.load_tokenizer(plain, add_eos=True)
  with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
    tok_lib.load_tokenizer(plain, eos_token="<end>")


def test_check_vocab(spm_tok, hf_tok):
  for path in (spm_tok, hf_tok):
    tok = tok_lib.load_tokenizer(path)
    tok_lib.check_vocab(tok, tok.vocab_size)
    with pytest.raises(
      ValueError, match=f"{tok.vocab_size} tokens but the model's vocabulary has {tok.vocab_size - 1}"
    ):
      tok_lib.check_vocab(tok, tok.vocab_size - 1)


def test_optional_dependencies_missing(monkeypatch, hf_tok, tmp_path):
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match="pip install tokenizers"):
    tok_lib.load_tokenizer(hf_tok)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ImportError, match="pip install pyarrow"):
    sources_lib.open_source(str(tmp_path / "docs.parquet"))


# ----------------------------------------------------------------------------
# Bad inputs.


def test_bad_corpus_inputs(tmp_path, spm_tok, corpus_files):
  tok = tok_lib.load_tokenizer(spm_tok)

  def load(rows, **kw):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    return corpus_lib.load_corpus(path, tokenizer=tok, seq_len=8, **kw)

  with pytest.raises(ValueError, match=r"bad\.jsonl, row 1: no text field 'text' \(fields: \['body'\]\)"):
    load([{"text": "the cat"}, {"body": "the dog"}])
  with pytest.raises(ValueError, match=r"bad\.jsonl, row 0: no text field 'body'"):
    load([{"text": "the cat"}], text_field="body")
  with pytest.raises(ValueError, match=r"row 1: text field 'text' must be a string"):
    load([{"text": "the cat"}, {"text": 7}])
  with pytest.raises(ValueError, match=r"row 1: no id field 'name'"):
    load([{"text": "a", "name": "x"}, {"text": "b"}], id_field="name")
  with pytest.raises(ValueError, match=r"row 1: document id 'x' already used by row 0"):
    load([{"text": "a cat", "name": "x"}, {"text": "a dog", "name": "x"}], id_field="name")
  with pytest.raises(ValueError, match=r"row 0: id field 'name' must be an int or a non-empty string"):
    load([{"text": "a cat", "name": 1.5}], id_field="name")
  with pytest.raises(ValueError, match=r"row 1: token id 999 is not below the tokenizer's vocab_size 48"):
    load([{"ids": [5, 6]}, {"ids": [5, 999]}], ids_field="ids")
  with pytest.raises(ValueError, match=r"row 0: ids field 'ids' must be a list of ints"):
    load([{"ids": ["a", "b"]}], ids_field="ids")
  with pytest.raises(ValueError, match="needs tokenizer="):
    corpus_lib.load_corpus(corpus_files["files"]["jsonl"], seq_len=8)
  (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
  with pytest.raises(ValueError, match=r"broken\.jsonl, row 1: not valid JSON"):
    corpus_lib.load_corpus(str(tmp_path / "broken.jsonl"), tokenizer=tok, seq_len=8)
  with pytest.raises(ValueError, match=r"row 0: not a UTF-8 JSON record.*tfds:"):
    from array_record.python import array_record_module

    w = array_record_module.ArrayRecordWriter(str(tmp_path / "raw.array_record"), "group_size:1")
    w.write(b"\x08\x96\x01")
    w.close()
    corpus_lib.load_corpus(str(tmp_path / "raw.array_record"), tokenizer=tok, seq_len=8)
  with pytest.raises(ValueError, match="Cannot tell the format"):
    sources_lib.open_source(str(tmp_path / "bad.csv"))
  with pytest.raises(FileNotFoundError, match="No JSONL file"):
    sources_lib.open_source(str(tmp_path / "missing.jsonl"))
  with pytest.raises(ValueError, match="Cannot open TFDS dataset 'no_such_dataset'"):
    sources_lib.open_source("tfds:no_such_dataset", data_dir=str(tmp_path))


def test_bad_query_inputs(tmp_path, spm_tok):
  tok = tok_lib.load_tokenizer(spm_tok)

  def load(rows, **kw):
    return queries_lib.load_queries(_write_jsonl(tmp_path / "q.jsonl", rows), tokenizer=tok, seq_len=24, **kw)

  ok = {"prompt": "the cat sat on the", "target": " mat"}
  with pytest.raises(ValueError, match=r"q\.jsonl, row 1: the target is empty"):
    load([ok, {"prompt": "the dog", "target": ""}])
  with pytest.raises(ValueError, match=r"q\.jsonl, row 0: the target is empty"):
    load([{"prompt": "the dog", "target": "  "}])
  with pytest.raises(ValueError, match=r"row 1: no prompt field 'question'"):
    load([{"question": "a", "target": " b"}, {"prompt": "a", "target": " b"}], prompt_field="question")
  with pytest.raises(ValueError, match=r"row 0: no target field 'target'"):
    load([{"prompt": "the cat"}])
  with pytest.raises(ValueError, match=r"row 1: query id 'a' already used by row 0"):
    load([{**ok, "id": "a"}, {**ok, "id": "a"}])
  long = {"prompt": " ".join(WORDS), "target": " mat"}
  with pytest.raises(ValueError, match=r"row 0: query 0 has \d+ tokens, more than seq_len \+ 1 = 25"):
    load([long])
  q = load([long], overflow="truncate_prompt")  # the prompt is cut from the left; BOS and the target stay
  t = tok.encode(" mat")
  assert q.examples.pad_mask[0].all() and q.examples.inputs[0, 0] == tok.bos_id
  np.testing.assert_array_equal(q.examples.targets[0][q.examples.loss_mask[0] > 0], t)
  with pytest.raises(ValueError, match="pass corpus="):
    load([ok], gold_field="gold")


# ----------------------------------------------------------------------------
# Queries and the public API end to end.


def test_queries_loss_on_target_only_and_metadata(tmp_path, hf_tok):
  tok = tok_lib.load_tokenizer(hf_tok)
  rows = [
    {"id": "q-a", "prompt": "the cat sat on the", "target": " mat", "relation": "on", "extra": [1, 2]},
    {"prompt": "a red", "target": " bird", "relation": "colour"},
  ]
  q = queries_lib.load_queries(_write_jsonl(tmp_path / "q.jsonl", rows), tokenizer=tok, seq_len=8)
  assert q.records == [
    {"query_id": "q-a", "prompt": "the cat sat on the", "target": " mat", "relation": "on", "extra": [1, 2]},
    {"query_id": 1, "prompt": "a red", "target": " bird", "relation": "colour"},
  ]
  np.testing.assert_array_equal(q.examples.ids, [0, 1])
  for i, r in enumerate(rows):
    p, t = tok.encode(r["prompt"]), tok.encode(r["target"])
    s = [tok.bos_id, *p, *t]  # no EOS on queries
    np.testing.assert_array_equal(q.examples.inputs[i, : len(s) - 1], s[:-1])
    np.testing.assert_array_equal(np.nonzero(q.examples.loss_mask[i])[0], np.arange(len(p), len(p) + len(t)))
    np.testing.assert_array_equal(q.examples.targets[i][q.examples.loss_mask[i] > 0], t)
    assert (q.examples.prompt_len[i], q.examples.target_len[i]) == (1 + len(p), len(t))


def test_end_to_end_through_the_public_api(tmp_path, hf_tok):
  tok = tok_lib.load_tokenizer(hf_tok)
  seq_len = 8
  docs = [
    {"url": "https://x.org/cats", "body": "the cat sat on the mat " * 3},  # 3 windows
    {"url": "https://x.org/dogs", "body": "the dog ran under a rug"},
    {"url": "https://x.org/empty", "body": ""},
    {"url": "https://x.org/birds", "body": "a red bird saw a blue fish"},
  ]
  corpus = corpus_lib.load_corpus(
    _write_jsonl(tmp_path / "docs.jsonl", docs), tokenizer=tok, seq_len=seq_len, text_field="body", id_field="url"
  )
  queries = [
    {"id": "cat", "prompt": "the cat sat on the", "target": " mat", "relation": "on", "gold": ["https://x.org/cats"]},
    {"id": "bird", "prompt": "a red", "target": " bird", "relation": "colour", "gold": "https://x.org/birds"},
  ]
  q = queries_lib.load_queries(
    _write_jsonl(tmp_path / "q.jsonl", queries), tokenizer=tok, seq_len=seq_len, gold_field="gold", corpus=corpus
  )
  assert q.records[0]["gold_sentence_ids"] == [0, 1, 2] and q.records[1]["gold_sentence_ids"] == [4]

  model = DecoderLM(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=seq_len))
  tok_lib.check_vocab(tok, model.config.vocab_size)
  params = model.init(jax.random.key(0), jnp.ones((1, seq_len), jnp.int32))
  encoder = tsj.build_encoder(model=model, params=params, correction="none", d_in=4, d_out=4, seq_len=seq_len)
  phi = tsj.encode(encoder, corpus.examples, batch_size=4)
  assert phi.shape == (len(corpus), encoder.dim) and np.isfinite(phi).all()
  np.testing.assert_allclose(tsj.encode(encoder, corpus, batch_size=4), phi)  # a Corpus is examples too
  results = tsj.retrieve(encoder=encoder, queries=q.examples, corpus_phi=phi, corpus_ids=corpus.ids, k=3)
  records = results.to_records(queries=q.records, text_of=corpus.text_of)
  assert [r["example_id"] for r in records] == ["cat", "bird"]
  assert [r["relation"] for r in records] == ["on", "colour"]
  for r, qr in zip(records, q.records):
    assert r["inputs_plaintext"] == qr["prompt"] and r["targets_plaintext"] == qr["target"]
    assert r["proponents"] == [corpus.text_of(i) for i in r["proponent_ids"]]
    assert r["proponent_correct"] == [i in qr["gold_sentence_ids"] for i in r["proponent_ids"]]
    docs_of = {corpus.id_of(i).rsplit("#", 1)[0] for i in r["proponent_ids"] + r["opponent_ids"]}
    assert docs_of <= {d["url"] for d in docs} - {"https://x.org/empty"}
  assert corpus.id_of(2) == "https://x.org/cats#2" and corpus.text_of(4) == "a red bird saw a blue fish"
  assert tsj.results.validate_results_line(records[0]) is None
