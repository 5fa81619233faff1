"""Runs the colabs end to end with nbclient and checks their outputs.

quickstart.ipynb: the project's own LM, train -> attribution -> report.
bring_your_own_model.ipynb: a user's NNX LM, trained with optax in the notebook, saved and restored with Orbax in
its own layout, traced with the public API.
"""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colabs", "quickstart.ipynb")
BYO_NOTEBOOK = os.path.join(REPO, "colabs", "bring_your_own_model.ipynb")


def _text(cell):
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    elif "data" in o:
      out.append(o["data"].get("text/plain", ""))
  return "".join(out)


def _execute(path, monkeypatch, **env):
  """The notebook at `path`, executed in a fresh kernel (one CPU device, like a user's), and its code cells' text."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
  )
  client.execute()
  return nb, "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
  nb, text = _execute(NOTEBOOK, monkeypatch, QUICKSTART_WORKDIR=str(tmp_path / "work"))
  assert "corpus sentences" in text and "query:" in text
  m = re.search(r"Query accuracy on facts stated >= 3 times: ([0-9.]+)", text)
  assert m, text[-2000:]
  assert float(m.group(1)) >= 0.6, text[-2000:]  # 500 steps: ~0.75 (the full config: >= 0.9)
  answers = re.findall(r"^\[(ok |bad)\] ", text, flags=re.M)
  assert len(answers) == 9 and answers.count("ok ") >= 4, text[-2000:]
  assert os.path.isdir(tmp_path / "work" / "train" / "checkpoints")
  # Attribution: proponents shown, gold among them, the ladder's MRR in order, tail-patch, the report.
  assert "query:" in text and "proponent 1" in text and "opponent 1" in text and "[gold]" in text, text[-3000:]
  mrr = dict(
    re.findall(
      r"^\s*(gradient dot product|cosine \(\+ Adam correction\)|TrackStar \(\+ R_mixed\)): MRR ([0-9.]+)",
      text,
      flags=re.M,
    )
  )
  assert len(mrr) == 3, text[-3000:]
  assert float(mrr["cosine (+ Adam correction)"]) > float(mrr["gradient dot product"]) > 0.1, mrr
  assert float(mrr["TrackStar (+ R_mixed)"]) > 0.3, mrr
  tp = dict(re.findall(r"^\s*(TrackStar \(\+ R_mixed\)): tail-patch@1 ([-+0-9.]+)", text, flags=re.M))
  assert float(tp["TrackStar (+ R_mixed)"]) > 0, text[-3000:]  # its proponents raise p(target)
  svgs = [o for c in nb.cells for o in c.get("outputs", []) if "image/svg+xml" in o.get("data", {})]
  assert len(svgs) == 2, "the two ladder plots"
  assert os.path.getsize(tmp_path / "work" / "report.html") > 10_000


def test_bring_your_own_model_notebook(tmp_path, monkeypatch):
  _, text = _execute(BYO_NOTEBOOK, monkeypatch, BYO_WORKDIR=str(tmp_path / "work"))
  assert "The model answers" in text and "restored model gives the trained model's logits: True" in text, text[-3000:]
  assert "correction 'adam'" in text, text[-3000:]  # Adam's nu found in the restored optimizer state
  assert os.path.isdir(tmp_path / "work" / "checkpoints") and os.path.isdir(tmp_path / "work" / "encodings.zarr")
  assert text.count("query: ") >= 4 and "proponent 1" in text and "[states the fact]" in text, text[-3000:]
  m = re.search(r"Model answers ([0-9.]+) of the queries; TrackStar top-3 hit rate on them ([0-9.]+)", text)
  assert m, text[-3000:]
  assert float(m.group(1)) >= 0.8 and float(m.group(2)) >= 0.7, m.group(0)
  rates = dict(re.findall(r"^\s*(.+?): supporting sentence in top-3 ([0-9.]+)", text, flags=re.M))
  assert len(rates) == 3, text[-3000:]


@pytest.mark.parametrize("path", [NOTEBOOK, BYO_NOTEBOOK], ids=os.path.basename)
def test_notebook_uses_public_api_only(path):
  nb = nbformat.read(path, as_version=4)
  src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert not re.search(r"\b_[a-z]\w*\(", src.replace("__version__", "")), "private helpers used"
  for module in re.findall(r"^(?:from|import) (trackstar_jax[\w.]*)", src, flags=re.M):
    assert not module.endswith(tuple(f".{m}" for m in ("gradients", "projection", "encoding"))), module
  assert "pip install" in src  # installs itself when run from a clone
