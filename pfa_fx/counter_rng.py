"""Counter-based Gaussian numbers: a pure function of ``(seed, stream, position)``.

Generator
    Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
    SC'11), the generator of cuRAND and JAX: ten rounds of two 32x32->64 multiplies and XORs that
    turn a 128-bit counter and a 64-bit key into four 32-bit words. It passes BigCrush with a
    margin (7 rounds already do), and any word is reached without computing the ones before it.
    That is what the feedback weights need: a backward that redraws a weight's fixed random
    feedback costs one pass over the weight, the draw of a slice (a rank's rows under FSDP2, a
    piece of a chunked draw) costs only that slice, and nothing is stored but the seed.

    The rounds are written with torch tensor ops only, in int64 emulating uint32, so that one
    function runs eagerly on the CPU and on CUDA and under ``torch.compile``: a 32x32 product is
    one int64 multiply that wraps modulo 2**64, ``hi = p >> 32`` and ``lo = p``; the upper 32
    bits those leave behind are masked off only where they matter (before a multiply, and at
    the end), which saves four masks a round. :func:`philox4x32` is checked against Random123's
    known-answer vectors (tests/test_counter_rng.py).

Counter layout
    key = ``(seed mod 2**32, seed >> 32)``; counter = ``(block mod 2**32, block >> 32,
    stream mod 2**32, stream >> 32)``. The positions of a stream come in tiles of
    :data:`TILE` = 1024 numbers made from the :data:`TILE_BLOCKS` = 256 counters ``256 t ..
    256 t + 255``: position ``p = 1024 t + 256 j + b`` holds normal ``j`` (0..3) of counter
    block ``256 t + b``. Each counter gives four words ``(w0, w1, w2, w3)`` and two Box-Muller
    pairs ``(w0, w1) -> (n0, n1)``, ``(w2, w3) -> (n2, n3)``. The planar tile (rather than
    ``4 b + j``) lets a fused kernel that computes one counter per lane store its four normals
    as four contiguous vectors. Any slice is drawn by computing the tiles that cover it and
    keeping the slice: at most two tiles more than asked, and the same numbers as a whole draw.

Box-Muller without libm
    ``n0 = r cos(theta)``, ``n1 = r sin(theta)``, ``r = sqrt(-2 log u)``, ``u = (w0 + 1/2) / 2**32``,
    ``theta = 2 pi (w1 + 1/2) / 2**32``. ``u`` lies in ``(0, 1)``, so ``|n| < 6.7``: the tail past
    6.66 sigma (probability 3e-11) is cut off, as in every 32-bit Box-Muller (cuRAND's float
    normals included).

    The values must be the *same bits* on every device and in eager and compiled code, which
    ``torch.log/sin/cos/sqrt`` do not promise: CUDA's libdevice, ATen's vectorized (SLEEF or
    MKL VML) and scalar paths and inductor's generated code may each differ by an ulp. Even
    ``torch.sqrt`` of float64 on the CPU is not correctly rounded in every build: it was off
    by one ulp for about 0.7 % of inputs on the build this was written with, while inductor's
    ``sqrt`` was correctly rounded. So everything is computed in float64 from operations IEEE 754
    rounds correctly, which every backend implements identically: ``+ - * /``, integer and bit
    operations, int64 <-> float64 conversions of values under 2**53 (exact), and bit casts.

    * ``log u``: ``u`` is ``m 2**-33`` with the odd integer ``m = 2 w0 + 1`` (exact in float64);
      its exponent and mantissa come from the bits of ``m``, the mantissa is brought to
      ``[sqrt(1/2), sqrt(2))`` and fdlibm's ``e_log.c`` kernel (``s = f / (2 + f)`` and a degree-14
      polynomial in ``s``, error below 1 ulp) does the rest;
    * ``sqrt``: four Newton steps for ``1 / sqrt`` from a bit-trick start (multiplies only);
    * ``cos, sin``: the angle is reduced *exactly in integers*: the top 3 bits of ``w1`` give the
      octant, the other 29 bits (reflected in odd octants) the offset ``x`` in ``[0, pi/4]``, where
      fdlibm's ``k_sin.c`` / ``k_cos.c`` polynomials are accurate to 1 ulp; quadrant swaps and
      signs are exact.

    The result agrees with libm's Box-Muller to about 1e-15 relative and is identical wherever it
    is computed, provided that the compiler does not contract ``a * b + c`` into a fused
    multiply-add (which rounds once instead of twice). Eager ATen runs one op per kernel, so it
    never contracts; the compiled kernel is built with inductor's C++ flag ``-ffp-contract=off``
    (its default, set here explicitly) and, on CUDA, Triton's ``enable_fp_fusion=False`` (inductor
    passes it when ``emulate_precision_casts`` is on, which is set for this kernel only). Values of
    another dtype are the float64 values cast, in the same kernel: ``float32`` results equal the
    float64 results ``.to(float32)``.

Speed
    Eager, each of the ~250 elementwise ops is a pass over memory (~90-300 ns a number on one
    CPU thread). The compiled kernel (:func:`torch.compile`, dynamic shapes, compiled once per
    device and dtype, fused into one C++ function of four loops) was ~14 ns a number on one
    heavily shared CPU thread, where ``torch.randn`` took ~11 (float32) and ~44 (float64); see
    ``benchmarks/generator_throughput.py``. That is Philox-4x32-10 (~25 int64 ops a number) plus
    a float64 Box-Muller (~50 ops a number) on 8-lane AVX-512: the cost of bit-identical
    float64 values; 7 rounds would save at most a fifth of it.
    :func:`gaussian` and :func:`fill_gaussian` use it where inductor works on the device and
    otherwise fall back to eager, warning once with the reason.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .exact_math import box_muller

__all__ = [
    "PHILOX_ROUNDS",
    "TILE",
    "TILE_BLOCKS",
    "compiled_available",
    "fill_gaussian",
    "gaussian",
    "gaussian_rows",
    "philox4x32",
    "uniform",
]

#: Rounds of Philox-4x32 (the standard 10; 7 already pass BigCrush per Salmon et al.).
PHILOX_ROUNDS = 10
#: Counter blocks per tile; a tile holds ``4 * TILE_BLOCKS`` consecutive positions.
TILE_BLOCKS = 256
#: Positions per tile: the unit the kernels compute (see the module docstring's layout).
TILE = 4 * TILE_BLOCKS
#: Default bound on the numbers one kernel call computes in :func:`fill_gaussian`: 64 tiles.
#: Inductor realizes the Philox words and some Box-Muller intermediates as chunk-sized float64 /
#: int64 buffers, so a chunk should keep those in L2; each call also costs ~0.1 ms of dynamo guards
#: and wrapper on a loaded CPU. 2**16 measured best of 4, 16, 64, 256 tiles on one CPU thread.
CHUNK = 1 << 16

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)

# consts tensor: 2 * rounds round keys, then the stream's two words, then the first block
_STREAM = 2 * PHILOX_ROUNDS
_BASE = _STREAM + 2


# ---------------------------------------------------------------------------------------------
# Philox-4x32
# ---------------------------------------------------------------------------------------------


def _round_keys(k0: int, k1: int, rounds: int = PHILOX_ROUNDS) -> list[int]:
    """The key of every round, ``[k0_0, k1_0, k0_1, k1_1, ...]`` (bumped by the Weyl constants)."""
    keys = []
    for r in range(rounds):
        keys += [(k0 + r * _PHILOX_W0) & _MASK32, (k1 + r * _PHILOX_W1) & _MASK32]
    return keys


def _philox(c0, c1, c2, c3, keys, rounds: int = PHILOX_ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32 on int64 tensors holding uint32 words; ``keys[2 r], keys[2 r + 1]`` is round
    ``r``'s key (python ints or 0-dim tensors). Inputs may carry garbage above bit 31 (it is
    masked before each multiply); the returned words are clean, in ``[0, 2**32)``.

    ``p = a * M`` with ``a, M < 2**32`` wraps modulo 2**64 in int64; its low 32 bits are the low
    word and the low 32 bits of ``p >> 32`` (arithmetic shift) the high word."""
    for r in range(rounds):
        p0 = (c0 & _MASK32) * _PHILOX_M0
        p1 = (c2 & _MASK32) * _PHILOX_M1
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ keys[2 * r], p1, (p0 >> 32) ^ c3 ^ keys[2 * r + 1], p0
    return c0 & _MASK32, c1 & _MASK32, c2 & _MASK32, c3 & _MASK32


