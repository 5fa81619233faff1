"""The HTML results viewer (trackstar_jax/report, jobs/report.py, launch/report.py).

Unit tests of the page's payload (highlight spans, subjects, filters' data, the
join of two methods on example_id), of the input errors, of a results file in
the published TrackStar schema written by hand (tests/data/), and browser tests
that open the page in headless Chromium and check the DOM after the script ran
(skipped, with the reason, when no chromium binary is installed).
"""

import html
import html.parser
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from trackstar_jax import results as results_lib
from trackstar_jax.evaluation import ablation
from trackstar_jax.jobs import report as report_job
from trackstar_jax.report import data as data_lib
from trackstar_jax.report import highlight, plots, summary
from trackstar_jax.report import page as page_lib
from trackstar_jax.report import payload as payload_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(REPO, "tests", "data", "published_schema_results.jsonl")


def _line(qid, prompt, target, props, opps=(), **extra):
  """A results line; props / opps are [(id, text, score)] (+ correct as a 4th item for proponents)."""
  rec = dict(
    example_id=qid,
    inputs_plaintext=prompt,
    targets_plaintext=target,
    proponents=[p[1] for p in props],
    proponent_ids=[p[0] for p in props],
    proponent_scores=[p[2] for p in props],
    opponents=[o[1] for o in opps],
    opponent_ids=[o[0] for o in opps],
    opponent_scores=[o[2] for o in opps],
    **extra,
  )
  if props and len(props[0]) > 3:
    rec["proponent_correct"] = [p[3] for p in props]
  return rec


def _write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


# ---- highlight spans and subjects -------------------------------------------------------------------------


def test_target_spans_are_whole_words_and_case_insensitive():
  text = "Parisian salons admired him; PARIS loved him (Paris)."
  spans = highlight.highlight_spans(text, target=" Paris")
  assert [text[a:b] for a, b, _ in spans] == ["PARIS", "Paris"]
  assert all(k == "target" for _, _, k in spans)
  assert highlight.highlight_spans("Paris", target="  ") == []


def test_spans_are_utf16_offsets_after_astral_characters():
  text = "Chopin 🎹 and Paris"  # the piano is 1 code point, 2 UTF-16 code units
  ((a, b, kind),) = highlight.highlight_spans(text, target=" Paris")
  assert kind == "target"
  assert (a, b) == (text.index("Paris") + 1, text.index("Paris") + 6)
  units = text.encode("utf-16-le")
  assert units[2 * a : 2 * b].decode("utf-16-le") == "Paris"


def test_overlapping_subject_and_target_keep_the_longer():
  text = "Paris Hilton was born in New York; Paris is in France."
  spans = highlight.highlight_spans(text, target=" Paris", subject="Paris Hilton")
  assert [(text[a:b], k) for a, b, k in spans] == [("Paris Hilton", "subject"), ("Paris", "target")]
  assert all(b1 <= a2 for (_, b1, _), (a2, _, _) in zip(spans, spans[1:]))


def test_infer_subjects_from_relation_templates():
  subj = highlight.infer_subjects(
    {
      "P20": ["Marie Curie died in", "Frédéric Chopin died in", "Oscar Wilde died in"],
      "P36": ["The capital of Kenya is", "The capital of Peru is"],
      "P1": ["only one prompt here"],
      "P2": ["alpha beta", "gamma delta"],  # no shared template words
      "P3": ["Wilde, born in", "Curie, born in"],
    }
  )
  assert subj["Marie Curie died in"] == "Marie Curie"
  assert subj["Frédéric Chopin died in"] == "Frédéric Chopin"
  assert subj["The capital of Kenya is"] == "Kenya"
  assert subj["Wilde, born in"] == "Wilde"  # edge punctuation is not part of the subject
  for p in ("only one prompt here", "alpha beta", "gamma delta"):
    assert p not in subj


def test_infer_subjects_keeps_a_word_when_prompts_share_all_but_one():
  subj = highlight.infer_subjects({"r": ["John Smith was born in", "John Doe was born in"]})
  assert subj == {"John Smith was born in": "Smith", "John Doe was born in": "Doe"}


# ---- reading inputs: lenient schema, clear errors ---------------------------------------------------------


