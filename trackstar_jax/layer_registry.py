"""Which linear layer types the encoder traces, and how it reads their calls.

The fused path (gradients.py) needs, for each call of a traced linear layer,
three things: the layer input x, the path of its kernel in the params tree,
and the call written as an einsum `x,kernel->y` (which kernel axes are
contracted with x, which are shared with it, which are outputs). A
`LayerType` says how to get them for one layer class; the registry maps
classes (or their dotted names, so that optional packages are never
imported) to layer types. Built in:

  flax.linen  Dense, DenseGeneral, Einsum           kernel param 'kernel'
  flax.nnx    Linear, LinearGeneral, Einsum         kernel param 'kernel' (registered once
                                                    flax.nnx is imported: no import cost for Linen)
  gemma.gm.nn Einsum (google-deepmind/gemma, Linen) kernel param `weight_name`
              ('w', 'gating_einsum', 'linear'), equation = first call argument

A subclass of a registered class is read like its base unless registered
itself; if it overrides `__call__`, the registered `__call__` it reaches
through super() is the traced call (its own code around it is ordinary model
code), and if it never calls it, its kernel is not traced (trace_layouts
says so). Register another layer type with `register_layer`: its `__call__`
must compute y = einsum(equation, x, kernel) [+ a bias over output axes].

Interception, while `intercept(paths=, on_call=)` is active:

* Linen: `flax.linen.intercept_methods` sees every module's `__call__`; the
  kernel path is the module's scope path + the kernel name.
* NNX: modules are plain Python objects without an interception hook, so the
  registered NNX classes' `__call__` are wrapped for the duration of the
  context (restored on exit; nothing of the user's module changes). A wrapped
  call is traced only inside `nnx_module_paths(root)`, which gives each
  module of `root`'s graph its attribute path (`blocks/0/attn/query`), the
  same path `nnx.split` / `nnx.to_pure_dict` give its params.

For every traced call `on_call(path, labels, x, y)` returns the layer output
(gradients.py passes it through its tap).

Public API:
  CallLabels(x, k, y); equation_labels(equation, *, x_ndim, name) -> CallLabels
  LayerType(kernel_name=, read=, compute_dtype=)
  register_layer(cls_or_dotted_name, layer_type); registered_names() -> [str]
  intercept(*, paths, on_call) -> context (yields the `Interception`: .seen types)
  nnx_module_paths(root) -> context
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import contextvars
import dataclasses
import functools
import sys
import threading
from typing import Any

import flax.linen as nn
import jax
import numpy as np

_POOL = "abcdefghijklmnopqrstuvwABCDEFGHIJKLMNOPQRSTUVW"  # 'Y'/'Z' are d_in/d_out of the taps


@dataclasses.dataclass(frozen=True)
class CallLabels:
  """einsum labels of one layer call: input x, kernel k, output y."""

  x: str
  k: str
  y: str

  @property
  def in_labels(self) -> str:  # kernel axes contracted with (or shared by) x
    return "".join(l for l in self.k if l in self.x)

  @property
  def out_labels(self) -> str:
    return "".join(l for l in self.k if l not in self.x)

  @property
  def in_axes(self) -> tuple[int, ...]:
    return tuple(i for i, l in enumerate(self.k) if l in self.x)


def equation_labels(equation: str, *, x_ndim: int, name: str) -> CallLabels:
  """Canonical labels of the call `equation` ('x,kernel->y', '...' allowed in x and y).

  Raises:
    ValueError: the call is not a per-example linear map of x (the first x
      axis must be the example axis and appear in y, every kernel axis must be
      contracted with x or appear in y), or the equation is malformed.
  """
  eq = equation.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"{name}: einsum {equation!r} needs two operands and an explicit output ('x,k->y').")
  lhs, out = eq.split("->")
  xs, ks = lhs.split(",")
  if "..." in ks:
    raise ValueError(f"{name}: an ellipsis in the kernel spec {equation!r} is not supported.")
  if "..." in xs:
    extra = "".join(c for c in _POOL if c not in eq)[: x_ndim - (len(xs) - 3)]
    xs, out = xs.replace("...", extra), out.replace("...", extra)
  mapping = {c: _POOL[i] for i, c in enumerate(dict.fromkeys(xs + ks + out))}
  labels = CallLabels(*("".join(mapping[c] for c in s) for s in (xs, ks, out)))
  ex = labels.x[0]
  bad = (
    ex in labels.k
    or ex not in labels.y
    or any(l not in labels.x + labels.y for l in labels.k)
    or any(l not in labels.k + labels.y for l in labels.x)
    or any(l not in labels.x + labels.k for l in labels.y)
    or any(len(set(s)) != len(s) for s in (labels.x, labels.k, labels.y))
    or not labels.out_labels
  )
  if bad:
    raise ValueError(
      f"{name}: call {labels} is not a per-example linear map (the first input axis must be the example axis,"
      " every kernel axis must be contracted with the input or appear in the output). Exclude it via"
      " encoder.param_regex or use reference_phi."
    )
  return labels


def general_equation(*, x_ndim: int, axis: tuple[int, ...], n_features: int) -> str:
  """The einsum of a DenseGeneral-like call: contract x's `axis`, append `n_features` output axes."""
  xl, fl = _POOL[:x_ndim], _POOL[x_ndim : x_ndim + n_features]
  kept = "".join(l for i, l in enumerate(xl) if i not in axis)
  return f"{xl},{''.join(xl[a] for a in axis)}{fl}->{kept}{fl}"


