"""TFDS builds made from user files are keyed by their content; the tokenizer is tied to its corpus."""

import json
import os

import pytest

from trackstar_jax import configs
from trackstar_jax.data import lama

TEMPLATES = [
  {"relation": "P19", "template": "[X] was born in [Y] ."},
  {"relation": "P20", "template": "[X] died in [Y] ."},
  {"relation": "P36", "template": "The capital of [X] is [Y] ."},
]


def _manual_dir(root, facts):
  """A tiny LAMA T-REx folder: facts = {relation: [(subject, object), ...]}."""
  (root / "evidences").mkdir(parents=True)
  (root / "lama_templates").mkdir()
  (root / lama.TEMPLATES_FILE).write_text("".join(json.dumps(t) + "\n" for t in TEMPLATES))
  for rel, pairs in facts.items():
    lines = [
      json.dumps(
        {
          "sub_uri": f"Q{i}{sub}",
          "sub_label": sub,
          "obj_label": obj,
          "predicate_id": rel,
          "evidences": [{"masked_sentence": f"{sub} lived in [MASK] ({rel}).", "obj_surface": obj}],
        }
      )
      for i, (sub, obj) in enumerate(pairs)
    ]
    (root / "evidences" / f"{rel}.jsonl").write_text("\n".join(lines) + "\n")
  return str(root)


def _config(tmp_path, manual_dir):
  c = configs.base_config(dataset="lama_trex", model="tiny", seq_len=32)
  c.data_dir = str(tmp_path / "tfds")
  c.manual_dir = manual_dir
  return c


def _texts(ds):
  return sorted(r["text"] for r in ds.corpus)


def test_lama_build_is_keyed_by_the_manual_dirs_content(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from trackstar_jax import data

  a = _manual_dir(tmp_path / "a", {"P19": [("Ann", "Paris")], "P20": [("Bob", "Rome")]})
  b = _manual_dir(tmp_path / "b", {"P19": [("Cid", "Oslo")], "P20": [("Dee", "Lima")], "P36": [("Eve", "Bern")]})
  ds_a = data.load_dataset(_config(tmp_path, a))
  assert _texts(ds_a) == ["Ann lived in Paris (P19).", "Bob lived in Rome (P20)."]
  ds_b = data.load_dataset(_config(tmp_path, b))  # same data dir, same relation set ("all"): b's data
  assert _texts(ds_b) == _texts(lama.read_lama(b)) and len(ds_b.queries) == 3
  assert ds_b.fingerprint != ds_a.fingerprint and ds_b.data_dir != ds_a.data_dir
  assert _texts(data.load_dataset(_config(tmp_path, a))) == _texts(ds_a)  # a's build is still there and reused
  # Edit one file of a in place (same names, same size): rebuilt, not reused.
  path = os.path.join(a, "evidences", "P20.jsonl")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text.replace("Rome", "Nice"))
  assert "Bob lived in Nice (P20)." in _texts(data.load_dataset(_config(tmp_path, a)))
  # A malformed manual dir next to old builds is read, and fails: never "succeeds" with an old build.
  with open(path, "a") as f:
    f.write("{not json\n")
  with pytest.raises(ValueError, match=r"P20\.jsonl, line 2: malformed JSON"):
    data.load_dataset(_config(tmp_path, a))
  # Without the files, an earlier build is used only when it is the only one of that relation set.
  with pytest.raises(ValueError, match="builds of these relations from different files"):
    data.load_dataset(_config(tmp_path, str(tmp_path / "gone")))
  c = _config(tmp_path, str(tmp_path / "gone"))
  c.lama_relations = ("P19",)
  with pytest.raises(FileNotFoundError, match=r"--config\.manual_dir"):
    data.load_dataset(c)  # no build of ("P19",) yet
  c.manual_dir = b
  assert _texts(data.load_dataset(c)) == ["Cid lived in Oslo (P19)."]
  c.manual_dir = ""
  assert _texts(data.load_dataset(c)) == ["Cid lived in Oslo (P19)."]  # the sole ("P19",) build


def test_source_fingerprint_sees_content_relations_and_missing_files(tmp_path):
  a = _manual_dir(tmp_path / "a", {"P19": [("Ann", "Paris")], "P20": [("Bob", "Rome")]})
  b = _manual_dir(tmp_path / "b", {"P19": [("Ann", "Paris")], "P20": [("Bob", "Rome")]})
  assert lama.source_fingerprint(a) == lama.source_fingerprint(b)  # same bytes, other folder: same key
  assert lama.source_fingerprint(a, relations=["P19"]) != lama.source_fingerprint(a)
  (tmp_path / "b" / lama.TEMPLATES_FILE).write_text(json.dumps(TEMPLATES[1]) + "\n")
  assert lama.source_fingerprint(a) != lama.source_fingerprint(b)
  assert lama.source_fingerprint(a, relations=["P19", "P99"]) != lama.source_fingerprint(a, relations=["P19"])


def test_tokenizer_without_its_corpus_record_is_not_reused(tmp_path):
  from trackstar_jax import data
  from trackstar_jax.data import records
  from trackstar_jax.data import tokenizer as tokenizer_lib

  corpus = [
    dict(sentence_id=i, text=f"sentence number {i} about the town of X{i % 7}", fact_ids=[]) for i in range(200)
  ]
  ds = data.FactDataset(name="d", fingerprint=records.corpus_fingerprint(corpus), corpus=corpus, queries=[])
  c = configs.base_config(dataset="lama_trex", model="tiny", seq_len=32)
  c.tokenizer.vocab_size = 64
  path = str(tmp_path / "tokenizer.model")
  tokenizer_lib.get_tokenizer(ds, c, path=path)
  assert os.path.exists(path + ".json")
  tokenizer_lib.get_tokenizer(ds, c, path=path)  # same corpus: reused
  other = data.FactDataset(name="d", fingerprint="other", corpus=corpus[:100], queries=[])
  with pytest.raises(ValueError, match="trained for another dataset"):
    tokenizer_lib.get_tokenizer(other, c, path=path)
  os.remove(path + ".json")  # e.g. an old tokenizer, or a crash between the two writes
  with pytest.raises(ValueError, match="no record of the corpus it was trained on"):
    tokenizer_lib.get_tokenizer(other, c, path=path)