def test_published_schema_fixture_loads_leniently():
  m = data_lib.load_method(PUBLISHED)
  assert m.name == "published_schema_results"
  assert [r["id"] for r in m.records][:2] == ["q-0001", "q-0002"]  # string ids kept
  assert m.records[0]["relation"] == "P20" and m.records[5]["relation"] is None
  assert m.records[0]["frequency"] is None and m.records[0]["model_correct"] is None
  assert "source_split" not in m.records[0]  # an unknown extra field is ignored
  assert m.records[0]["proponents"][0] == dict(
    id="c4-000123", score=0.4121, correct=None, text=m.records[0]["proponents"][0]["text"]
  )
  assert m.records[5]["opponents"] == []


@pytest.mark.parametrize(
  "content, match",
  [
    ("", "is empty"),
    ("\n  \n", "is empty"),
    (
      '{"example_id": 1, "inputs_plaintext": "a", "targets_plaintext": " b", "proponents": []}\n{not json}\n',
      r"bad\.jsonl, line 2: not valid JSON",
    ),
    (
      '{"example_id": 1, "targets_plaintext": " b", "proponents": []}\n',
      r"line 1: missing fields \['inputs_plaintext'\]",
    ),
    ("[1, 2]\n", "line 1: a results line must be a JSON object"),
    ('{"example_id": 1, "inputs_plaintext": "a", "targets_plaintext": " b"}\n', "line 1: no proponents"),
    (
      '{"example_id": 1, "inputs_plaintext": "a", "targets_plaintext": " b", "proponents": ["x", "y"], '
      '"proponent_ids": [1]}\n',
      "line 1: 'proponent_ids' has 1 entries but there are 2 proponents",
    ),
    (
      '{"example_id": 1, "inputs_plaintext": "a", "targets_plaintext": " b", "proponents": ["x"], '
      '"proponent_correct": ["yes"]}\n',
      r"line 1: proponent_correct\[0\] must be true or false",
    ),
    (
      '{"example_id": 7, "inputs_plaintext": "a", "targets_plaintext": " b", "proponents": ["x"]}\n\n'
      '{"example_id": "7", "inputs_plaintext": "a", "targets_plaintext": " b", "proponents": ["x"]}\n',
      "line 3: example_id '7' already appeared on line 1",
    ),
  ],
)
def test_bad_results_file_names_file_and_line(tmp_path, content, match):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(data_lib.ReportInputError, match=match):
    data_lib.load_method(str(path))


def test_missing_inputs_are_named(tmp_path):
  with pytest.raises(data_lib.ReportInputError, match=r"Results file '.*nope\.jsonl' does not exist"):
    data_lib.load_method(str(tmp_path / "nope.jsonl"))
  with pytest.raises(data_lib.ReportInputError, match="Evaluation file '.*nope.json' does not exist"):
    data_lib.load_table(str(tmp_path / "nope.json"), what="Evaluation file")
  (tmp_path / "t.json").write_text('{"rows": [\n  {"method": "a"},\n  oops]}')
  with pytest.raises(data_lib.ReportInputError, match=r"t\.json, line 3: not valid JSON"):
    data_lib.load_table(str(tmp_path / "t.json"), what="Ablation file")
  (tmp_path / "u.json").write_text('{"hello": 1}')
  with pytest.raises(data_lib.ReportInputError, match="neither 'rows' nor 'metrics'"):
    data_lib.load_table(str(tmp_path / "u.json"), what="Ablation file")


def test_bad_input_writes_no_page_and_keeps_the_old_one(tmp_path):
  good = _write_jsonl(tmp_path / "good.jsonl", [_line(1, "a b", " c", [(5, "c here", 1.0)])])
  bad = _write_jsonl(tmp_path / "bad.jsonl", [_line(1, "a b", " c", [(5, "c", 1.0)]), "{truncated"])
  out = tmp_path / "page.html"
  with pytest.raises(data_lib.ReportInputError, match="line 2"):
    report_job.run(results=[bad], output=str(out))
  assert not out.exists()
  report_job.run(results=[good], output=str(out))
  before = out.read_bytes()
  with pytest.raises(data_lib.ReportInputError, match="line 2"):
    report_job.run(results=[good], compare=bad, output=str(out))
  assert out.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "page.html"]  # no temporary file left


