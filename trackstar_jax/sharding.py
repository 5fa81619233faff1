"""Model sharding from the config: parameter-path regex rules -> PartitionSpecs over the mesh axes.

  config.mesh = (("data", 2), ("model", 4))
  config.sharding.preset = "fsdp_tp"        # "" | fsdp | tp | fsdp_tp: rule sets for models.DecoderLM
  config.sharding.rules = ((r"mlp/wi/kernel$", (None, "model")),)   # searched before the preset's

  shardings = sharding.from_config(abstract_params, config, mesh)    # or param_shardings(tree, rules, mesh)
  opt_shardings = sharding.opt_state_shardings(abstract_opt_state, shardings, mesh)

A rule is (regex, spec): the regex is searched (`re.search`) in the
'/'-joined parameter path (`params/block_0/mlp/wi/kernel`), the spec has one
entry per leading parameter axis: a mesh axis name, a tuple of them, or None
(replicated along that axis); missing trailing entries are None. The first
matching rule wins; a parameter that no rule matches is replicated. Every
rule given in `rules` must be the first match of some parameter (a typo is an
error, not a silently replicated model); a preset's rules may go unused (the
untied `lm_head` of a tied model).

Presets (`PRESETS`, for `models.DecoderLM`; the batch is always split over
"data" only):
  fsdp      every weight matrix split over "data" along d_model (ZeRO-3 style:
            XLA gathers each layer's weights where it is used);
  tp        Megatron-style tensor parallelism over "model": attention heads,
            the MLP hidden axis, embeddings along d_model;
  fsdp_tp   both: every block matrix split over "data" x "model", embeddings
            over "model" (the preset for the 8B shape, where neither alone
            fits: `PRESETS["8b"]` is this one).

Optimizer state (`opt_state_shardings`): every leaf whose tree path ends in a
parameter's path is a moment of that parameter (Adam's mu/nu inside chains,
inject_hyperparams, masked, MultiSteps' accumulators, ...): same shape, same
sharding. Adafactor's factored moments (a parameter's shape without one axis)
keep the sharding of the axes they keep; counts and hyperparameters are
replicated.

Public API:
  PRESETS; normalize_rules(rules) -> ((regex, spec), ...)
  param_specs(tree, rules, *, preset="") -> pytree of PartitionSpec
  param_shardings(tree, rules, mesh, *, preset="") -> pytree of NamedSharding (validated)
  from_config(tree, config, mesh) -> pytree of NamedSharding (config.sharding; absent = replicated)
  opt_state_shardings(abstract_opt_state, param_shardings, mesh) -> pytree of NamedSharding
  with_shardings(tree, shardings) -> ShapeDtypeStructs carrying them; describe(tree) -> summary lines
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
import re
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trackstar_jax import optimizer_correction as oc
from trackstar_jax import projection

Spec = tuple[Any, ...]
Rule = tuple[str, Spec]

_QKV, _OUT = r"attn/(query|key|value)/kernel$", r"attn/out/kernel$"
_WI, _WO = r"mlp/wi/kernel$", r"mlp/wo/kernel$"
_EMBED, _HEAD = r"embed/embedding$", r"lm_head/kernel$"
# Kernel layouts of DecoderLM: query/key/value [D, H, Dh], out [H, Dh, D], wi [D, F], wo [F, D],
# embedding [V, D], lm_head [D, V]. d_model, heads and d_ff divide evenly in every model preset; the
# vocabulary (a tokenizer's size) need not, so no preset splits it.
PRESETS: dict[str, tuple[Rule, ...]] = {
  "fsdp": (
    (_QKV, ("data", None, None)),
    (_OUT, (None, None, "data")),
    (_WI, ("data", None)),
    (_WO, (None, "data")),
    (_EMBED, (None, "data")),
    (_HEAD, ("data", None)),
  ),
  "tp": (
    (_QKV, (None, "model", None)),
    (_OUT, ("model", None, None)),
    (_WI, (None, "model")),
    (_WO, ("model", None)),
    (_EMBED, (None, "model")),
    (_HEAD, ("model", None)),
  ),
  "fsdp_tp": (
    (_QKV, ("data", "model", None)),
    (_OUT, ("model", None, "data")),
    (_WI, ("data", "model")),
    (_WO, ("model", "data")),
    # Embeddings along d_model over "model" only: split over "data" too, the activations they produce would
    # be split along d_model over the devices that split the batch (XLA then rematerializes them in full).
    (_EMBED, (None, "model")),
    (_HEAD, ("model", None)),
  ),
}
PRESETS["8b"] = PRESETS["fsdp_tp"]


def _spec_entry(entry: Any, where: str) -> Any:
  if entry is None or isinstance(entry, str):
    return entry
  if isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
    return tuple(entry) if len(entry) != 1 else entry[0]
  raise ValueError(f"{where}: spec entry {entry!r} is not a mesh axis name, a tuple of them, or None.")


def normalize_rules(rules: Any) -> tuple[Rule, ...]:
  """((regex, spec), ...) with specs as tuples; accepts lists and a None/() for no rules.

  Raises:
    ValueError: a rule that is not a (regex string, spec tuple) pair, or a regex that does not compile.
  """
  out = []
  for i, rule in enumerate(rules or ()):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(
        f"Sharding rule {i} is {rule!r}: expected a pair (regex on the '/'-joined parameter path, spec), e.g."
        ' (r"mlp/wi/kernel$", (None, "model")).'
      )
    regex, spec = rule
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f"Sharding rule {i} regex {regex!r} does not compile: {e}.") from None
    if spec is None or isinstance(spec, str):
      spec = (spec,)
    if not isinstance(spec, (tuple, list)):
      raise ValueError(f"Sharding rule {i} ({regex!r}): spec {spec!r} is not a tuple of mesh axes / None.")
    out.append((regex, tuple(_spec_entry(e, f"Sharding rule {i} ({regex!r})") for e in spec)))
  return tuple(out)


def _preset_rules(preset: Any) -> tuple[Rule, ...]:
  if not preset:
    return ()
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"Unknown sharding preset {preset!r}; known: {sorted(PRESETS)} (or '' for none).")
    return PRESETS[preset]
  return normalize_rules(preset)


def _rule_name(rule: Rule, preset: str | None) -> str:
  where = f"preset {preset!r} rule" if preset is not None else "Sharding rule"
  return f"{where} ({rule[0]!r}, {rule[1]!r})"


def _paths_shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(projection.keypath_str(kp), tuple(getattr(leaf, "shape", ()))) for kp, leaf in leaves]


def _shown(paths: Sequence[str], n: int = 8) -> str:
  return ", ".join(paths[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _assign(tree: Any, rules: Any, preset: Any) -> list[tuple[str, tuple[int, ...], Rule | None, str | None]]:
  """Per leaf (path, shape, its rule or None, preset name or None for a user rule); checks unused user rules."""
  user = normalize_rules(rules)
  preset_name = preset if isinstance(preset, str) else "custom"
  tagged = [(r, None) for r in user] + [(r, preset_name) for r in _preset_rules(preset)]
  compiled = [re.compile(r[0]) for r, _ in tagged]
  leaves = _paths_shapes(tree)
  out, used = [], set()
  for path, shape in leaves:
    hit = next((i for i, rx in enumerate(compiled) if rx.search(path)), None)
    if hit is None:
      out.append((path, shape, None, None))
      continue
    used.add(hit)
    rule, origin = tagged[hit]
    if len(rule[1]) > len(shape):
      raise ValueError(
        f"{_rule_name(rule, origin)} has {len(rule[1])} spec entries but parameter {path!r} has shape {shape}"
        f" (rank {len(shape)}): give at most one entry per axis (a more specific regex can tell parameters apart)."
      )
    out.append((path, shape, rule, origin))
  paths = [p for p, _ in leaves]
  for i, (rule, origin) in enumerate(tagged):
    if origin is not None or i in used:
      continue
    matched = [p for p in paths if compiled[i].search(p)]
    if not matched:
      raise ValueError(
        f"{_rule_name(rule, None)} matches no parameter. Parameter paths ('/'-joined, searched with re.search):"
        f" {_shown(paths)}."
      )
    first = next(j for j, rx in enumerate(compiled) if rx.search(matched[0]))
    raise ValueError(
      f"{_rule_name(rule, None)} is never used: every parameter it matches ({_shown(matched, 4)}) is taken by the"
      f" earlier {_rule_name(*tagged[first])} (the first match wins): reorder or narrow the rules."
    )
  return out


def _full_spec(rule: Rule | None, rank: int) -> P:
  entries = tuple(rule[1]) if rule is not None else ()
  return P(*(entries + (None,) * (rank - len(entries))))


def param_specs(tree: Any, rules: Any, *, preset: Any = "") -> Any:
  """A PartitionSpec per leaf of `tree` (arrays or `jax.eval_shape` structs), one entry per axis.

  Args:
    tree: params (any pytree of arrays / ShapeDtypeStructs).
    rules: ((regex, spec), ...) searched in order before the preset's.
    preset: a `PRESETS` name, '' for none, or a rule tuple whose rules may go unused.

  Raises:
    ValueError: a rule that matches no parameter (or only ones an earlier rule takes), a spec with more
      entries than the parameter's rank, a malformed rule, an unknown preset.
  """
  specs = [_full_spec(rule, len(shape)) for _, shape, rule, _ in _assign(tree, rules, preset)]
  return jax.tree.unflatten(jax.tree.structure(tree), specs)


def _axis_sizes(entry: Any, mesh: Mesh) -> list[tuple[str, int]]:
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return [(n, mesh.shape[n]) for n in names]


def _check_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, *, what: str) -> None:
  """Raises if `spec` names an axis the mesh lacks, repeats one, or splits an axis unevenly."""
  seen = []
  for dim, entry in enumerate(spec):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    for name in names:
      if name not in mesh.shape:
        raise ValueError(
          f"{what} names mesh axis {name!r}, but the mesh has axes {dict(mesh.shape)} (config.mesh):"
          " add the axis to config.mesh or change the rule."
        )
      if name in seen:
        raise ValueError(f"{what} uses mesh axis {name!r} for two axes of the parameter (spec {spec}).")
      seen.append(name)
    size = math.prod(s for _, s in _axis_sizes(entry, mesh))
    if size > 1 and shape[dim] % size:
      axes = " x ".join(f"{n}={s}" for n, s in _axis_sizes(entry, mesh))
      raise ValueError(
        f"{what}: axis {dim} (size {shape[dim]}) of shape {shape} is split over mesh axis {entry!r} ({axes},"
        f" {size} shards), and {shape[dim]} is not divisible by {size}. Shard another axis, use None there,"
        " or change config.mesh."
      )


def param_shardings(tree: Any, rules: Any, mesh: Mesh, *, preset: Any = "") -> Any:
  """`param_specs` as NamedShardings on `mesh`, validated against the mesh.

  Raises:
    ValueError: everything `param_specs` raises, plus a spec naming an axis the mesh lacks (or one axis
      twice), and a parameter axis not divisible by the mesh axes it is split over; the message names the
      rule, the parameter, its shape, the axis and its size.
  """
  out = []
  for path, shape, rule, origin in _assign(tree, rules, preset):
    spec = _full_spec(rule, len(shape))
    if rule is not None:
      _check_spec(spec, shape, mesh, what=f"{_rule_name(rule, origin)} for parameter {path!r}")
    out.append(NamedSharding(mesh, spec))
  return jax.tree.unflatten(jax.tree.structure(tree), out)


def config_rules(config: Any) -> tuple[tuple[Rule, ...], str]:
  """(rules, preset) of `config.sharding` (none when the config has no such section)."""
  section = config.get("sharding") if isinstance(config, Mapping) or hasattr(config, "get") else None
  if not section:
    return (), ""
  return normalize_rules(section.get("rules", ())), str(section.get("preset", "") or "")


def is_sharded(config: Any) -> bool:
  """Whether `config.sharding` asks for anything other than replicated parameters."""
  rules, preset = config_rules(config)
  return bool(rules or preset)


def from_config(tree: Any, config: Any, mesh: Mesh) -> Any:
  """Parameter shardings of `config.sharding` (rules + preset) on `mesh`; replicated when unset."""
  rules, preset = config_rules(config)
  return param_shardings(tree, rules, mesh, preset=preset)


# ----------------------------------------------------------------------------
# Optimizer state.


def _leaf_info(leaf: Any) -> tuple[P, tuple[int, ...] | None]:
  """(full spec, shape or None) of a param-sharding leaf: a NamedSharding, or an array/struct carrying one."""
  if isinstance(leaf, NamedSharding):
    return leaf.spec, None
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding):
    shape = tuple(leaf.shape)
    return P(*(tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec)))), shape
  raise ValueError(
    f"param_shardings leaves must be NamedShardings (sharding.param_shardings) or arrays/ShapeDtypeStructs with"
    f" one (sharding.with_shardings), got {type(leaf).__name__}."
  )


def _key_names(keypath) -> tuple[str, ...]:
  return tuple(projection.keypath_str([k]) for k in keypath)


def _canonical(names: tuple[str, ...]) -> tuple[str, ...]:
  return names[1:] if names[:1] == ("params",) else names


def _factored_spec(spec: P, pshape: tuple[int, ...] | None, shape: tuple[int, ...], field: str) -> P | None:
  """The spec of a factored moment (the param's shape less one axis), or None when the dropped axis is unclear."""
  candidates = range(len(spec))
  if pshape is not None:
    if len(pshape) >= 2 and field in ("v_row", "v_col"):  # optax: v_row drops d0 (largest), v_col d1
      d1, d0 = oc.factored_dims(pshape)
      candidates = [d0 if field == "v_row" else d1]
    candidates = [i for i in candidates if pshape[:i] + pshape[i + 1 :] == shape]
  options = {tuple(e for d, e in enumerate(spec) if d != i) for i in candidates}
  return P(*options.pop()) if len(options) == 1 else None


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """NamedShardings for an optax state (abstract or real), its moments placed like their parameters.

  Args:
    abstract_opt_state: e.g. `jax.eval_shape(optimizer.init, abstract_params)`.
    param_shardings: the params' NamedShardings (`param_shardings`), or params / ShapeDtypeStructs carrying
      them (`with_shardings`): with shapes known, Adafactor's factored moments are sharded too (on the
      parameter axes they keep); from NamedShardings alone only when the dropped axis is unambiguous.
    mesh: the mesh (replicated leaves are placed on it).
  """
  index = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    index[_canonical(_key_names(kp))] = _leaf_info(leaf)
  replicated = NamedSharding(mesh, P())

  def one(kp, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    names = _key_names(kp)
    for k in range(len(names)):
      canon = _canonical(names[k:])
      if canon not in index:
        continue
      spec, pshape = index[canon]
      field = names[k - 1] if k else ""
      if len(shape) == len(spec) and (pshape is None or pshape == shape):
        return NamedSharding(mesh, spec)
      if len(shape) == len(spec) - 1 and shape:
        fspec = _factored_spec(spec, pshape, shape, field)
        if fspec is not None and _divides(fspec, shape, mesh):
          return NamedSharding(mesh, fspec)
      return replicated
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _divides(spec: P, shape: tuple[int, ...], mesh: Mesh) -> bool:
  return all(shape[d] % math.prod(s for _, s in _axis_sizes(e, mesh)) == 0 for d, e in enumerate(spec))


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (one Sharding or a matching pytree)."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def describe(tree: Any, shardings: Any) -> list[str]:
  """'path shape -> spec' lines of the sharded leaves (for logs), replicated ones counted in the last line."""
  lines, replicated = [], 0
  flat_s = jax.tree.leaves(shardings)
  for (path, shape), s in zip(_paths_shapes(tree), flat_s):
    if any(e is not None for e in s.spec):
      lines.append(f"{path} {shape} -> {tuple(s.spec)}")
    else:
      replicated += 1
  return lines + [f"{replicated} parameters replicated"]
