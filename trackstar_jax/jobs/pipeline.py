"""The ablation ladder as config variants of one pipeline, run by one call.

  run(config, workdir)      # = python -m launch.pipeline --config=... --workdir=...

Stages (each logged, each skipped when its output exists and was made from
the same inputs, each resumable):

  train      train the LM, or reuse a finished checkpoint in `workdir`
  hessian    per encoding variant and Hessian kind: `jobs.fit_hessian`
  encode     per encoding variant: `jobs.encode` into its own store
  retrieve   per gradient method: `jobs.retrieve`; BM25 / dense / random baselines
  evaluate   `jobs.evaluate` over every method -> <workdir>/ablation.{md,json}

Encoding variants (raw phi is task-independent, so methods share stores):

  none        no optimizer correction, config d_in x d_out
  <corr>      config.encoder.correction (adam by default), config d_in x d_out
  adam_rank1  Adam's nu fitted by a rank-1 matrix (fused path); with exact
              Adam as <corr> (and exact Adam when <corr> is adam_rank1)
  <corr>_half <corr> at d_in/2 x d_out/2 (a quarter of the dimensions)

Methods (table rows, in the paper's ladder order):

  1 gradient dot       none,  no unit norm, no R
  2 + unit norm        none,  cosine
  3 + optimizer corr.  <corr>, cosine
  4 + R_train          <corr>, R = R_train (hessian.mixed=False)
  5 TrackStar          <corr>, R = R_mixed
  TrackStar with the other Adam correction, TrackStar d=<d/4>, BM25, dense
  (optional), random. Exact Adam vs rank-1 is also compared query by query
  on the relation split (`jobs.evaluate`'s `compare`).

Layout: <workdir>/ladder/<variant>/{encodings.zarr, hessian_<kind>.npz},
<workdir>/ladder/results/<method>.jsonl, and `.stage.json` stamps recording
the inputs of each finished stage output.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

from absl import logging

from trackstar_jax import checkpointing, fileio
from trackstar_jax import mesh as mesh_lib
from trackstar_jax import results as results_lib
from trackstar_jax.evaluation import ablation, baselines
from trackstar_jax.jobs import encode as encode_job
from trackstar_jax.jobs import evaluate as evaluate_job
from trackstar_jax.jobs import fit_hessian as fit_hessian_job
from trackstar_jax.jobs import retrieve as retrieve_job
from trackstar_jax.jobs import train as train_job
from trackstar_jax.jobs import workdir as workdir_lib

STAGES = ("train", "hessian", "encode", "retrieve", "evaluate")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One encoding: an optimizer correction at one projection size."""

  name: str
  correction: str
  d_in: int
  d_out: int


@dataclasses.dataclass(frozen=True)
class Method:
  """One table row. `variant` None: a text baseline (`kind`)."""

  name: str
  kind: str = "gradient"  # gradient | bm25 | dense | random
  variant: str | None = None
  hessian: str | None = None  # None | "train" | "mixed"
  normalize: bool = True


# The correction a ladder runs beside its own, and that row's name: exact Adam beside the rank-1 fit of nu
# (fused, cheaper) and back. `comparisons` pairs their TrackStar rows for the paired test on the relation split.
OTHER_ADAM = {"adam": ("adam_rank1", "TrackStar, Adam rank-1"), "adam_rank1": ("adam", "TrackStar, exact Adam")}


def comparisons(methods: Sequence[Method]) -> list[tuple[str, str]]:
  """(exact Adam's TrackStar row, rank-1's) when both are among `methods`: the costlier one first."""
  rows = {m.variant: m.name for m in methods if m.hessian == "mixed"}
  if "adam" in rows and "adam_rank1" in rows:
    return [(rows["adam"], rows["adam_rank1"])]
  return []