def test_results_flag_names():
  assert data_lib.parse_results_flag(["ts=a.jsonl", "b.jsonl", "gs://bkt/x=1.jsonl", "/d/k=v.jsonl"]) == [
    ("ts", "a.jsonl"),
    (None, "b.jsonl"),
    (None, "gs://bkt/x=1.jsonl"),
    (None, "/d/k=v.jsonl"),
  ]
  with pytest.raises(data_lib.ReportInputError, match="NAME=PATH"):
    data_lib.parse_results_flag(["ts="])


# ---- the payload ------------------------------------------------------------------------------------------


def _two_methods(tmp_path):
  ts = _write_jsonl(
    tmp_path / "ts.jsonl",
    [
      _line(
        1,
        "Ada Lovelace died in",
        " London",
        [(10, "Ada Lovelace died in London.", 0.5, True), (11, "London is big.", 0.4, False)],
        [(90, "Noise.", -0.3)],
        relation="P20",
        frequency=3,
        model_correct=True,
        model_answer=" London",
      ),
      _line(
        2,
        "Alan Turing died in",
        " Wilmslow",
        [(12, "Turing lived in Wilmslow.", 0.2, False)],
        relation="P20",
        frequency=40,
      ),
      _line(
        3,
        "The capital of Peru is",
        " Lima",
        [(13, "Lima is the capital of Peru.", 0.9, True)],
        relation="P36",
        frequency=1,
      ),
    ],
  )
  bm25 = _write_jsonl(
    tmp_path / "bm25.jsonl",
    [  # string ids, another order, no proponent_correct
      _line(
        "2",
        "Alan Turing died in",
        " Wilmslow",
        [(14, "Alan Turing was born in London.", 7.0), (12, "Turing lived in Wilmslow.", 6.0)],
      ),
      _line(
        "1", "Ada Lovelace died in", " London", [(11, "London is big.", 9.0), (10, "Ada Lovelace died in London.", 8.0)]
      ),
      _line("4", "Grace Hopper died in", " Arlington", [(15, "Hopper.", 1.0)]),
    ],
  )
  return data_lib.load_methods([f"trackstar={ts}"], compare=f"bm25={bm25}")


def test_payload_joins_methods_on_example_id(tmp_path):
  p = payload_lib.build_payload(methods=_two_methods(tmp_path))
  assert [m["name"] for m in p["methods"]] == ["trackstar", "bm25"]
  assert [q["id"] for q in p["queries"]] == [1, 2, 3, "4"]  # first method's order, then the others'
  by_id = {str(q["id"]): q for q in p["queries"]}
  ada = by_id["1"]
  ts, bm = ada["r"]

  def text(ref):
    return p["passages"][ref[0]][1]

  assert [text(r) for r in ts["p"]] == ["Ada Lovelace died in London.", "London is big."]
  assert [text(r) for r in bm["p"]] == ["London is big.", "Ada Lovelace died in London."]
  assert [r[1] for r in bm["p"]] == [9, 8]
  assert ts["p"][0][0] == bm["p"][1][0]  # one passage table entry for the same (id, text)
  assert by_id["3"]["r"][1] is None and by_id["4"]["r"][0] is None  # in one file only
  # correctness of a passage is the query's, whichever method retrieved it
  assert [r[2] for r in ts["p"]] == [1, 0] and [r[2] for r in bm["p"]] == [0, 1]
  assert ts["rr"] == 1 and bm["rr"] == 2
  turing_bm = by_id["2"]["r"][1]
  assert [r[2] for r in turing_bm["p"]] == [-1, 0] and "rr" not in turing_bm  # rank 1 unknown: no rank
  assert [r[2] for r in ts["o"]] == [-1]


