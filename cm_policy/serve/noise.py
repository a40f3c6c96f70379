"""torch's seeded CPU noise, drawn with numpy: ``torch.randn(shape, generator=g)`` without torch.

The ONNX backend serves without torch, yet a seeded request must get the noise that the torch
backend (and the in-process :class:`~cm_policy.policy.Policy`) draws from
``torch.Generator().manual_seed(seed)``. :class:`TorchGenerator` reproduces that draw:

- the stream: torch's CPU generator is a 32-bit Mersenne Twister (MT19937) seeded with the low 32
  bits of the seed, the standard initialisation, which numpy's ``MT19937`` shares (through
  ``RandomState``'s legacy seeding);
- uniforms: the low 24 bits of one 32-bit output times 2^-24 (float32);
- normals (float32 tensors of 16 values or more, torch's case for action chunks): Box-Muller on
  blocks of 16 uniforms (``u1 = 1 - u[j]``, ``u2 = u[j + 8]``), in float32 with the Cephes
  polynomials of torch's AVX2 kernel (``avx_mathfun.h``), the multiply-adds fused as the compiled
  kernel fuses them; a size that is not a multiple of 16 redraws the last 16 values;
- fewer than 16 values: float64 Box-Muller (``log1p``, ``cos``; the ``sin`` value is kept for the
  next draw) from 53-bit uniforms, rounded to float32, as torch's serial kernel does.

On x86 CPUs where torch runs its AVX2 kernels (``torch.backends.cpu.get_cpu_capability()``
``"AVX2"``) the draws are bitwise torch's (``tests/test_export.py`` checks it); where torch picks
other kernels (AVX-512, ARM), torch's own seeded noise differs from its AVX2 noise by a few
float32 units in the last place, and so does this one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

F = np.float32
# Cephes log: polynomial coefficients and ln 2 split in two (avx_mathfun.h).
LOG_P = [F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1)]
LOG_P += [F(c) for c in (1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1)]
LOG_P += [F(3.3333331174e-1)]
LOG_Q1, LOG_Q2 = F(-2.12194440e-4), F(0.693359375)
SQRT_HALF = F(0.707106781186547524)
# Cephes sin/cos: pi/4 split in three, polynomials, 4/pi.
MINUS_DP = (F(-0.78515625), F(-2.4187564849853515625e-4), F(-3.77489497744594108e-8))
SIN_P = (F(-1.9515295891e-4), F(8.3321608736e-3), F(-1.6666654611e-1))
COS_P = (F(2.443315711809948e-005), F(-1.388731625493765e-003), F(4.166664568298827e-002))
FOUR_OVER_PI = F(1.27323954473516)
TWO_PI = F(2.0 * math.pi)
MIN_NORMAL = np.array([0x00800000], np.int32).view(F)[0]
HALF_BITS = np.array([0.5], F).view(np.int32)[0]


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 a * b + c with one rounding (the float64 product of two float32s is exact)."""
    return (np.asarray(a, np.float64) * np.float64(b) + np.asarray(c, np.float64)).astype(F)


def _log(x: np.ndarray) -> np.ndarray:
    """log of positive float32s as torch's AVX2 ``log256_ps``."""
    bits = np.maximum(x, MIN_NORMAL).view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(F) + F(1)
    x = ((bits & ~0x7F800000) | HALF_BITS).view(F)  # the mantissa, in [0.5, 1)
    small = x < SQRT_HALF
    x = (x - F(1)) + np.where(small, x, F(0))
    e = e - np.where(small, F(1), F(0))
    z = x * x
    y = np.full_like(x, LOG_P[0])
    for p in LOG_P[1:]:
        y = _fma(y, x, p)
    y = _fma(y * x, z, e * LOG_Q1)
    y = y - z * F(0.5)
    return (x + y) + e * LOG_Q2


def _sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of float32s as torch's AVX2 ``sincos256_ps``."""
    negative = np.signbit(x)
    x = np.abs(x)
    j = ((x * FOUR_OVER_PI).astype(np.int32) + 1) & ~1
    y = j.astype(F)
    sin_flip = negative ^ ((j & 4) != 0)
    cos_flip = (~(j - 2) & 4) != 0
    sin_poly = (j & 2) == 0  # which polynomial gives the sine
    for dp in MINUS_DP:
        x = _fma(y, dp, x)
    z = x * x
    c = _fma(_fma(COS_P[0], z, COS_P[1]), z, COS_P[2])
    c = _fma(c * z, z, -(z * F(0.5))) + F(1)
    s = _fma(_fma(SIN_P[0], z, SIN_P[1]), z, SIN_P[2])
    s = _fma(s * z, x, x)
    sin = np.where(sin_poly, s, c)
    cos = np.where(sin_poly, c, s)
    return np.where(sin_flip, -sin, sin), np.where(cos_flip, -cos, cos)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """Normals from uniforms (n, 16), block by block as torch's ``normal_fill_16_AVX2``."""
    radius = np.sqrt(F(-2) * _log(F(1) - u[:, :8]))
    sin, cos = _sincos(TWO_PI * u[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1)


class TorchGenerator:
    """A numpy stand-in for ``torch.Generator().manual_seed(seed)`` (CPU) whose :meth:`randn`
    draws the float32 values that ``torch.randn(shape, generator=...)`` draws."""

    def __init__(self, seed: int = 67280421310721):
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> TorchGenerator:
        legacy = np.random.RandomState(int(seed) & 0xFFFFFFFF)
        self._bits = np.random.MT19937()
        self._bits.state = legacy.get_state(legacy=False)
        self._cached_normal: float | None = None
        return self

    def _raw(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint32)

    def _uniform32(self, n: int) -> np.ndarray:
        return (self._raw(n) & 0xFFFFFF).astype(F) * F(2.0**-24)

    def _normal64(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        words = self._raw(4).astype(np.uint64)
        u1, u2 = (
            float(((hi << np.uint64(32)) | lo) & np.uint64(2**53 - 1)) * 2.0**-53
            for hi, lo in (words[:2], words[2:])
        )
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """Standard normal float32 noise of ``shape``, as torch draws it from this generator."""
        shape = tuple(int(d) for d in shape)
        size = math.prod(shape)
        if size < 16:
            return np.array([self._normal64() for _ in range(size)], F).reshape(shape)
        u = self._uniform32(size)
        blocks = size // 16
        out = np.empty(size, F)
        out[: blocks * 16] = _box_muller_16(u[: blocks * 16].reshape(blocks, 16)).ravel()
        if size % 16:
            out[size - 16 :] = _box_muller_16(self._uniform32(16).reshape(1, 16)).ravel()
        return out.reshape(shape)


def torch_randn(shape: Sequence[int], seed: int) -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` (CPU), in numpy."""
    return TorchGenerator(seed).randn(shape)
