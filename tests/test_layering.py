"""The architecture's import rules, stated in code: a forbidden import fails CI instead of surviving review.

  library (trackstar_jax/, outside jobs/)  never imports the jobs layer or launch/
  trackstar_jax/evaluation/                imports no job
  trackstar_jax/models/                    knows nothing of attribution
  the encoder (and its numerical core)     never imports data/
  retrieval (store, results, hessian)      never imports a model (or Flax)
  launch/                                  thin entry points: only the jobs layer (and absl)
  benchmarks/                              the public API, not the jobs layer

Imports are read from the source (ast), including function-local ones.
"""

import ast
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

ATTRIBUTION = (
  "trackstar_jax.projection",
  "trackstar_jax.gradients",
  "trackstar_jax.optimizer_correction",
  "trackstar_jax.encoder",
  "trackstar_jax.hessian",
  "trackstar_jax.retrieval",
  "trackstar_jax.store",
  "trackstar_jax.results",
  "trackstar_jax.encoding",
  "trackstar_jax.api",
  "trackstar_jax.evaluation",
  "trackstar_jax.jobs",
)
NUMERICAL_CORE = (
  "trackstar_jax/encoder.py",
  "trackstar_jax/gradients.py",
  "trackstar_jax/projection.py",
  "trackstar_jax/optimizer_correction.py",
  "trackstar_jax/encoding.py",
  "trackstar_jax/hessian.py",
)
RETRIEVAL = (
  "trackstar_jax/retrieval.py",
  "trackstar_jax/store.py",
  "trackstar_jax/results.py",
  "trackstar_jax/hessian.py",
  "trackstar_jax/fileio.py",
)

# (files glob, forbidden module prefixes, rule)
RULES = (
  ("trackstar_jax/**/*.py", ("trackstar_jax.jobs", "launch"), "the library never imports the jobs layer or launch/"),
  ("trackstar_jax/evaluation/**/*.py", ("trackstar_jax.jobs",), "evaluation/ metrics and baselines import no job"),
  ("trackstar_jax/models/**/*.py", ATTRIBUTION, "models/ knows nothing of attribution"),
  (NUMERICAL_CORE, ("trackstar_jax.data",), "the encoder never imports data/"),
  (
    RETRIEVAL,
    ("trackstar_jax.models", "flax", "trackstar_jax.gradients", "trackstar_jax.encoder"),
    "retrieval never imports a model",
  ),
  ("benchmarks/*.py", ("trackstar_jax.jobs", "launch"), "benchmarks use the public API, not the jobs layer"),
)
LAUNCH_ALLOWED = ("trackstar_jax.jobs", "trackstar_jax.evaluation.ablation", "absl", "os", "ml_collections")


def imported_modules(path: pathlib.Path) -> list[str]:
  """Every module `path` imports (absolute names; `from a import b` gives a.b, whether b is a module or a name)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out += [f"{node.module}.{a.name}" for a in node.names]
  return out


def _files(pattern, root: pathlib.Path) -> list[pathlib.Path]:
  if isinstance(pattern, tuple):
    return [root / p for p in pattern if (root / p).exists()]
  return sorted(root.glob(pattern))


def _matches(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(root: pathlib.Path = REPO) -> list[str]:
  """'file: imports X (rule)' for every broken rule under `root`."""
  found = []
  for pattern, forbidden, rule in RULES:
    for path in _files(pattern, root):
      if pattern == "trackstar_jax/**/*.py" and path.relative_to(root).parts[:2] == ("trackstar_jax", "jobs"):
        continue  # the jobs layer itself
      for module in imported_modules(path):
        if _matches(module, forbidden):
          found.append(f"{path.relative_to(root)}: imports {module} ({rule})")
  for path in _files("launch/*.py", root):
    for module in imported_modules(path):
      if module.startswith("trackstar_jax") and not _matches(module, LAUNCH_ALLOWED):
        found.append(f"{path.relative_to(root)}: imports {module} (launch/ holds thin entry points over the jobs)")
  return found


def test_repository_keeps_the_import_rules():
  assert violations() == []


@pytest.mark.parametrize(
  "where, line, rule",
  [
    ("trackstar_jax/encoder.py", "from trackstar_jax.data import batching", "never imports data/"),
    ("trackstar_jax/retrieval.py", "from trackstar_jax.models import DecoderLM", "never imports a model"),
    ("trackstar_jax/evaluation/metrics.py", "from trackstar_jax.jobs import evaluate", "import no job"),
    ("trackstar_jax/models/transformer.py", "import trackstar_jax.hessian", "knows nothing of attribution"),
    ("trackstar_jax/store.py", "from launch import encode", "never imports the jobs layer or launch/"),
    ("launch/encode.py", "from trackstar_jax import store", "thin entry points"),
  ],
)
def test_a_forbidden_import_is_caught(tmp_path, where, line, rule):
  """The checker on a copy of the tree with one forbidden import added (inside a function, too)."""
  for top in ("trackstar_jax", "launch", "benchmarks"):
    if (REPO / top).exists():
      os.makedirs(tmp_path / top)
      for src in (REPO / top).rglob("*.py"):
        dst = tmp_path / src.relative_to(REPO)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())
  assert violations(tmp_path) == []
  target = tmp_path / where
  target.write_text(target.read_text() + f"\n\ndef _sneaky():\n  {line}\n")
  found = violations(tmp_path)
  assert len(found) >= 1 and all(where in f for f in found) and any(rule in f for f in found), found