def test_payload_filter_data_and_optional_fields(tmp_path):
  p = payload_lib.build_payload(methods=_two_methods(tmp_path))
  assert p["relations"] == [["P20", 2], ["P36", 1]]
  assert p["buckets"] == ["1", "2-3", "4-7", "8-15", "16-31", ">=32"]
  by_id = {str(q["id"]): q for q in p["queries"]}
  assert [p["buckets"][by_id[i]["b"]] for i in "123"] == ["2-3", ">=32", "1"]
  assert "b" not in by_id["4"] and "rel" not in by_id["4"]
  assert by_id["1"]["mc"] is True and by_id["1"]["ans"] == " London" and "mc" not in by_id["2"]
  assert by_id["1"]["subj"] == "Ada Lovelace" and by_id["2"]["subj"] == "Alan Turing"
  assert "subj" not in by_id["3"]  # one P36 prompt: no template to infer the subject from
  assert p["has"] == dict(relation=True, freq=True, mc=True, ans=True, subj=True, correct=True)
  ts = by_id["1"]["r"][0]["p"][0]
  assert ts[3] == [0, 12, 1, 21, 27, 0]  # "Ada Lovelace" (subject), "London" (target)


def test_payload_model_correct_from_evaluation(tmp_path):
  path = _write_jsonl(tmp_path / "r.jsonl", [_line(i, f"p{i} x", " t", [(i, "t", 1.0)]) for i in range(3)])
  methods = data_lib.load_methods([path])
  no_eval = payload_lib.build_payload(methods=methods, evaluation={"rows": []})
  assert not no_eval["has"]["mc"]
  p = payload_lib.build_payload(methods=methods, evaluation={"model_correct_by_query": {"0": True, "2": False}})
  assert [q.get("mc") for q in p["queries"]] == [True, None, False]
  assert p["has"]["mc"] and not p["has"]["relation"] and not p["has"]["correct"]


def test_method_stats_match_metric_definitions(tmp_path):
  recs = data_lib.load_method(
    _write_jsonl(
      tmp_path / "r.jsonl",
      [
        _line(1, "a", " x", [(1, "", 0.0, False), (2, "", 0.0, True)]),
        _line(2, "b", " x", [(3, "", 0.0, False)]),
        _line(3, "c", " x", [(4, "", 0.0, True)]),
        _line(4, "d", " x", [(5, "", 0.0)]),  # unknown correctness: left out
      ],
    )
  ).records
  s = payload_lib.method_stats(recs)
  assert s["n"] == 3 and s["mrr"] == pytest.approx((0.5 + 0 + 1) / 3) and s["recall@10"] == pytest.approx(2 / 3)


def test_embedded_json_cannot_close_the_script(tmp_path):
  path = _write_jsonl(
    tmp_path / "r.jsonl", [_line(1, "x </script><script>alert(1)</script>", " y", [(1, "<!-- y </script>", 1.0)])]
  )
  methods = data_lib.load_methods([path])
  text = page_lib.render_page(payload=payload_lib.build_payload(methods=methods, title="<i>t</i>"))
  assert text.count("</script>") == 2  # the data's and the code's own
  assert "<!--" not in text and "<i>t</i>" not in text and "&lt;i&gt;t&lt;/i&gt;" in text
  data = text[text.index('type="application/json">') + len('type="application/json">') :]
  data = data[: data.index("</script>")]
  assert json.loads(data)["queries"][0]["prompt"] == "x </script><script>alert(1)</script>"


# ---- metrics tab and charts -------------------------------------------------------------------------------


def _evaluation_table():
  """A table from this project's own evaluation code (ablation_table + to_json), like evaluation.json."""
  queries = [
    dict(
      query_id=i,
      fact_id=f"f{i}",
      relation="P20" if i % 2 else "P36",
      gold_sentence_ids=[i],
      frequency=[1, 3, 40][i % 3],
    )
    for i in range(6)
  ]
  good = [_line(i, "p", " t", [(i, "", 1.0), (100 + i, "", 0.5)]) for i in range(6)]
  bad = [_line(i, "p", " t", [(100 + i, "", 1.0), (i, "", 0.5)]) for i in range(6)]
  table = ablation.ablation_table(
    methods={"TrackStar": good, "<BM25>": bad},
    queries=queries,
    tail_patch={"TrackStar": {"tail_patch@1": 0.1, "tail_patch@10": 0.05}},
  )
  table["model_accuracy"] = {"accuracy": 0.5, "n": 6, "n_correct": 3}
  return json.loads(ablation.to_json(table))


