"""Option dataclasses: the one place each default lives, readable from a ConfigDict.

Each library stage declares its options as a frozen dataclass beside its code
(`encoder.EncoderOptions`, `hessian.HessianOptions`, `optim.OptimizerOptions`).
`configs.base_config` builds the matching config sections from those
dataclasses, and jobs turn a section back into options with `from_config`, so a
default is written once and a config section and a keyword argument can never
disagree.

  opts = from_config(EncoderOptions, config.encoder, ignore=("batch_size", "step"))
  opts = dataclasses.replace(opts, d_in=32)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
import difflib
from typing import Any, TypeVar

T = TypeVar("T")


def _as_dict(config: Any) -> dict[str, Any]:
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    return dict(config.to_dict())
  return dict(config)


def check_known(values: Mapping[str, Any], known: Iterable[str], *, what: str) -> None:
  """Raises ValueError naming each unknown key with the closest known one."""
  known = sorted(known)
  unknown = sorted(set(values) - set(known))
  if not unknown:
    return
  hints = []
  for key in unknown:
    close = difflib.get_close_matches(key, known, n=1)
    hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
  raise ValueError(f"Unknown {what} option(s): {', '.join(hints)}. Known: {known}.")


def from_config(cls: type[T], config: Any = None, *, ignore: Iterable[str] = (), **overrides) -> T:
  """`cls` from a ConfigDict / mapping (missing keys keep their defaults) and keyword overrides.

  Keys that are neither fields of `cls` nor in `ignore` (job-level fields of
  the same config section) raise a ValueError with "did you mean".
  """
  names = {f.name for f in dataclasses.fields(cls)}
  values = _as_dict(config)
  check_known(values, names | set(ignore), what=cls.__name__)
  check_known(overrides, names, what=cls.__name__)
  kwargs = {k: v for k, v in values.items() if k in names}
  kwargs.update(overrides)
  for f in dataclasses.fields(cls):  # ConfigDict lists arrive as lists: keep tuple fields tuples
    if f.name in kwargs and isinstance(f.default, tuple) and isinstance(kwargs[f.name], list):
      kwargs[f.name] = tuple(kwargs[f.name])
  return cls(**kwargs)


def defaults(cls: type) -> dict[str, Any]:
  """The fields of `cls` with their defaults, for building a config section."""
  return {f.name: f.default for f in dataclasses.fields(cls)}
