"""LAMA T-REx reader and builder on the real files (skipped if they are absent)."""

import json
import os

from lama_helpers import mini_copy
import numpy as np
import pytest

from trackstar_jax import configs
from trackstar_jax.data import lama

LAMA_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "lama_trex"
)
needs_lama = pytest.mark.skipif(
  not os.path.isdir(os.path.join(LAMA_DIR, "evidences")), reason="no LAMA data at " + LAMA_DIR
)


@pytest.fixture(scope="module")
def trex():
  return lama.read_lama(LAMA_DIR)


def _mini_copy(tmp_path, relations=("P20", "P1303"), n_lines=40):
  return mini_copy(tmp_path, relations=relations, n_lines=n_lines)


@needs_lama
def test_counts_are_plausible(trex):
  rels = {q["relation"] for q in trex.queries}
  assert len(rels) == 20
  # ~89k unique sentences over 28 relations; these 20 have fewer.
  assert 50_000 < len(trex.corpus) < 89_300
  assert 14_000 < len(trex.queries) < 16_000
  texts = [c["text"] for c in trex.corpus]
  assert len(set(texts)) == len(texts)
  assert all("[MASK]" not in t for t in texts)
  assert any(len(c["fact_ids"]) > 1 for c in trex.corpus)  # shared sentences
  assert [c["sentence_id"] for c in trex.corpus] == list(range(len(trex.corpus)))
  assert [q["query_id"] for q in trex.queries] == list(range(len(trex.queries)))


@needs_lama
def test_queries(trex):
  by_id = {c["sentence_id"]: c for c in trex.corpus}
  multi = [q for q in trex.queries if len(q["answers"]) > 1]
  assert len(multi) > 100
  for q in trex.queries[::97] + multi[:50]:
    assert q["target"] == " " + q["answers"][0]
    assert q["frequency"] == len(q["gold_sentence_ids"]) >= 1
    assert "[X]" not in q["prompt"] and "[Y]" not in q["prompt"]
    assert not q["prompt"].endswith((" ", "."))
    for sid in q["gold_sentence_ids"]:
      assert q["fact_id"] in by_id[sid]["fact_ids"]
  first = next(q for q in trex.queries if q["relation"] == "P20")
  assert first["prompt"] == "Akihiko Saito died in" and first["target"] == " Iraq"
  # ParaRel substitutes for templates that do not end in [Y].
  p106 = next(q for q in trex.queries if q["relation"] == "P106")
  assert p106["prompt"].endswith(" works as")
  p27 = next(q for q in trex.queries if q["relation"] == "P27")
  assert p27["prompt"].endswith(" is a citizen of")


@needs_lama
def test_mask_filled_with_object_surface(trex):
  with open(os.path.join(LAMA_DIR, "evidences", "P20.jsonl")) as f:
    fact = json.loads(next(f))
  ev = fact["evidences"][0]
  text = ev["masked_sentence"].replace("[MASK]", ev["obj_surface"])
  rec = next(c for c in trex.corpus if c["text"] == text)
  assert f"P20:{fact['sub_uri']}" in rec["fact_ids"]


@needs_lama
def test_relation_subset_and_multi_object_union(tmp_path):
  root = _mini_copy(tmp_path)
  data = lama.read_lama(str(root), relations=["P1303"])
  assert {q["relation"] for q in data.queries} == {"P1303"}
  # Recompute the union of gold sentences per (subject, relation) by brute force.
  expected = {}
  with open(root / "evidences" / "P1303.jsonl") as f:
    for line in f:
      d = json.loads(line)
      texts = {e["masked_sentence"].replace("[MASK]", e["obj_surface"]) for e in d["evidences"]}
      key = f"P1303:{d['sub_uri']}"
      expected.setdefault(key, (set(), []))[0].update(texts)
      if d["obj_label"] not in expected[key][1]:
        expected[key][1].append(d["obj_label"])
  text_of = {c["sentence_id"]: c["text"] for c in data.corpus}
  assert len(data.queries) == len(expected)
  for q in data.queries:
    texts, answers = expected[q["fact_id"]]
    assert {text_of[s] for s in q["gold_sentence_ids"]} == texts
    assert q["answers"] == answers


