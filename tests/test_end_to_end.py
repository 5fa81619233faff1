"""The whole ablation ladder (`python -m launch.pipeline`) on the synthetic fact world.

train -> fit_hessian / encode per encoding variant -> retrieve per method ->
evaluate, then a rerun that must skip every stage. It runs the real launcher
in a subprocess (2 CPU devices: in-process runs on 8 fake devices can hit
XLA's CPU all-reduce rendezvous timeout on 2 busy cores) on configs/synthetic.py
with a smaller world and fewer steps so that it fits a 2-core CI machine; the
model still learns about 40% of the facts (90% of those stated >= 10 times).
"""

import json
import os
import subprocess
import sys

import pytest

from trackstar_jax import results as results_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_WORLD = {
  "world.n_entities": 120,
  "world.n_facts": 120,
  "world.max_frequency": 30,
  "world.n_distractors": 300,
  "tokenizer.vocab_size": 384,
  "seq_len": 32,  # the 384-piece tokenizer needs more than the default 24 tokens
  "model.max_len": 32,
  "train.num_steps": 400,
  "train.warmup_steps": 40,
  "train.batch_size": 32,
  "train.eval_every": 0,
  "train.checkpoint_every": 400,
  "hessian.train_sample": 512,
  # The dense baseline (torch MiniLM) alone takes ~1 min on 2 CPU cores: here it is a skipped row
  # (tests/test_baselines.py covers dense retrieval itself).
  "evaluate.baselines": '("bm25", "random")',
}


def _pipeline(workdir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  cmd = [
    "timeout",
    "1200",
    sys.executable,
    "-m",
    "launch.pipeline",
    "--config=configs/synthetic.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in SMALL_WORLD.items()),
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.integration  # ~150 s on 2 cores: the whole ladder's jobs as subprocesses; .ci/run's integration stage
def test_ablation_ladder_end_to_end(tmp_path):
  workdir = str(tmp_path / "w")
  first = _pipeline(workdir)
  table = json.load(open(os.path.join(workdir, "ablation.json")))
  assert os.path.exists(os.path.join(workdir, "ablation.md"))
  assert table["stage_seconds"]["evaluate"] > 0  # every stage's wall time is in the JSON
  assert "| + R_mixed = TrackStar |" in first.stdout  # the table is printed

  sys.path.insert(0, REPO)
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from trackstar_jax.jobs import pipeline as ladder  # pylint: disable=g-import-not-at-top

  _, methods = ladder.ladder(synthetic.get_config())
  rows = {r["method"]: r for r in table["rows"]}
  assert set(rows) == {m.name for m in methods}  # every rung, dense as a skipped row
  ran = [n for n in rows if not rows[n].get("skipped")]
  assert ran == [m.name for m in methods if m.name in ran]  # ladder order; skipped rows come last
  assert rows["dense (MiniLM)"]["skipped"]
  methods_by_name = {m.name: m for m in methods}
  for name in ran:
    assert results_lib.validate_results_file(ladder.results_file(workdir, methods_by_name[name])) == 120
  assert table["subset"] == "model_correct" and rows["random"]["n"] >= 20  # the model learned something

  ts, rnd = rows["+ R_mixed = TrackStar"], rows["random"]
  assert ts["mrr"] > rnd["mrr"] + 0.05, (ts, rnd)  # seen: 0.12 vs 0.014
  assert ts["tail_patch@10"] > rnd["tail_patch@10"], (ts, rnd)
  assert rows["BM25"]["mrr"] > rnd["mrr"]
  (pair,) = table["comparisons"].values()  # exact Adam vs its rank-1 fit, query by query on the relation split
  assert (pair["a"], pair["b"]) == ("+ R_mixed = TrackStar", "TrackStar, Adam rank-1")
  assert pair["all"]["n"] == ts["n"] == pair["dev"]["n"] + pair["test"]["n"]
  assert pair["all"]["mrr"]["a"] == pytest.approx(ts["mrr"]) and "Paired comparison" in first.stdout

  # README command 1's report step on these outputs: one self-contained page with TrackStar's proponents.
  res = os.path.join(workdir, "ladder", "results")
  page = os.path.join(workdir, "report.html")
  proc = subprocess.run(
    ["timeout", "300", sys.executable, "-m", "launch.report", f"--results={res}/r_mixed_trackstar.jsonl",
     f"--compare=BM25={res}/bm25.jsonl", f"--ablation={workdir}/ablation.json", f"--output={page}"],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  html = open(page, encoding="utf-8").read()
  top = results_lib.read_results(os.path.join(res, "r_mixed_trackstar.jsonl"))[0]
  assert "<script" in html and "http://" not in html.replace("http://www.w3.org", "")  # no network
  assert json.dumps(top["proponents"][0], ensure_ascii=False)[1:-1] in html  # the data is embedded

  # A rerun finds every output up to date: only the (cached) evaluation runs again.
  again = _pipeline(workdir)
  assert again.stderr.count(": running") == 1 and "] evaluate: running" in again.stderr, again.stderr[-3000:]
  table2 = json.load(open(os.path.join(workdir, "ablation.json")))
  assert [r["mrr"] for r in table2["rows"]] == [r["mrr"] for r in table["rows"]]
