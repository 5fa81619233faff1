"""A small LAMA T-REx manual dir, copied from ../shared/data, shared by the LAMA data tests."""

import os
import shutil

from trackstar_jax.data import lama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMA_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "lama_trex")


def mini_copy(tmp_path, *, relations=("P20", "P1303"), n_lines=40, patterns=False):
  """The templates and the first `n_lines` evidence lines of a few relations (and their ParaRel / LPAQA
  pattern files with `patterns`) as a manual dir under `tmp_path`."""
  root = tmp_path / "lama_mini"
  (root / "evidences").mkdir(parents=True)
  (root / "lama_templates").mkdir()
  shutil.copy(os.path.join(LAMA_DIR, lama.TEMPLATES_FILE), root / lama.TEMPLATES_FILE)
  for rel in relations:
    with open(os.path.join(LAMA_DIR, "evidences", f"{rel}.jsonl")) as f:
      lines = [next(f) for _ in range(n_lines)]
    (root / "evidences" / f"{rel}.jsonl").write_text("".join(lines))
    for d, _ in lama.PATTERN_SOURCES if patterns else ():
      (root / d).mkdir(parents=True, exist_ok=True)
      shutil.copy(os.path.join(LAMA_DIR, d, f"{rel}.jsonl"), root / d / f"{rel}.jsonl")
  return root