@dataclasses.dataclass(frozen=True)
class LayerType:
  """How the encoder reads the calls of one linear layer class.

  Attributes:
    kernel_name: module -> name of its kernel parameter (path component).
    read: (module, args, kwargs) of a `__call__` -> (x, 'x,kernel->y' einsum).
    compute_dtype: module -> dtype x is cast to before the layer's matmul
      (None: x as given).
  """

  kernel_name: Callable[[Any], str]
  read: Callable[[Any, tuple, dict], tuple[jax.Array, str]]
  compute_dtype: Callable[[Any], Any] = lambda module: getattr(module, "dtype", None)


def _arg(args, kwargs, index: int, name: str, default: Any = None) -> Any:
  if len(args) > index:
    return args[index]
  return kwargs.get(name, default)


def _dense(module, args, kwargs):
  x = _arg(args, kwargs, 0, "inputs")
  return x, "...i,io->...o"


def _linen_dense_general(module, args, kwargs):
  x = _arg(args, kwargs, 0, "inputs")
  if tuple(np.atleast_1d(module.batch_dims)):
    raise ValueError(
      f"DenseGeneral {module.scope.path}: batch_dims is not supported; exclude it via encoder.param_regex."
    )
  axis = tuple(sorted(int(a) % x.ndim for a in np.atleast_1d(module.axis)))
  return x, general_equation(x_ndim=x.ndim, axis=axis, n_features=len(np.atleast_1d(module.features)))


def _linen_einsum(module, args, kwargs):
  return _arg(args, kwargs, 0, "inputs"), _arg(args, kwargs, 1, "einsum_str") or module.einsum_str


def _nnx_linear_general(module, args, kwargs):
  x = _arg(args, kwargs, 0, "inputs")
  if module.batch_axis:
    raise ValueError(
      f"nnx.LinearGeneral with batch_axis={dict(module.batch_axis)} is not supported; exclude it"
      " via encoder.param_regex."
    )
  axis = tuple(sorted(int(a) % x.ndim for a in np.atleast_1d(module.axis)))
  return x, general_equation(x_ndim=x.ndim, axis=axis, n_features=len(module.out_features))


def _nnx_einsum(module, args, kwargs):
  return _arg(args, kwargs, 0, "inputs"), _arg(args, kwargs, 1, "einsum_str") or module.einsum_str


def _gemma_einsum(module, args, kwargs):  # gemma.gm.nn.Einsum.__call__(self, eqn, x)
  return _arg(args, kwargs, 1, "x"), _arg(args, kwargs, 0, "eqn")


_KERNEL = lambda module: "kernel"
_REGISTRY: dict[str, LayerType] = {}
_CLASSES: dict[str, type] = {}  # dotted name -> class, for registrations by class


