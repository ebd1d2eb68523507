"""Box-Muller from IEEE-exact operations only: the float64 ``-2 log u``, ``sqrt`` and
``cos``/``sin`` :mod:`pfa_fx.counter_rng` turns Philox words into Gaussians with, the same bits on
every backend (module docstring of :mod:`pfa_fx.counter_rng`: why, and how each is computed)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# fdlibm e_log.c (Sun Microsystems, 1993; "Permission to use, copy, modify, and distribute this
# software is freely granted, provided that this notice is preserved.")
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
# fdlibm k_sin.c, k_cos.c (same notice)
_S1 = -1.66666666666666324348e-01
_S2 = 8.33333333332248946124e-03
_S3 = -1.98412698298579493134e-04
_S4 = 2.75573137070700676789e-06
_S5 = -2.50507602534068634195e-08
_S6 = 1.58969099521155010221e-10
_C1 = 4.16666666666666019037e-02
_C2 = -1.38888888888741095749e-03
_C3 = 2.48015872894767294178e-05
_C4 = -2.75573143513906633035e-07
_C5 = 2.08757232129817482790e-09
_C6 = -1.13596475577881948265e-11

_MANT = (1 << 52) - 1
_SQRT2_MANT = 0x6A09E667F3BCD  # mantissa bits of sqrt(2)
_RSQRT_MAGIC = 0x5FE6EB50C7B537A9  # 1/sqrt start for float64 (Lomont); max relative error 3.4 %
_OCT_BITS = 29  # 32-bit angle word: 3 octant bits, 29 offset bits
_OCT_MASK = (1 << _OCT_BITS) - 1
_ANGLE_SCALE = math.pi / 2.0**31  # (pi / 4) / 2**29: offset units to radians


def _bits(x: Tensor) -> Tensor:
    return x.view(torch.int64)


def _float(bits: Tensor) -> Tensor:
    return bits.view(torch.float64)


def _neg2log(w: Tensor) -> Tensor:
    """``-2 log u`` for ``u = (w + 1/2) / 2**32``, ``w`` a 32-bit word (int64): fdlibm's log."""
    bits = _bits((2 * w + 1).to(torch.float64))  # u = m 2**-33, m odd and < 2**33: exact
    mant = bits & _MANT
    big = (mant >= _SQRT2_MANT).to(torch.int64)  # mantissa >= sqrt(2): halve it, bump k
    k = (bits >> 52) + big - (1023 + 33)
    f = _float(mant | ((1023 - big) << 52)) - 1.0  # 1 + f in [sqrt(1/2), sqrt(2)); exact
    s = f / (f + 2.0)
    z = s * s
    w2 = z * z
    t1 = w2 * (_LG2 + w2 * (_LG4 + w2 * _LG6))
    t2 = z * (_LG1 + w2 * (_LG3 + w2 * (_LG5 + w2 * _LG7)))
    hfsq = 0.5 * f * f
    dk = k.to(torch.float64)
    log_u = dk * _LN2_HI - ((hfsq - (s * (hfsq + (t2 + t1)) + dk * _LN2_LO)) - f)
    return log_u * -2.0


def _sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x`` in ``[1e-10, 50]`` to about 1 ulp: Newton on ``1/sqrt`` (multiplies only)."""
    y = _float(_RSQRT_MAGIC - (_bits(x) >> 1))
    hx = 0.5 * x
    for _ in range(4):  # relative error 3.4e-2 -> 1.8e-3 -> 4.6e-6 -> 3e-11 -> 1e-21
        y = y * (1.5 - hx * y * y)
    return x * y


def _cos_sin(w: Tensor) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``theta = 2 pi (w + 1/2) / 2**32`` (``w`` a 32-bit word, int64),
    reduced to ``[0, pi/4]`` exactly in integers, then fdlibm's kernels."""
    octant = w >> _OCT_BITS
    odd = octant & 1
    offset = (w & _OCT_MASK) ^ (odd * _OCT_MASK)  # odd octants: pi/4 - offset, i.e. 2**29-1 - r
    x = (offset.to(torch.float64) + 0.5) * _ANGLE_SCALE
    z = x * x
    w2 = z * z
    r = _S2 + z * (_S3 + z * _S4) + z * w2 * (_S5 + z * _S6)
    sin_x = x + z * x * (_S1 + z * r)
    r = z * (_C1 + z * (_C2 + z * _C3)) + w2 * w2 * (_C4 + z * (_C5 + z * _C6))
    hz = 0.5 * z
    one_hz = 1.0 - hz
    cos_x = one_hz + (((1.0 - one_hz) - hz) + z * r)
    quadrant = octant >> 1
    swap = ((quadrant ^ octant) & 1).bool()  # odd octant xor odd quadrant: cos <-> sin
    c = torch.where(swap, sin_x, cos_x)
    s = torch.where(swap, cos_x, sin_x)
    c = torch.where(((quadrant ^ (quadrant >> 1)) & 1).bool(), -c, c)  # quadrants 1, 2
    s = torch.where((quadrant >> 1).bool(), -s, s)  # quadrants 2, 3
    return c, s


def box_muller(w_radius: Tensor, w_angle: Tensor) -> tuple[Tensor, Tensor]:
    r = _sqrt(_neg2log(w_radius))
    c, s = _cos_sin(w_angle)
    return r * c, r * s