def test_metrics_tab_from_evaluation_json(tmp_path):
  path = tmp_path / "evaluation.json"
  path.write_text(json.dumps(_evaluation_table()))
  table = data_lib.load_table(str(path), what="Evaluation file")
  out = summary.metrics_tab_html(evaluation=table, ablation=table, stats=[{"name": "x", "n": 0}])
  assert "the model answers <b>3</b> of 6 queries (50.0%)" in out
  assert "&lt;BM25&gt;" in out and "<BM25>" not in out
  assert '<td class="num">1.0000</td>' in out and '<td class="num">0.5000</td>' in out  # MRR 1 and 1/2
  assert out.count("<svg") == 3  # MRR bars, tail-patch bars, MRR by frequency
  assert "MRR by relation" in out and "P36 (n=3)" in out
  assert summary.metrics_tab_html(evaluation=None, ablation=None, stats=[]) == ""


def test_bar_chart_skips_missing_values_and_escapes_labels():
  svg = plots.bar_chart(
    title="t", labels=["a<b", "c", "d"], series={"s1": [0.5, None, -0.2], "s2": [float("nan"), 1, 2]}
  )
  assert svg.count("<rect") - svg.count('width="10" height="10"') == 4  # 4 bars (legend swatches aside)
  assert "a&lt;b" in svg and "a<b" not in svg
  line = plots.line_chart(title="t", x_labels=["1", "2", "3"], series={"m": [0.1, None, 0.3]})
  assert line.count("<polyline") == 2 and line.count("<circle") == 2  # a gap at the missing value
  assert plots.nice_ticks(0, 0.87) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


# ---- the launcher -----------------------------------------------------------------------------------------


