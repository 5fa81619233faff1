"""Compact encodings: int8 / int4 codes with float32 scales (the store's quantized dtypes).

  q = quantize(phi, "int8")                       # Quantized(codes [N, d] int8, scale [N, 1] float32)
  phi_hat = dequantize(q.codes, q.scale, "int8", dim=d)   # float32 [N, d]
  quantize(phi, "int4", xp=jnp)                   # the same code on a device (jit it), e.g. before the copy
                                                  # to the host; retrieval dequantizes on the device

Symmetric, round to nearest (half to even), one scale per row (int8) or per
group of `INT4_GROUP` columns (int4):

  scale = absmax * fl32(1 / QMAX),   code = rint(x * fl32(1 / scale)) in [-QMAX, QMAX],   x_hat = code * scale

so |x - x_hat| <= scale / 2 elementwise (up to float32 rounding of x / scale). An all-zero row (group) has scale 0
and codes 0, so it decodes to exact zeros; one with a non-finite value has a
non-finite scale and decodes to NaN (a float store keeps it non-finite too).

Sizes per row of d columns: bfloat16 2d bytes; int8 d + 4 (2x smaller);
int4 ceil(d / 2) + 4 ceil(d / 128): two codes per byte (uint8, low nibble =
even column, high nibble = odd column, each code + 8), 4.25 bits per element,
3.8x smaller than bfloat16.

Why int4 in groups, and not a PCA of phi. A row's absmax at d = 2^16 is ~4.5
standard deviations (Gaussian-like projected gradients), so per-row 4-bit steps
would be 0.64 sigma; a group of 128 has absmax ~2.7 sigma (steps 0.39 sigma)
for 4 bytes of scale per 64 bytes of codes. A PCA reduction fitted on a sample
keeps the high-variance directions, while TrackStar's R^{-1/2} up-weights
exactly the low-variance ones; the codes here are task independent (no basis
to fit, record or refit) and every row is coded alone (streamable, resumable).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

QUANTIZED = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
INT4_GROUP = 128  # columns per int4 scale (a row's last group may be shorter)
_OFFSET = 8  # int4 code c is stored as the nibble c + 8 in [1, 15]


class Quantized(NamedTuple):
  """Codes and scales of rows (a pytree: jax maps over both)."""

  codes: Any  # [n, d] int8 (int8), [n, ceil(d / 2)] uint8 (int4: two codes per byte)
  scale: Any  # [n, groups] float32


class Layout(NamedTuple):
  """How a dtype stores a row of `dim` values: the codes array's dtype and width, and the scales' width."""

  codes_dtype: str
  codes_cols: int
  scale_cols: int  # 0: no scales (a float dtype)

  @property
  def row_bytes(self) -> int:
    return self.codes_cols * _ITEMSIZE[self.codes_dtype] + 4 * self.scale_cols


_ITEMSIZE = {"bfloat16": 2, "float32": 4, "int8": 1, "uint8": 1}


def is_quantized(dtype: str) -> bool:
  return dtype in QUANTIZED


def _group(dtype: str, dim: int) -> int:
  return INT4_GROUP if dtype == "int4" else dim


def layout(dtype: str, dim: int) -> Layout:
  """The stored layout of a row of `dim` values in `dtype` (bfloat16 | float32 | int8 | int4)."""
  if dtype == "int8":
    return Layout("int8", dim, 1)
  if dtype == "int4":
    return Layout("uint8", -(-dim // 2), -(-dim // INT4_GROUP))
  if dtype in ("bfloat16", "float32"):
    return Layout(dtype, dim, 0)
  raise ValueError(f"Unknown store dtype {dtype!r}: expected bfloat16, float32, {' or '.join(QUANTIZED)}.")


def _grouped(x, g: int, xp):
  """[n, d] -> [n, ceil(d / g), g], zero-padded."""
  n, d = x.shape
  ng = -(-d // g)
  if ng * g != d:
    x = xp.pad(x, ((0, 0), (0, ng * g - d)))
  return x.reshape(n, ng, g)


def quantize(x, dtype: str, *, xp: Any = np) -> Quantized:
  """Codes and scales of float rows x [n, d] (numpy, or jax.numpy with `xp=jnp`: same arithmetic)."""
  if dtype not in QUANTIZED:
    raise ValueError(f"quantize: dtype must be one of {QUANTIZED}, got {dtype!r}.")
  x = xp.asarray(x).astype(xp.float32)
  if x.ndim != 2:
    raise ValueError(f"quantize needs rows [n, d], got shape {x.shape}.")
  n, d = x.shape
  qmax = QMAX[dtype]
  xg = _grouped(x, _group(dtype, d), xp)
  # A product with the float32 constant 1 / QMAX, not a division: XLA rewrites division by a constant so,
  # and numpy then computes the same scales bit for bit.
  scale = xp.max(xp.abs(xg), axis=-1) * np.float32(1 / qmax)
  ok = xp.isfinite(scale) & (scale > 0)
  # x * (1 / scale), not x / scale: XLA rewrites a division by a broadcast so, and numpy then rounds the
  # same values to the same codes (a division would differ at a few exact halves in a million).
  inv = (xp.float32(1) / xp.where(ok, scale, xp.float32(1)))[..., None]
  codes = xp.where(ok[..., None], xp.clip(xp.rint(xg * inv), -qmax, qmax), 0).astype(xp.int8)
  codes = codes.reshape(n, xg.shape[1] * xg.shape[2])[:, :d]
  scale = scale.astype(xp.float32)
  if dtype == "int8":
    return Quantized(codes, scale)
  u = (codes + _OFFSET).astype(xp.uint8)
  if d % 2:
    u = xp.pad(u, ((0, 0), (0, 1)), constant_values=_OFFSET)
  return Quantized((u[:, 0::2] | (u[:, 1::2] << 4)).astype(xp.uint8), scale)


def unpack_int4(packed, dim: int, *, xp: Any = np):
  """uint8 [n, ceil(dim / 2)] -> int8 codes [n, dim]."""
  lo = (packed & 15).astype(xp.int8) - _OFFSET
  hi = (packed >> 4).astype(xp.int8) - _OFFSET
  return xp.stack([lo, hi], axis=-1).reshape(packed.shape[0], 2 * packed.shape[1])[:, :dim]


def dequantize(codes, scale, dtype: str, *, dim: int, xp: Any = np):
  """float32 [n, dim] of stored codes and scales (numpy, or jax.numpy inside a jitted step)."""
  if dtype not in QUANTIZED:
    raise ValueError(f"dequantize: dtype must be one of {QUANTIZED}, got {dtype!r}.")
  c = unpack_int4(codes, dim, xp=xp) if dtype == "int4" else codes
  n = c.shape[0]
  cg = _grouped(c.astype(xp.float32), _group(dtype, dim), xp)
  return (cg * scale.astype(xp.float32)[..., None]).reshape(n, cg.shape[1] * cg.shape[2])[:, :dim]
