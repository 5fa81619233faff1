"""Runs colabs/quickstart.ipynb end to end with nbclient and checks its outputs (train -> attribution -> report)."""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colabs", "quickstart.ipynb")


def _text(cell):
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    elif "data" in o:
      out.append(o["data"].get("text/plain", ""))
  return "".join(out)


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel gets one CPU device, like a user's
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
  )
  client.execute()
  text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
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


def test_notebook_uses_public_api_only():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert not re.search(r"\b_[a-z]\w*\(", src.replace("__version__", "")), "private helpers used"
  for module in re.findall(r"^(?:from|import) (trackstar_jax[\w.]*)", src, flags=re.M):
    assert not module.endswith(tuple(f".{m}" for m in ("gradients", "projection", "encoding"))), module
  assert "pip install" in src  # installs itself when run from a clone