def test_missing_manual_dir_names_the_flag(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"--config\.manual_dir.*evidences/P\*\.jsonl"):
    lama.read_lama(str(tmp_path / "nowhere"))
  (tmp_path / "half" / "evidences").mkdir(parents=True)
  (tmp_path / "half" / "evidences" / "P20.jsonl").write_text("")
  with pytest.raises(FileNotFoundError, match=r"relations\.jsonl"):
    lama.read_lama(str(tmp_path / "half"))


@needs_lama
def test_unknown_relation_is_an_error(tmp_path):
  root = _mini_copy(tmp_path)
  with pytest.raises(FileNotFoundError, match="P999"):
    lama.read_lama(str(root), relations=["P999"])


@needs_lama
def test_malformed_json_reports_file_and_line(tmp_path):
  root = _mini_copy(tmp_path)
  path = root / "evidences" / "P20.jsonl"
  lines = path.read_text().splitlines(keepends=True)
  lines[6] = lines[6][: len(lines[6]) // 2] + "\n"
  path.write_text("".join(lines))
  with pytest.raises(ValueError, match=r"P20\.jsonl, line 7: malformed JSON"):
    lama.read_lama(str(root))


@needs_lama
def test_missing_field_reports_file_and_line(tmp_path):
  root = _mini_copy(tmp_path)
  path = root / "evidences" / "P1303.jsonl"
  lines = path.read_text().splitlines(keepends=True)
  d = json.loads(lines[2])
  del d["obj_label"]
  lines[2] = json.dumps(d) + "\n"
  path.write_text("".join(lines))
  with pytest.raises(ValueError, match=r"P1303\.jsonl, line 3: missing field 'obj_label'"):
    lama.read_lama(str(root))


def test_prompt_from_template():
  assert lama.prompt_from_template("[X] died in [Y] .", "Ann") == "Ann died in"
  assert lama.prompt_from_template("The headquarter of [X] is in [Y] .", "Acme") == ("The headquarter of Acme is in")
  with pytest.raises(ValueError, match="does not end in"):
    lama.prompt_from_template("[X] is a [Y] by profession .", "Ann", relation="P106")


# --- TFDS builder ------------------------------------------------------------


@needs_lama
def test_lama_builder_round_trip(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from trackstar_jax import data

  root = _mini_copy(tmp_path)
  c = configs.base_config(dataset="lama_trex", model="tiny", seq_len=64)
  c.data_dir = str(tmp_path / "tfds")
  c.manual_dir = ""
  with pytest.raises(ValueError, match=r"--config\.manual_dir"):
    data.load_dataset(c)
  c.manual_dir = str(root)
  ds = data.load_dataset(c)
  direct = lama.read_lama(str(root))
  assert list(ds.corpus) == direct.corpus
  assert list(ds.queries) == direct.queries
  assert ds.fingerprint == direct.fingerprint()
  # Prepared once: later loads need no manual dir.
  c.manual_dir = str(tmp_path / "gone")
  assert data.load_dataset(c).fingerprint == ds.fingerprint


@needs_lama
def test_tokenizer_on_lama_targets(trex):
  from trackstar_jax.data import tokenizer as tokenizer_lib

  tok = tokenizer_lib.train_tokenizer([c["text"] for c in trex.corpus[:20_000]], vocab_size=4096)
  sample = trex.queries[::50]
  targets = tok.encode_batch([q["target"] for q in sample])
  prompts = tok.encode_batch([q["prompt"] for q in sample])
  assert all(tok.unk_id not in t for t in targets)  # byte fallback: no <unk>
  assert np.mean([len(t) <= 3 for t in targets]) > 0.75  # (97% are 1 token at 16k pieces)
  for q, p, t in zip(sample, prompts, targets):
    assert tok.id_to_piece(t[0]).startswith("\u2581")
    assert tok.decode(p + t) == q["prompt"] + q["target"]