def _dotted(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(cls: type | str, layer_type: LayerType) -> None:
  """Traces the layers of class `cls` (a class, or its 'package.module.QualName').

  A dotted name does not import the package: the rule applies once its
  modules are in use. Re-registering a class replaces its rule.
  """
  name = cls if isinstance(cls, str) else _dotted(cls)
  if not isinstance(cls, str):
    _CLASSES[name] = cls
  _REGISTRY[name] = layer_type


def registered_names() -> list[str]:
  _register_nnx_builtins()
  return sorted(_REGISTRY)


def _nnx() -> Any:
  """flax.nnx if this process uses it, else None: Linen users do not pay its import."""
  return sys.modules.get("flax.nnx")


_NNX_BUILTINS_DONE = False


def _register_nnx_builtins() -> None:
  """Registers the NNX layers once flax.nnx is imported (no NNX module can exist before)."""
  global _NNX_BUILTINS_DONE
  nnx = _nnx()
  if _NNX_BUILTINS_DONE or nnx is None:
    return
  _NNX_BUILTINS_DONE = True
  for cls, read in ((nnx.Linear, _dense), (nnx.LinearGeneral, _nnx_linear_general), (nnx.Einsum, _nnx_einsum)):
    if _dotted(cls) not in _REGISTRY:  # a user's own rule for it stays
      register_layer(cls, LayerType(_KERNEL, read))


register_layer(nn.Dense, LayerType(_KERNEL, _dense))
register_layer(nn.DenseGeneral, LayerType(_KERNEL, _linen_dense_general))
register_layer(nn.Einsum, LayerType(_KERNEL, _linen_einsum))
# gemma's Einsum keeps its weight in the param `weight_name` and casts nothing
# (its `dtype` is the param dtype; jnp.einsum promotes).
register_layer(
  "gemma.gm.nn._layers.Einsum",
  LayerType(lambda module: module.weight_name, _gemma_einsum, compute_dtype=lambda module: None),
)


def lookup(cls: type) -> LayerType | None:
  """The rule of `cls` or of its nearest registered base class."""
  _register_nnx_builtins()
  for base in cls.__mro__:
    rule = _REGISTRY.get(_dotted(base))
    if rule is not None:
      return rule
  return None


def _resolve(name: str) -> type | None:
  """The class of a dotted name if its module is already imported (never imports)."""
  if name in _CLASSES:
    return _CLASSES[name]
  module_name, _, qualname = name.rpartition(".")
  while module_name and module_name not in sys.modules:  # nested qualnames: 'pkg.mod.Outer.Inner'
    module_name, _, head = module_name.rpartition(".")
    qualname = f"{head}.{qualname}"
  obj = sys.modules.get(module_name)
  for part in qualname.split(".") if obj is not None else ():
    obj = getattr(obj, part, None)
  return obj if isinstance(obj, type) else None


@dataclasses.dataclass
class Interception:
  """State of one `intercept` context."""

  paths: frozenset[str]
  on_call: Callable[[str, CallLabels, jax.Array, jax.Array], jax.Array]
  seen: dict[str, None] = dataclasses.field(default_factory=dict)  # module types met, in order

  def see(self, module: Any) -> None:
    self.seen.setdefault(_dotted(type(module)))


_ACTIVE: contextvars.ContextVar[Interception | None] = contextvars.ContextVar("trackstar_interception", default=None)
_NNX_PATHS: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar("trackstar_nnx_paths", default=None)
# Per module id, inside its call: "tapped" (a traced call: nested calls of the same
# module, e.g. a registered base's __call__ via super(), pass through) or
# "pending" (a subclass's own __call__, which is not a registered einsum: the
# registered base's __call__ it reaches via super() is the one traced).
_IN_CALL: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar("trackstar_in_call", default=None)


def _join(module_path, kernel_name: str) -> str:
  return "/".join([str(p) for p in module_path if str(p)] + [kernel_name])


def _marked(module: Any, state: str, fun: Callable) -> Callable:
  def run(*args, **kwargs):
    token = _IN_CALL.set({**(_IN_CALL.get() or {}), id(module): state})
    try:
      return fun(*args, **kwargs)
    finally:
      _IN_CALL.reset(token)

  return run


def _own_call_registered(cls: type) -> bool:
  """Whether the `__call__` that `cls` runs is defined by a registered class."""
  for base in cls.__mro__:
    if "__call__" in base.__dict__:
      return _dotted(base) in _REGISTRY
  return False


def _traced_call(rule: LayerType, module: Any, path: str, args, kwargs, next_fun, active: Interception):
  if path not in active.paths:
    return next_fun(*args, **kwargs)
  x, equation = rule.read(module, args, kwargs)
  name = f"{type(module).__name__} {path!r}"
  if np.ndim(x) < 2:
    raise ValueError(f"{name}: input of shape {np.shape(x)} has no leading example axis.")
  labels = equation_labels(equation, x_ndim=x.ndim, name=name)
  dtype = rule.compute_dtype(module)
  if dtype is not None:
    x = x.astype(dtype)
  y = _marked(module, "tapped", next_fun)(*args, **kwargs)
  return active.on_call(path, labels, x, y)


def _linen_interceptor(active: Interception):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    active.see(module)
    rule = lookup(type(module))
    state = (_IN_CALL.get() or {}).get(id(module))
    if rule is None or state == "tapped":
      return next_fun(*args, **kwargs)
    if state is None and not _own_call_registered(type(module)):
      return _marked(module, "pending", next_fun)(*args, **kwargs)
    path = _join(module.scope.path, rule.kernel_name(module))
    return _traced_call(rule, module, path, args, kwargs, next_fun, active)

  return interceptor


def _nnx_wrapper(rule: LayerType, original: Callable) -> Callable:
  """The `__call__` of a registered NNX class while `intercept` is active.

  Only registered classes are wrapped, so a subclass's own `__call__` is not
  traced, and the registered `__call__` it reaches through super() is.
  """

  @functools.wraps(original)
  def __call__(self, *args, **kwargs):
    active, paths = _ACTIVE.get(), _NNX_PATHS.get()
    if active is None or paths is None or id(self) not in paths or (_IN_CALL.get() or {}).get(id(self)) == "tapped":
      return original(self, *args, **kwargs)
    path = _join((paths[id(self)],), rule.kernel_name(self))
    return _traced_call(rule, self, path, args, kwargs, functools.partial(original, self), active)

  __call__.trackstar_original = original
  return __call__


_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = 0
_PATCHED: list[tuple[type, Any]] = []  # (class, its own __call__ or None), to restore


def _patch_nnx() -> None:
  global _PATCH_DEPTH
  with _PATCH_LOCK:
    _PATCH_DEPTH += 1
    nnx = _nnx()
    if _PATCH_DEPTH > 1 or nnx is None:
      return
    _register_nnx_builtins()
    for name, rule in _REGISTRY.items():
      cls = _resolve(name)
      if cls is None or not issubclass(cls, nnx.Module):
        continue
      _PATCHED.append((cls, cls.__dict__.get("__call__")))
      cls.__call__ = _nnx_wrapper(rule, cls.__call__)


def _unpatch_nnx() -> None:
  global _PATCH_DEPTH
  with _PATCH_LOCK:
    _PATCH_DEPTH -= 1
    if _PATCH_DEPTH:
      return
    while _PATCHED:
      cls, own = _PATCHED.pop()
      if own is None:
        del cls.__call__
      else:
        cls.__call__ = own


@contextlib.contextmanager
def intercept(
  *, paths: set[str] | frozenset[str], on_call: Callable[[str, CallLabels, jax.Array, jax.Array], jax.Array]
) -> Iterator[Interception]:
  """Routes every call of a registered layer whose kernel path is in `paths` through `on_call`.

  `on_call(path, labels, x, y)` gets the kernel path, the call's labels, the
  input (cast to the layer's compute dtype) and the output, and returns the
  output to use. Paths are canonical (no `params/` prefix).
  """
  active = Interception(frozenset(paths), on_call)
  token = _ACTIVE.set(active)
  _patch_nnx()
  try:
    with nn.intercept_methods(_linen_interceptor(active)):
      yield active
  finally:
    _unpatch_nnx()
    _ACTIVE.reset(token)


@contextlib.contextmanager
def nnx_module_paths(root: Any) -> Iterator[None]:
  """Makes the NNX layers of `root`'s graph traceable, by their attribute paths.

  Wrap the call of a merged NNX model in it (`nnx_adapter.functional` does):
  inside, a registered NNX layer at `root.blocks[0].attn.query` has kernel
  path `blocks/0/attn/query/kernel`.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top  (the caller has an NNX module: imported)

  paths, active = {}, _ACTIVE.get()
  for path, node in nnx.iter_graph(root):
    if isinstance(node, nnx.Module) and id(node) not in paths:
      paths[id(node)] = "/".join(str(p) for p in path)
      if active is not None:
        active.see(node)
  token = _NNX_PATHS.set(paths)
  try:
    yield
  finally:
    _NNX_PATHS.reset(token)