def ladder(config) -> tuple[list[Variant], list[Method]]:
  """The encoding variants and methods of the ablation ladder for `config`."""
  enc = config.encoder
  corr = str(enc.correction)
  if corr in ("none", "auto"):  # the correction of the training optimizer
    corr = "adafactor" if str(config.train.optimizer).lower() == "adafactor" else "adam"
  d_in, d_out = int(enc.d_in), int(enc.d_out)
  half = Variant(f"{corr}_half", corr, max(1, d_in // 2), max(1, d_out // 2))
  variants = [Variant("none", "none", d_in, d_out), Variant(corr, corr, d_in, d_out)]
  methods = [
    Method("gradient dot product", variant="none", normalize=False),
    Method("+ unit norm (cosine)", variant="none"),
    Method(f"+ optimizer correction ({corr})", variant=corr),
    Method("+ R_train", variant=corr, hessian="train"),
    Method("+ R_mixed = TrackStar", variant=corr, hessian="mixed"),
  ]
  if corr in OTHER_ADAM:  # exact Adam and its rank-1 fit, side by side: the other one as an extra row
    other, row = OTHER_ADAM[corr]
    variants.append(Variant(other, other, d_in, d_out))
    methods.append(Method(row, variant=other, hessian="mixed"))
  variants.append(half)
  methods += [
    Method(f"TrackStar, {half.d_in}x{half.d_out}/block (not {d_in}x{d_out})", variant=half.name, hessian="mixed"),
    Method("BM25", kind="bm25"),
    Method("dense (MiniLM)", kind="dense"),
    Method("random", kind="random"),
  ]
  return variants, methods


def variant_config(config, workdir: str, v: Variant, *, hessian: str | None = None, method: Method | None = None):
  """`config` with the encoder / store / hessian / retrieve fields of one variant (and method)."""
  c = config.copy_and_resolve_references()
  root = os.path.join(os.path.abspath(workdir), "ladder")
  with c.unlocked():
    c.encoder.correction, c.encoder.d_in, c.encoder.d_out = v.correction, v.d_in, v.d_out
    c.store.url = os.path.join(root, v.name, "encodings.zarr")
    c.hessian.mixed = hessian != "train"
    c.hessian.path = os.path.join(root, v.name, f"hessian_{hessian or 'mixed'}.npz")
    if method is not None:
      c.retrieve.method = method.name
      c.retrieve.use_hessian = method.hessian is not None
      c.retrieve.normalize = method.normalize
      c.retrieve.output = results_file(workdir, method)
  return c


def results_file(workdir: str, method: Method) -> str:
  slug = evaluate_job.file_slug(method.name.lower())
  return os.path.join(os.path.abspath(workdir), "ladder", "results", slug + ".jsonl")


# ----------------------------------------------------------------------------
# Stage stamps: what a finished output was made from.


def _key(**parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stamp_path(output: str) -> str:
  return output.rstrip("/") + ".stage.json"


def _read_stamp(output: str) -> dict:
  stamp = _stamp_path(output)
  return fileio.read_json(stamp) if fileio.exists(stamp) else {}


def _is_current(output: str, key: str) -> bool:
  return os.path.exists(output) and _read_stamp(output).get("key") == key


def _stamp(output: str, key: str, **info) -> None:
  if mesh_lib.is_chief():
    fileio.write_json(_stamp_path(output), dict(key=key, time=time.time(), **info))


def _remove(path: str) -> None:
  if not mesh_lib.is_chief():
    return
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


class _Log:
  """Per-stage progress lines with elapsed time."""

  def __init__(self, total: int):
    self.i, self.total, self.t0 = 0, total, time.perf_counter()
    self.times: dict[str, float] = {}

  def run(self, name: str, fn, *, skip: bool = False, why: str = ""):
    self.i += 1
    tag = f"[{self.i}/{self.total}] {name}"
    if skip:
      logging.info("pipeline %s: skipped (%s)", tag, why or "up to date")
      return None
    logging.info("pipeline %s: running", tag)
    t = time.perf_counter()
    out = fn()
    self.times[name] = time.perf_counter() - t
    logging.info("pipeline %s: done in %.1fs (total %.1fs)", tag, self.times[name], time.perf_counter() - self.t0)
    return out


def select_methods(methods: Sequence[Method], only: Sequence[str] | None) -> list[Method]:
  """The methods named in `only` (a method name, or a kind: gradient | bm25 | dense | random); all if empty."""
  if not only:
    return list(methods)
  names = {m.name.lower() for m in methods}
  wanted = set()
  for w in only:  # a method name may hold commas ("TrackStar, Adam rank-1"); anything else is a comma list
    w = w.strip().lower()
    wanted |= {w} if w in names else {p.strip() for p in w.split(",") if p.strip()}
  chosen = [m for m in methods if m.name.lower() in wanted or m.kind in wanted]
  known = {m.name.lower() for m in methods} | {m.kind for m in methods}
  unknown = sorted(wanted - known)
  if unknown:
    raise ValueError(
      f"--methods {unknown} match no ladder method; known: kinds gradient/bm25/dense/random or "
      f"names {[m.name for m in methods]}."
    )
  return chosen


def run(
  config, workdir: str, *, stages: Sequence[str] = STAGES, dataset=None, only: Sequence[str] | None = None
) -> dict[str, Any]:
  """Runs the ablation ladder; returns the evaluation table (None without the evaluate stage).

  `only` restricts every stage to some methods (see `select_methods`), e.g.
  ("dense",) to produce a text baseline's results on a machine without the
  checkpoint: baselines depend on the corpus alone, so their results are reused
  by a later full run in the same workdir (or a copy of their results folder).
  """
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f"Unknown --stages {sorted(unknown)}; known: {STAGES}.")
  workdir = os.path.abspath(workdir)
  os.makedirs(os.path.join(workdir, "ladder", "results"), exist_ok=True)
  checkpointing.quiet_orbax_logging()
  variants, methods = ladder(config)
  methods = select_methods(methods, only)
  by_name = {v.name: v for v in variants}
  hess = sorted({(m.variant, m.hessian) for m in methods if m.hessian})
  used = [v for v in variants if any(m.variant == v.name for m in methods)]
  total = (
    (len(hess) if "hessian" in stages else 0)
    + (len(used) if "encode" in stages else 0)
    + (len(methods) if "retrieve" in stages else 0)
    + ("train" in stages)
    + ("evaluate" in stages)
  )
  log = _Log(total)
  if dataset is None:
    from trackstar_jax import data  # pylint: disable=g-import-not-at-top

    dataset = data.load_dataset(config, data_dir=workdir_lib.data_dir(config, workdir))

  if "train" in stages:
    step = checkpointing.latest_step(workdir)
    done = step is not None and step >= int(config.train.num_steps)
    if done:
      checkpointing.check_compatible(
        checkpointing.load_meta(workdir, step=step), config, workdir=workdir, dataset_fingerprint=dataset.fingerprint
      )
    log.run(
      "train",
      lambda: train_job.run(config, workdir, dataset=dataset),
      skip=done,
      why=f"checkpoint at step {step} >= train.num_steps",
    )
  needs_model = bool(used) and bool({"hessian", "encode", "retrieve"} & set(stages)) or "evaluate" in stages
  step = workdir_lib.checkpoint_step(config, workdir) if needs_model else None
  base = dict(step=step, workdir=workdir, corpus=dataset.fingerprint)

  def enc_key(v):
    c = variant_config(config, workdir, v)
    return _key(**base, encoder=checkpointing.config_to_dict(c.encoder), seq_len=c.seq_len)

  if "hessian" in stages:
    for vname, kind in hess:
      c = variant_config(config, workdir, by_name[vname], hessian=kind)
      key = _key(enc=enc_key(by_name[vname]), hessian=checkpointing.config_to_dict(c.hessian))
      path = c.hessian.path
      os.makedirs(os.path.dirname(path), exist_ok=True)

      def fit(c=c, path=path, key=key):
        fit_hessian_job.run(c, workdir, dataset=dataset)
        _stamp(path, key)

      log.run(f"fit_hessian {vname} R_{kind}", fit, skip=_is_current(path, key))

  if "encode" in stages:
    for v in used:
      c = variant_config(config, workdir, v)
      key = _key(enc=enc_key(v), store=checkpointing.config_to_dict(c.store))
      url = c.store.url

      def encode(c=c, url=url, key=key):
        started = _read_stamp(url)
        if started:
          if started.get("key") != key:  # an old variant's store: start over
            logging.info("pipeline: %s is stale (made from other inputs): re-encoding.", url)
            _remove(url)
        elif os.path.exists(url):
          _remove(url)  # no stamp: not ours / unknown provenance
        _stamp(url, key, complete=False)  # a restart resumes this store
        encode_job.run(c, workdir, dataset=dataset)
        _stamp(url, key, complete=True)

      current = _is_current(url, key) and _read_stamp(url).get("complete", False)
      log.run(f"encode {v.name} ({v.correction}, {v.d_in}x{v.d_out}/block)", encode, skip=current)

  results = {}
  skipped = {}
  if "retrieve" in stages or "evaluate" in stages:
    wanted = tuple(config.evaluate.baselines)
    # Text baselines depend on the corpus and queries alone (not the checkpoint or the workdir).
    text_key = lambda m: _key(
      corpus=dataset.fingerprint, kind=m.kind, k=int(config.retrieve.k), seed=int(config.evaluate.seed)
    )
    for m in methods:
      out = results_file(workdir, m)
      if m.kind != "gradient" and m.kind not in wanted:
        skipped[m.name] = f"not in config.evaluate.baselines={wanted}"
      elif m.kind == "dense" and not baselines.dense_available() and not _is_current(out, text_key(m)):
        skipped[m.name] = "optional packages not installed: pip install '.[dense]'"
      if m.name in skipped:
        if "retrieve" in stages:
          log.run(f"retrieve {m.name}", None, skip=True, why=skipped[m.name])
        continue
      results[m.name] = out
      if "retrieve" not in stages:
        continue
      if m.kind == "gradient":
        v = by_name[m.variant]
        c = variant_config(config, workdir, v, hessian=m.hessian, method=m)
        hkey = _key(enc=enc_key(v), hessian=checkpointing.config_to_dict(c.hessian)) if m.hessian else None
        key = _key(enc=enc_key(v), hessian=hkey, retrieve=checkpointing.config_to_dict(c.retrieve))
        fn = lambda c=c: retrieve_job.run(c, workdir, dataset=dataset)
      else:
        key = text_key(m)
        fn = lambda m=m, out=out: _baseline(m, out, config=config, dataset=dataset)

      def retrieve(fn=fn, out=out, key=key):
        fn()
        if mesh_lib.is_chief():
          results_lib.validate_results_file(out)
        _stamp(out, key)

      log.run(f"retrieve {m.name}", retrieve, skip=_is_current(out, key))

  table = None
  if "evaluate" in stages:
    prefix = os.path.join(workdir, "ablation")
    table = log.run(
      "evaluate",
      lambda: evaluate_job.run(
        config,
        workdir,
        results=results,
        output_prefix=prefix,
        dataset=dataset,
        skipped=skipped,
        compare=[p for p in comparisons(methods) if set(p) <= set(results)],
      ),
    )
    table["stage_seconds"] = log.times
    ablation.write_table(table, prefix)  # again, with the stage wall times (the evaluate stage's included)
    print(ablation.report_markdown(table), flush=True)
  logging.info("pipeline: stage times %s", {k: round(v, 1) for k, v in log.times.items()})
  return table


def _baseline(m: Method, out: str, *, config, dataset) -> None:
  """BM25 / dense / random results file with the dataset's metadata."""
  corpus, queries = list(dataset.corpus), list(dataset.queries)
  k = int(config.retrieve.k)
  if m.kind == "bm25":
    lines = baselines.bm25_retrieve(corpus=corpus, queries=queries, k=k)
  elif m.kind == "dense":
    lines = baselines.dense_retrieve(corpus=corpus, queries=queries, k=k)
  elif m.kind == "random":
    lines = baselines.random_retrieve(corpus=corpus, queries=queries, k=k, seed=int(config.evaluate.seed))
  else:
    raise ValueError(f"Unknown baseline kind {m.kind!r}.")
  if not mesh_lib.is_chief():
    return
  results_lib.write_results(
    out,
    lines,
    metadata=dict(dataset=dataset.name, fingerprint=dataset.fingerprint, num_examples=len(corpus), method=m.name, k=k),
  )