def philox4x32(counter: Tensor, key: Sequence[int] | Tensor, rounds: int = PHILOX_ROUNDS) -> Tensor:
    """Philox-4x32-``rounds`` of a batch of counters.

    Args:
        counter: int64 tensor of shape ``(..., 4)``, 32-bit words ``(c0, c1, c2, c3)`` in
            ``[0, 2**32)`` (Random123's word order).
        key: the two 32-bit key words ``(k0, k1)``.
        rounds: Philox rounds (10 is the standard generator).

    Returns:
        int64 tensor of shape ``(..., 4)``: the four output words, each in ``[0, 2**32)``.
    """
    if counter.dtype != torch.int64 or counter.shape[-1:] != (4,):
        raise ValueError(f"counter must be int64 of shape (..., 4), got {counter.dtype} {tuple(counter.shape)}")
    k0, k1 = (int(k) & _MASK32 for k in key)
    words = _philox(*counter.unbind(-1), _round_keys(k0, k1, rounds), rounds)
    return torch.stack(words, dim=-1)


# ---------------------------------------------------------------------------------------------
# Box-Muller from correctly rounded operations only
# ---------------------------------------------------------------------------------------------


def _tiles(consts: Tensor, ntiles: int) -> Tensor:
    """``(ntiles, TILE)`` float64: the tiles from block ``consts[_BASE]`` (a multiple of
    :data:`TILE_BLOCKS`) of the key and stream in ``consts``."""
    block = consts[_BASE] + torch.arange(ntiles * TILE_BLOCKS, device=consts.device)
    w0, w1, w2, w3 = _philox(block, block >> 32, consts[_STREAM], consts[_STREAM + 1], consts)
    n0, n1 = box_muller(w0, w1)
    n2, n3 = box_muller(w2, w3)
    planes = [n.view(ntiles, TILE_BLOCKS) for n in (n0, n1, n2, n3)]
    return torch.stack(planes, dim=1).view(ntiles, TILE)


