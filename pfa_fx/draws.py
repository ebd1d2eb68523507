"""Drawing fixed random feedback: seeds, scales, and the redraw of feedback that is not
stored (``store_feedback=False``).

Every draw of a conversion comes from a generator seeded by ``(seed, op name)``
(:func:`seeded_generator`), so it is the same in every process without communication.
:class:`Redrawing` is the part of :class:`~pfa_fx.FeedbackNode` that redraws a fixed
tensor in the backward instead of holding it, bit for bit what a stored conversion holds
(its :class:`CastTrail` repeats the casts the stored tensor would have gone through).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

from . import counter_rng
from .errors import ConversionError, did_you_mean


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (SHA-256 of ``"p0:p1:..."``): the same in every process."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: the generators fixed random feedback can be drawn with (``convert(generator=...)``)
GENERATORS = ("mt19937", "philox")
#: what a checkpoint records of each: the name and version of the draws it defines
GENERATOR_RECORD = {"mt19937": "mt19937-float64/1", "philox": "philox4x32-10-boxmuller/1"}


class CounterStream(torch.Generator):
    """A node's generator under ``generator="philox"``: its Gaussian draws (:func:`gaussian_draw`)
    are numbered streams of :mod:`pfa_fx.counter_rng` keyed by ``(seed, op name)``, pure functions
    of (key, stream, position) drawn on any device, any slice alone. Other draws (child seeds,
    uniform initialisations of learned state) use the CPU generator this also is, seeded by
    the same key."""

    def __new__(cls, key: int, next_stream: int = 0) -> CounterStream:
        return super().__new__(cls, device="cpu")  # torch.Generator's first argument is the device

    def __init__(self, key: int, next_stream: int = 0):  # torch.Generator has no __init__ to call
        self.manual_seed(key)
        self.key, self.next_stream = key, next_stream

    def take_stream(self) -> int:
        stream, self.next_stream = self.next_stream, self.next_stream + 1
        return stream


def seeded_generator(seed: int, name: str, kind: str = "mt19937") -> torch.Generator:
    """A generator seeded by ``(seed, name)``: same draws in every process, no communication.
    ``kind``: ``"mt19937"`` (torch's CPU Mersenne Twister, float64 Gaussians) or ``"philox"``
    (a :class:`CounterStream`)."""
    key = derived_seed("pfa_fx", seed, name)
    if kind == "philox":
        return CounterStream(key)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(key)
    return gen


def gaussian_draw(generator: torch.Generator, shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """Standard normal float64 numbers of ``shape``: the next Gaussian draw of ``generator``
    (a :class:`CounterStream` draws its next stream on ``device``; a torch generator on the CPU)."""
    if isinstance(generator, CounterStream):
        n = math.prod(shape)
        return counter_rng.gaussian(
            generator.key, generator.take_stream(), 0, n, dtype=torch.float64, device=device
        ).view(shape)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def xavier_std(shape: torch.Size | tuple[int, ...]) -> float:
    """Standard deviation of Xavier init for a weight of this shape (the paper's recipe)."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))


#: numbers per piece when fixed Gaussian feedback is redrawn: bounds the float64 scratch of a
#: redraw (2 MiB) whatever the weight's size; a multiple of 16 (see :func:`gaussian_pieces`)
REDRAW_PIECE = 1 << 18


def gaussian_pieces(generator: torch.Generator, numel: int, std: float, piece: int = REDRAW_PIECE):
    """``(start, stop, values)``: ``torch.randn(numel, generator=generator, dtype=float64) * std``
    drawn ``piece`` numbers at a time, with the same values and leaving ``generator`` where the
    whole draw leaves it. That holds for torch's CPU normal sampler, which fills ``n >= 16``
    numbers from ``n`` uniforms in blocks of 16 (and redraws the last 16 when ``n % 16``):
    every piece but the last is a multiple of 16, and the last has at least 16 numbers
    (tests/test_store_feedback.py checks the equality on the installed torch)."""
    start = 0
    while start < numel:
        stop = min(numel, start + piece)
        if numel - stop < 16:  # a tail under 16 would take the sampler's other (scalar) path
            stop = numel
        yield start, stop, torch.randn(stop - start, generator=generator, dtype=torch.float64).mul_(std)
        start = stop


def generator_key(generator: torch.Generator) -> int | Tensor | tuple[int, int]:
    """What :func:`generator_at` needs to restart ``generator`` from where it is now: its seed
    when nothing was drawn since it was seeded (the case of every node :func:`pfa_fx.convert`
    makes: a few bytes), else a snapshot of its state (5 KiB, a uint8 tensor); for a
    :class:`CounterStream`, ``(key, next stream)``."""
    if isinstance(generator, CounterStream):
        return (generator.key, generator.next_stream)
    seed = generator.initial_seed()
    if torch.equal(torch.Generator().manual_seed(seed).get_state(), generator.get_state()):
        return seed
    return generator.get_state()


def generator_at(key: int | Tensor | tuple[int, int]) -> torch.Generator:
    """A fresh CPU generator where :func:`generator_key` found one."""
    if isinstance(key, tuple):
        return CounterStream(*key)
    gen = torch.Generator()
    if isinstance(key, Tensor):
        gen.set_state(key)
    else:
        gen.manual_seed(key)
    return gen


#: dtype -> the dtypes that hold each of its values exactly (a cast between them cannot round)
_HOLDS_EXACTLY = {
    torch.float64: {torch.float64},
    torch.float32: {torch.float32, torch.float64},
    torch.float16: {torch.float16, torch.float32, torch.float64},
    torch.bfloat16: {torch.bfloat16, torch.float32, torch.float64},
}


class CastTrail:
    """The casts a tensor drawn in float64 and stored at conversion would have gone through
    (the conversion's cast to W's dtype, then each ``model.to(dtype)`` / ``.half()``): what a
    redraw repeats to give the stored tensor's values bit for bit. ``model.double()`` of a
    float32 model leaves a stored buffer holding float32 values in float64, ``.half()`` then
    ``.float()`` half-precision values, and a direct cast of the float64 draw would differ
    from both. Casts that cannot round are not kept, so back-and-forth moves stay short."""

    def __init__(self, dtype: torch.dtype):
        self.rounded: list[torch.dtype] = [dtype]  # the casts that may have rounded, in order
        self.dtype = dtype  # the stored tensor's dtype now

    def moved_to(self, dtype: torch.dtype) -> None:
        if dtype == self.dtype:
            return
        # exact when the new dtype holds the current dtype's values, or the values the last
        # rounding left (float32 values held in float64 and cast back to float32)
        exact = dtype in _HOLDS_EXACTLY.get(self.dtype, ()) or dtype in _HOLDS_EXACTLY.get(self.rounded[-1], ())
        if not exact:
            self.rounded.append(dtype)
        self.dtype = dtype

    def apply(self, t: Tensor) -> Tensor:
        """``t`` (the float64 draw) as the stored tensor would hold it now."""
        for d in self.rounded:
            t = t.to(d)
        return t.to(self.dtype)

    def __repr__(self) -> str:
        return f"CastTrail(rounded={self.rounded}, dtype={self.dtype})"


SCALES = ("xavier", "weight")
#: the scale feedback is drawn at unless a conversion names one: W's own RMS keeps the
#: backward's error magnitudes at backprop's on any initialisation (``"xavier"`` is the
#: paper's recipe: with weights initialised at Xavier scale the two agree)
DEFAULT_SCALE = "weight"


def feedback_std(weight: Tensor, scale: str | float, rule: str) -> float:
    """Standard deviation for drawn feedback state: ``"weight"`` (the default) for W's own
    root-mean-square at conversion, so that ``|W_b| ≈ |W|`` and the errors the backward sends
    down keep backprop's magnitudes whatever the initialisation (pretrained weights, HF's
    std-0.02 init, timm ViTs; a W of all zeros falls back to Xavier's); ``"xavier"`` for W's
    shape (the paper's recipe), far above the weights of most transformers, where the error
    then grows at every LayerNorm; or a positive number."""
    if isinstance(scale, str):
        if scale == "xavier":
            return xavier_std(weight.shape)
        if scale == "weight":
            if weight.is_meta:  # no values to measure (a meta conversion sizes state, draws nothing)
                return xavier_std(weight.shape)
            rms = float(weight.detach().double().square().mean().sqrt())
            return rms if rms > 0 else xavier_std(weight.shape)
        raise ConversionError(
            f"{rule}: unknown scale {scale!r}; valid scales: {', '.join(SCALES)} or a positive number"
            + did_you_mean(scale, SCALES)
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ConversionError(f"{rule}: scale must be one of {', '.join(SCALES)} or a positive number, got {scale!r}")
    return float(scale)


class Redrawing:
    """The redraw machinery of a node whose fixed random tensors are not stored: what
    :class:`~pfa_fx.FeedbackNode` mixes in. A rule calls :meth:`draw` at conversion for a
    stored tensor, or :meth:`keep_redraw` then :meth:`redrawn_gaussian` in each backward."""

    @property
    def fixed_draws(self) -> tuple[str, ...]:
        """Names of the fixed random tensors of this node's configuration (FA's ``"B"``):
        buffers under ``store_feedback=True``, redrawn by :meth:`redraw` otherwise."""
        return ()

    def redraw(self, name: str) -> Tensor:
        """The fixed tensor ``name`` as a ``store_feedback=True`` conversion with the same
        seed would hold it now (its dtype and device after the model's moves)."""
        raise KeyError(f"{self.rule}: no fixed random tensor {name!r} to redraw")

    def backward_input_first(
        self, family: Any, e: Tensor, x: Tensor, weight: Tensor, state: tuple[Tensor, ...], need: Any
    ):
        """:meth:`backward` in two native calls, for a redrawn ``W_b``: the input gradient
        through ``W_b`` first, then W's and the bias's once ``W_b`` is gone, so that it and
        ``grad_W`` are never alive together (the step's peak memory stays BP's)."""
        gx = family.fused(e, x, self.feedback_from(weight, state), True, False, False)[0] if need.x else None
        _, gw, gb = family.fused(e, x, weight, False, need.w or need.state, need.b)  # W only gives shapes
        return gx, gw, gb, self.state_grads(gw, state) if need.state else (None,) * len(state)

    def state_numel(self) -> int:
        """Numbers this node holds as feedback state (its parameters and buffers, and the
        generator snapshots a redraw starts from, if any)."""
        tensors = [*self._parameters.values(), *self._buffers.values(), *self.__dict__.get("_draw_keys", {}).values()]
        return sum(t.numel() for t in tensors if isinstance(t, Tensor))

    def stream(self, device: torch.device, *parts: object) -> torch.Generator:
        """This node's generator on ``device``, reseeded from ``parts`` (e.g. a base seed and
        a step): per-step draws (brSF's magnitudes, WM/PAL noise) without a new generator."""
        gen = self.__dict__.get("_gen")
        if gen is None or gen.device != device:
            gen = self.__dict__["_gen"] = torch.Generator(device=device)
        gen.manual_seed(derived_seed(*parts))
        return gen

    def keep_redraw(self, weight: Tensor, rank: int = 0, **keys: int | Tensor) -> None:
        """Set up redrawing instead of storing (``store_feedback=False``): ``keys`` maps each
        draw to its :func:`generator_key`; the cast trail starts at W's dtype. A probe buffer
        (not saved; no numbers, or four for a kernel of ``rank`` 4 or 5, enough to show the
        memory format ``model.to(memory_format=...)`` would give a stored kernel) follows the
        model's moves, so the redraw lands where and as the stored tensor would be. The redraw
        in the backward uses a CPU generator, kept out of torch.compile's graphs (a traced
        backward could bake the draw into the graph as a constant): the op runs between
        compiled graphs, as DFA's do."""
        self._draw_keys: dict[str, int | Tensor] = dict(keys)
        self._trail = CastTrail(weight.dtype)
        shape = {4: (1, 2, 1, 2), 5: (1, 2, 1, 1, 2)}.get(rank, (0,))
        self.register_buffer(
            "_redraw_probe", torch.zeros(shape, dtype=weight.dtype, device=weight.device), persistent=False
        )
        self.traceable_backward = False

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        probe = self._buffers.get("_redraw_probe")
        if probe is not None:  # a stored tensor would have been cast with the model: so will its redraw
            self._trail.moved_to(probe.dtype)
        return out

    def _redraw_format(self) -> torch.memory_format:
        probe = self._redraw_probe
        if probe.is_contiguous():
            return torch.contiguous_format
        return torch.channels_last if probe.dim() == 4 else torch.channels_last_3d

    def redrawn_gaussian(self, key: str, std: float, like: Tensor | None = None) -> Tensor:
        """W-shaped: what :meth:`draw` stored from the generator of ``key`` at conversion holds
        now, in ``like``'s dtype and device (in the backward: W's, cast by autocast as the
        stored tensor would be), else where the stored tensor would be. Drawn in pieces of
        :data:`REDRAW_PIECE` straight into the result: no W-sized float64 scratch."""
        if like is None:
            dtype, device = self._trail.dtype, self._redraw_probe.device
        else:
            dtype, device = like.dtype, like.device
        out = torch.empty(self.weight_shape, dtype=dtype, device=device)
        flat = out.view(-1)
        draw_key = self._draw_keys[key]
        if isinstance(draw_key, tuple):  # counter-based: each piece drawn alone, on the op's device
            seed, stream = draw_key
            for start in range(0, flat.numel(), REDRAW_PIECE):
                n = min(REDRAW_PIECE, flat.numel() - start)
                values = counter_rng.gaussian(seed, stream, start, n, dtype=torch.float64, device=device).mul_(std)
                flat[start : start + n].copy_(self._trail.apply(values))
        else:
            for start, stop, values in gaussian_pieces(generator_at(draw_key), out.numel(), std):
                flat[start:stop].copy_(self._trail.apply(values))
        fmt = self._redraw_format()
        return out if fmt == torch.contiguous_format else out.contiguous(memory_format=fmt)

    @staticmethod
    def draw(shape: tuple[int, ...], generator: torch.Generator, like: Tensor, std: float) -> Tensor:
        """The generator's next Gaussian draw in float64 (on the CPU; a :class:`CounterStream`'s
        on ``like``'s device), times ``std``, then cast: identical values on every device."""
        return (gaussian_draw(generator, shape, like.device) * std).to(device=like.device, dtype=like.dtype)