def test_launcher_writes_page_and_reports_bad_lines(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  out = tmp_path / "page.html"
  bad = _write_jsonl(tmp_path / "bad.jsonl", [_line(1, "a", " b", [(1, "b", 1.0)]), "{oops"])
  r = subprocess.run(
    [sys.executable, "-m", "launch.report", f"--results={bad}", f"--output={out}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert r.returncode != 0 and f"{bad}, line 2: not valid JSON" in r.stderr and not out.exists()
  r = subprocess.run(
    [sys.executable, "-m", "launch.report", f"--results=published={PUBLISHED}", f"--output={out}", "--title=Fixture"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert r.returncode == 0, r.stderr
  assert "6 queries" in r.stdout and out.read_text().startswith("<!DOCTYPE html>")


# ---- in a browser -----------------------------------------------------------------------------------------


def _chromium():
  for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


CHROMIUM = _chromium()
_NO_CHROMIUM = pytest.mark.skipif(
  CHROMIUM is None,
  reason="no chromium binary found: apt-get install chromium (or set $CHROMIUM to a Chrome/Chromium executable)",
)


def browser(test):
  """A browser test: marked `browser` (select with -m browser), skipped without Chromium; ~1-3 s each."""
  return pytest.mark.browser(_NO_CHROMIUM(test))


def _chrome(tmp_path, url, *args):
  cmd = [
    CHROMIUM,
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    f"--user-data-dir={tmp_path / 'chrome-profile'}",
    "--virtual-time-budget=5000",
    *args,
    url,
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout


class _Cards(html.parser.HTMLParser):
  """The rendered query cards of a DOM dump: id, text, marks [(class, text)], column headings."""

  def __init__(self):
    super().__init__()
    self.cards, self.stack, self.card_depth, self.marks = [], [], None, []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    self.stack.append((tag, a))
    if self.card_depth is None and "query" in (a.get("class") or "").split():
      self.card_depth = len(self.stack)
      self.cards.append(dict(id=a.get("data-id"), text="", marks=[], h4=[], tags=[]))
    elif self.card_depth is not None:
      self.cards[-1]["tags"].append(tag)

  def handle_endtag(self, tag):
    if self.card_depth is not None and len(self.stack) == self.card_depth:
      self.card_depth = None
    if self.stack:
      self.stack.pop()

  def handle_data(self, data):
    if self.card_depth is None:
      return
    card = self.cards[-1]
    card["text"] += data
    for tag, a in reversed(self.stack):
      if tag == "mark":
        card["marks"].append((a.get("class"), data, any(t == "li" for t, _ in self.stack)))
        break
    if any(t == "h4" for t, _ in self.stack):
      card["h4"].append(data)


def _count(dom):
  """The text of the page's "N of M queries" line."""
  m = re.search(r'<span class="count" id="count">(.*?)</span>', dom)
  return html.unescape(re.sub(r"<[^>]+>", "", m.group(1))) if m else ""


def _cards(dom):
  p = _Cards()
  p.feed(dom)
  return {c["id"]: c for c in p.cards}


@pytest.fixture(scope="module")
def fixture_page(tmp_path_factory):
  """The published-schema fixture vs a second method, with an evaluation table.

  The second method ("bm25") has the same proponents in reverse order and the
  optional fields the fixture lacks: proponent_correct (does the passage contain
  the target), frequency, and one model answer; the evaluation table says which
  queries the model answers correctly.
  """
  d = tmp_path_factory.mktemp("report")
  other = []
  freqs = {"q-0001": 1, "q-0002": 3, "q-0003": 3, "q-0004": 40, "q-0005": 1}
  for line in results_lib.read_results(PUBLISHED):
    rev = {k: line[k][::-1] for k in ("proponents", "proponent_ids")}
    rev["proponent_correct"] = [line["targets_plaintext"].strip() in t for t in rev["proponents"]]
    rec = {**line, **rev, "proponent_scores": sorted(line["proponent_scores"], reverse=True)}
    if line["example_id"] in freqs:
      rec["frequency"] = freqs[line["example_id"]]
    if line["example_id"] == "q-0002":
      rec["model_answer"] = " Warsaw"
    other.append(rec)
  other_path = _write_jsonl(d / "bm25.jsonl", other)
  table = _evaluation_table()
  table["model_correct_by_query"] = {"q-0001": True, "q-0002": False, "q-0003": True, "q-0004": False, "q-0005": True}
  (d / "evaluation.json").write_text(json.dumps(table))
  out = d / "page.html"
  report_job.run(
    results=[f"trackstar={PUBLISHED}"],
    compare=f"bm25={other_path}",
    output=str(out),
    evaluation=str(d / "evaluation.json"),
    page_size=4,
  )
  return out


@browser
def test_browser_renders_prompts_proponents_and_marks(fixture_page, tmp_path):
  dom = _chrome(tmp_path, fixture_page.as_uri(), "--dump-dom")
  cards = _cards(dom)
  assert list(cards) == ["q-0001", "q-0002", "q-0003", "q-0004"]  # page 1 of 2 (4 per page)
  chopin = cards["q-0002"]
  assert "Frédéric Chopin died in" in chopin["text"]
  assert "Chopin spent his last years in Paris." in chopin["text"]  # a proponent
  assert "The nocturne is a short piece." in chopin["text"]  # an opponent
  assert ("hl-target", "Paris", True) in chopin["marks"]  # the target marked inside a passage
  assert ("hl-subject", "Frédéric Chopin", True) in chopin["marks"]
  assert "<b>Warsaw</b> & Kraków" in chopin["text"] and "b" not in chopin["tags"]  # escaped, not markup
  assert _count(dom).startswith("6 of 6 queries") and "page 1 of 2" in dom


@browser
def test_browser_hash_filters_relation_and_text(fixture_page, tmp_path):
  dom = _chrome(tmp_path, fixture_page.as_uri() + "#relation=P20&q=Paris", "--dump-dom")
  cards = _cards(dom)
  assert set(cards) == {"q-0001", "q-0002", "q-0003"}  # q-0001 matches "Paris" in a passage only
  assert "Oscar Wilde died in" in cards["q-0003"]["text"]
  assert not any("The capital of Kenya is" in c["text"] for c in cards.values())  # P36: filtered out
  assert "q-0006" not in cards  # has "Paris" but no relation
  assert _count(dom).startswith("3 of 6 queries")
  dom = _chrome(tmp_path, fixture_page.as_uri() + "#relation=P36", "--dump-dom")
  assert set(_cards(dom)) == {"q-0004", "q-0005"}


@browser
@pytest.mark.parametrize(
  "view, shown",
  [
    ("model=incorrect", {"q-0002", "q-0004"}),  # from the evaluation's model_correct_by_query
    ("model=correct&relation=P20", {"q-0001", "q-0003"}),
    ("top=incorrect", {"q-0003"}),  # trackstar's top passage, marked by bm25's proponent_correct
    ("top=correct&freq=2-3", {"q-0002"}),
    ("page=2", {"q-0005", "q-0006"}),  # 4 queries per page
    ("q=no+such+text", set()),
  ],
)
def test_browser_hash_filters_correctness_frequency_and_page(fixture_page, tmp_path, view, shown):
  dom = _chrome(tmp_path, f"{fixture_page.as_uri()}#{view}", "--dump-dom")
  cards = _cards(dom)
  assert set(cards) == shown
  if "q-0002" in cards:
    assert "model answer: Warsaw" in cards["q-0002"]["text"]
  assert all("model answer" not in c["text"] for i, c in cards.items() if i != "q-0002")
  if not shown:
    assert "No query matches these filters." in dom


@browser
def test_browser_compare_two_methods_side_by_side(fixture_page, tmp_path):
  dom = _chrome(tmp_path, fixture_page.as_uri() + "#compare=bm25&q=Nairobi", "--dump-dom")
  (card,) = _cards(dom).values()
  assert "".join(card["h4"]).count("Proponents") == 2 and "Opponents" not in card["text"]
  assert "trackstar" in card["h4"] and "bm25" in card["h4"]
  text = card["text"]
  first = text.index("Nairobi is the capital")
  assert first < text.index("Mombasa") < text.index("Nairobi is the capital", first + 1)  # reversed in bm25


@browser
def test_browser_screenshot_is_a_png(fixture_page, tmp_path):
  shot = tmp_path / "page.png"
  _chrome(tmp_path, fixture_page.as_uri() + "#tab=metrics", f"--screenshot={shot}", "--window-size=1280,900")
  data = shot.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  width, height = struct.unpack(">II", data[16:24])
  assert (width, height) == (1280, 900)
  idat, i = b"", 8
  while i < len(data):
    n, kind = struct.unpack(">I4s", data[i : i + 8])
    idat += data[i + 8 : i + 8 + n] if kind == b"IDAT" else b""
    i += 12 + n
  assert len(set(zlib.decompress(idat))) > 64  # not a blank page: many distinct pixel bytes


@pytest.mark.slow
@browser
def test_browser_stays_responsive_at_lama_scale(tmp_path):
  """15,652 queries x (10 proponents + 10 opponents), 2 methods: the page parses and renders in well under a second."""
  rng = random.Random(0)
  words = [f"w{i}" for i in range(5000)]
  corpus = [" ".join(rng.choices(words, k=25)) + "." for _ in range(40_000)]
  paths = []
  for name in ("trackstar", "bm25"):
    lines = []
    for q in range(15_652):
      ids = rng.sample(range(len(corpus)), 20)
      lines.append(
        _line(
          q,
          f"{rng.choice(words)} {rng.choice(words)} died in",
          " " + rng.choice(words),
          [(i, corpus[i], 1.0 - r / 20, rng.random() < 0.1) for r, i in enumerate(ids[:10])],
          [(i, corpus[i], -1.0 + r / 20) for r, i in enumerate(ids[10:])],
          relation=f"P{q % 20}",
          frequency=rng.choice([1, 2, 5, 40]),
        )
      )
    paths.append(_write_jsonl(tmp_path / f"{name}.jsonl", lines))
  out = tmp_path / "page.html"
  info = report_job.run(results=[f"trackstar={paths[0]}"], compare=f"bm25={paths[1]}", output=str(out))
  assert info["queries"] == 15_652 and info["bytes"] < 60e6
  dom = _chrome(tmp_path, out.as_uri() + "#q=w17&compare=bm25", "--dump-dom", "--virtual-time-budget=30000")
  assert len(_cards(dom)) == 50
  body = re.search(r"<body[^>]*>", dom).group(0)
  parse_ms, render_ms = (int(re.search(f'data-{k}-ms="(\\d+)"', body).group(1)) for k in ("parse", "render"))
  assert parse_ms < 3000 and render_ms < 3000, body  # seen on 2 busy cores: 0.14 s and 0.07 s