def _fill_tiles(out: Tensor, consts: Tensor) -> None:
    """Writes the tiles into ``out`` (``(ntiles, TILE)``, any float dtype): the kernel."""
    out.copy_(_tiles(consts, out.shape[0]))


# ---------------------------------------------------------------------------------------------
# The compiled kernel, per device and dtype
# ---------------------------------------------------------------------------------------------

#: inductor settings the bitwise agreement rests on (see the module docstring)
COMPILE_OPTIONS = {
    "cpp.enable_floating_point_contract_flag": "off",  # no a*b+c -> fma in the C++ kernels
    "cpp.enable_unsafe_math_opt_flag": False,  # no reassociation
    "emulate_precision_casts": True,  # -> Triton enable_fp_fusion=False (no fma on CUDA)
}

_lock = threading.Lock()
_compiled: dict[tuple[str, torch.dtype], Callable[[Tensor, Tensor], None] | None] = {}
_reasons: dict[str, str] = {}
_warned: set[str] = set()


def _probe(device: torch.device) -> str | None:
    """Why inductor cannot build the kernel on ``device`` (None when it can): compiles the kernel
    for float64 and checks two tiles against eager."""
    try:
        fn = torch.compile(_fill_tiles, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
        consts = _consts(12345, 6789, 3 * TILE_BLOCKS, device)
        got = torch.empty(2, TILE, dtype=torch.float64, device=device)
        fn(got, consts)
        want = torch.empty_like(got)
        _fill_tiles(want, consts)
    except Exception as e:  # inductor missing a compiler, Triton, ...: fall back to eager
        return f"torch.compile(backend='inductor') failed on {device.type}: {type(e).__name__}: {e}".splitlines()[0]
    if not torch.equal(got, want):
        return f"the compiled kernel's values differ from eager on {device.type}"
    return None


def compiled_available(device: torch.device | str | None = None) -> tuple[bool, str | None]:
    """Whether the compiled kernel works on ``device``'s type, and if not why (probed once:
    the first call compiles the kernel, tens of seconds).

    Args:
        device: the device (default: the CPU).

    Returns:
        ``(True, None)``, or ``(False, reason)``.
    """
    dev = torch.device("cpu" if device is None else device)
    with _lock:
        if dev.type not in _reasons:
            _reasons[dev.type] = _probe(dev) or ""
        reason = _reasons[dev.type]
    return (not reason, reason or None)


def _kernel(device: torch.device, dtype: torch.dtype, compiled: bool | None) -> Callable[[Tensor, Tensor], None]:
    """The compiled kernel for ``(device type, dtype)`` or, where that is off or unavailable,
    eager :func:`_fill_tiles` (warning once a device type with the reason)."""
    if compiled is False:
        return _fill_tiles
    ok, reason = compiled_available(device)
    if not ok:
        if compiled:
            raise RuntimeError(f"pfa_fx.counter_rng: compiled kernel unavailable: {reason}")
        if device.type not in _warned:
            _warned.add(device.type)
            warnings.warn(
                f"pfa_fx.counter_rng: drawing eagerly on {device.type} (same values, slower): {reason}", stacklevel=3
            )
        return _fill_tiles
    with _lock:
        key = (device.type, dtype)
        if key not in _compiled:
            _compiled[key] = torch.compile(_fill_tiles, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
        return _compiled[key]


# ---------------------------------------------------------------------------------------------
# Public draws
# ---------------------------------------------------------------------------------------------


def _consts(seed: int, stream: int, block: int, device: torch.device) -> Tensor:
    seed, stream = int(seed) & _MASK64, int(stream) & _MASK64
    words = _round_keys(seed & _MASK32, seed >> 32)
    words += [stream & _MASK32, stream >> 32, block]
    # stream's high word may reach 2**32 - 1: fine in int64
    return torch.tensor(words, dtype=torch.int64, device=device)


def _check_range(start: int, count: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start} count={count}")
    if start + count > 1 << 62:
        raise ValueError("positions must stay below 2**62")


def fill_gaussian(
    out: Tensor,
    seed: int,
    stream: int,
    start: int = 0,
    *,
    chunk: int = CHUNK,
    compiled: bool | None = None,
) -> Tensor:
    """Fills ``out`` with the standard normals at positions ``start .. start + out.numel() - 1``
    of stream ``(seed, stream)``, in its flattened (row-major) order, a piece at a time.

    Full tiles are written straight into ``out``, at most ``chunk`` numbers a kernel call; the
    partial tiles at the two ends go through a two-tile scratch. So the extra memory is bounded
    by ``2 * TILE`` numbers plus what one kernel call of ``chunk`` numbers holds, whatever the
    size of ``out``.

    Args:
        out: a contiguous floating-point tensor of any shape, on any device.
        seed: the key (taken modulo 2**64).
        stream: the stream (taken modulo 2**64): independent sequences under one seed.
        start: the position of ``out``'s first element.
        chunk: the most numbers one kernel call computes (rounded to whole tiles, at least 2).
        compiled: ``None`` (default): the compiled kernel where inductor works on ``out``'s
            device, else eager with a one-time warning; ``True``: compiled or raise; ``False``:
            eager.

    Returns:
        ``out``.
    """
    if not out.is_floating_point():
        raise TypeError(f"out must be a floating-point tensor, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (draw into a contiguous tensor and copy)")
    n = out.numel()
    _check_range(start, n)
    if n == 0:
        return out
    flat = out.view(-1)
    kernel = _kernel(out.device, out.dtype, compiled)
    chunk_tiles = max(2, chunk // TILE)
    scratch: Tensor | None = None
    pos, stop = start, start + n
    while pos < stop:
        tile = pos // TILE
        if pos % TILE == 0 and stop - pos >= 2 * TILE:  # >= 2 whole tiles: in place
            ntiles = min(chunk_tiles, (stop - pos) // TILE)
            dest = flat[pos - start : pos - start + ntiles * TILE].view(ntiles, TILE)
            kernel(dest, _consts(seed, stream, tile * TILE_BLOCKS, out.device))
            pos += ntiles * TILE
        else:  # a partial tile, or a last single tile: two tiles into the scratch (never 1: no recompile)
            if scratch is None:
                scratch = torch.empty(2, TILE, dtype=out.dtype, device=out.device)
            kernel(scratch, _consts(seed, stream, tile * TILE_BLOCKS, out.device))
            end = min(stop, (tile + 2) * TILE)
            flat[pos - start : end - start].copy_(scratch.view(-1)[pos - tile * TILE : end - tile * TILE])
            pos = end
    return out


def gaussian(
    seed: int,
    stream: int,
    start: int,
    count: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """The standard normals at positions ``start .. start + count - 1`` of stream ``(seed, stream)``.

    A pure function: the same arguments give the same bits on every device, eager or compiled,
    and a slice gives the numbers of the same positions in a larger draw. Values of any dtype
    are the float64 values cast to it.

    Args:
        seed: the key (taken modulo 2**64).
        stream: the stream (taken modulo 2**64).
        start: the first position (``>= 0``).
        count: how many numbers.
        dtype: the result's floating-point dtype.
        device: the result's device (default: the CPU).
        compiled: see :func:`fill_gaussian`.

    Returns:
        A 1-D tensor of ``count`` numbers.
    """
    out = torch.empty(count, dtype=dtype, device=device)
    return fill_gaussian(out, seed, stream, start, compiled=compiled)


def gaussian_rows(
    seed: int,
    stream: int,
    shape: Sequence[int],
    row_start: int,
    row_stop: int,
    *,
    start: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """Rows ``row_start .. row_stop - 1`` (along dim 0) of the ``shape``-shaped draw whose first
    element is position ``start``: what a rank holding a dim-0 shard of a weight (FSDP2) draws,
    without drawing the other rows. Equal to ``gaussian(seed, stream, start, prod(shape))
    .view(shape)[row_start:row_stop]``.

    Args:
        seed: the key.
        stream: the stream.
        shape: the whole tensor's shape ``(rows, *rest)``.
        row_start: the first row to draw.
        row_stop: one past the last row (clipped to ``rows``).
        start: the position of the whole tensor's first element.
        dtype: the result's dtype.
        device: the result's device.
        compiled: see :func:`fill_gaussian`.

    Returns:
        A tensor of shape ``(rows drawn, *rest)``.
    """
    shape = tuple(int(s) for s in shape)
    row_stop = min(row_stop, shape[0])
    row_start = min(max(row_start, 0), row_stop)
    per_row = math.prod(shape[1:])
    out = torch.empty((row_stop - row_start, *shape[1:]), dtype=dtype, device=device)
    return fill_gaussian(out, seed, stream, start + row_start * per_row, compiled=compiled)


def uniform(
    seed: int,
    stream: int,
    start: int,
    count: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniforms on ``(0, 1)``: ``(w + 1/2) / 2**32`` of the 32-bit word at each position
    (position ``p`` is word ``j`` of counter block ``b``, laid out as the normals: see the module
    docstring). Eager only (about 50 int64 ops a number); exact in float64, so identical on
    every device. The words are the ones the normals at the same positions are made from: draw
    uniforms and normals from different streams. A float32 result is the float64 value
    rounded, which is 1.0 for the top 2**-25 of words.

    Args:
        seed: the key.
        stream: the stream.
        start: the first position.
        count: how many numbers.
        dtype: the result's floating-point dtype.
        device: the result's device.

    Returns:
        A 1-D tensor of ``count`` numbers.
    """
    _check_range(start, count)
    dev = torch.device("cpu" if device is None else device)
    first, last = start // TILE, -(-(start + count) // TILE)
    consts = _consts(seed, stream, first * TILE_BLOCKS, dev)
    block = consts[_BASE] + torch.arange((last - first) * TILE_BLOCKS, device=dev)
    words = _philox(block, block >> 32, consts[_STREAM], consts[_STREAM + 1], consts)
    planes = [w.view(-1, TILE_BLOCKS) for w in words]
    flat = torch.stack(planes, dim=1).reshape(-1)[start - first * TILE : start - first * TILE + count]
    return ((flat.to(torch.float64) + 0.5) * 2.0**-32).to(dtype)
