"""The feedback node every rule builds on, and the shared helpers for drawing state.

A :class:`FeedbackNode` owns one weight op's feedback state. The feedback op calls
``node.backward`` with the error ``e``; the default builds ``W_b = feedback_from(W, state)``
and runs BP's own fused backward call with ``W_b`` in W's place, so ``grad_W`` and
``grad_b`` come out exactly as BP's, and hands ``grad_W`` to :meth:`state_grads` for the
rule's local update (KP: ``grad_B = grad_W``; PFA: ``grad_R = B^T grad_W``).
``W_b`` is built in the backward, so nothing beyond BP's own tensors is kept between
forward and backward (docs/design.md, section 'The feedback op').
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import ConversionError, ConversionTypeError, did_you_mean


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (SHA-256 of ``"p0:p1:..."``): the same in every process."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, name)``: same draws in every process, no communication."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derived_seed("pfa_fx", seed, name))
    return gen


def xavier_std(shape: torch.Size | tuple[int, ...]) -> float:
    """Standard deviation of Xavier init for a weight of this shape (the paper's recipe)."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))


def check_store_feedback(value: Any, rule: str, learned: str = "") -> bool:
    """``store_feedback`` as a bool, or :class:`~pfa_fx.ConversionError` (a ``ValueError``):
    a value that is not ``True``/``False``, or ``False`` for a rule whose feedback is
    learned (``learned``: why, e.g. KP's ``B`` is updated like ``W``), which must be stored."""
    if not isinstance(value, bool):
        raise ConversionTypeError(
            f"{rule}: store_feedback must be True (hold fixed random feedback in memory, the default) or False "
            f"(redraw it from the seed in every backward), got {value!r}"
        )
    if not value and learned:
        raise ConversionError(
            f"{rule}: store_feedback=False is refused: {learned}, so it is state that must be stored. Only "
            "fixed random feedback can be redrawn instead of stored (fa's B, sf's M with variant='frsf', dfa's "
            "projections, pfa/pfa-o's B). In a rule mapping, give store_feedback=False to the fixed-feedback "
            f"entries only, e.g. {{'fc': {rule!r}, '*': ('fa', {{'store_feedback': False}})}}"
        )
    return value


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


def generator_key(generator: torch.Generator) -> int | Tensor:
    """What :func:`generator_at` needs to restart ``generator`` from where it is now: its seed
    when nothing was drawn since it was seeded (the case of every node :func:`pfa_fx.convert`
    makes: a few bytes), else a snapshot of its state (5 KiB, a uint8 tensor)."""
    seed = generator.initial_seed()
    if torch.equal(torch.Generator().manual_seed(seed).get_state(), generator.get_state()):
        return seed
    return generator.get_state()


def generator_at(key: int | Tensor) -> torch.Generator:
    """A fresh CPU generator where :func:`generator_key` found one."""
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


def gathered(t: Tensor) -> Tensor:
    """The whole tensor of a sharded one (an FSDP2 ``DTensor`` between steps: a collective,
    so every rank calls it), else ``t`` itself."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``full`` in ``like``'s sharding (``full`` itself where ``like`` is
    not sharded); every rank holds the same ``full``, so nothing is communicated."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


@contextlib.contextmanager
def units_gathered(model: nn.Module, keep_gathered: tuple[nn.Module, ...] = ()) -> Iterator[None]:
    """Every FSDP2 unit of ``model`` (each module ``fully_shard`` made) holding its whole
    parameters, for code that reads them outside the units' own forward and backward (PAL's
    noisy pass, alignment metrics); resharded after, except ``keep_gathered`` (a unit whose
    forward is running, which reshards by itself). A collective: every rank enters it.
    Without FSDP2, nothing."""
    units = [m for m in model.modules() if callable(getattr(m, "unshard", None)) and hasattr(m, "reshard")]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in reversed(units):
            if not any(m is k for k in keep_gathered):
                m.reshard()


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor, else ``t``: what in-place updates write to."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class FeedbackNode(nn.Module):
    """Feedback state of one weight op.

    Attributes:
        rule: the rule's registered name (``"fa"``, ``"pfa"``, ...).
        groups: convolution groups; feedback never crosses a group.
        options: the options the rule *accepts*, with the class's defaults (a class
            attribute); :attr:`config` is what this node was built with.
        seed: the ``seed`` of the conversion that drew this node's state (None when the
            node was built outside :func:`pfa_fx.convert`).
        op_name: the op's name in the converted model (``"layer1.0.conv1"``).
    """

    rule: ClassVar[str] = ""
    #: options this rule accepts, with their defaults (this node's own values: :attr:`config`)
    options: ClassVar[dict[str, Any]] = {}
    #: options that only choose how the same numbers are computed (PFA's ``route``, and
    #: ``store_feedback``: held or redrawn, the same values): a checkpoint may be loaded into
    #: a conversion where they differ
    compute_only_options: ClassVar[frozenset[str]] = frozenset({"store_feedback"})
    #: why the rule's feedback is learned, for rules whose feedback must therefore be stored
    #: (``store_feedback=False`` is refused with this reason); empty for the others
    learned_feedback: ClassVar[str] = ""
    #: False where the rule redraws its fixed random feedback in every backward instead of
    #: holding it (``store_feedback=False``, for the rules that accept the option)
    store_feedback: bool = True
    #: whether W_b depends on trainable state (the op then returns grad_W for it)
    plastic: ClassVar[bool] = False
    #: whether the rule has a W-shaped ``W_b`` (DFA's feedback is a projection of the
    #: output error instead: :func:`pfa_fx.alignment` leaves such ops out)
    has_feedback_weight: ClassVar[bool] = True
    #: whether torch.compile may trace the op's backward ahead of time; DFA's reads the
    #: output error captured during the backward itself, so its ops run between compiled
    #: graphs (one deliberate break per op instead of failed traces and recompiles)
    traceable_backward: ClassVar[bool] = True
    #: whether the op hands its input to :meth:`record_input` on every training call (PAL)
    records_input: ClassVar[bool] = False
    #: set while a rule runs its own no-grad pass through the model (PAL's noisy pass):
    #: the op then calls :meth:`noisy_forward` instead of the native function
    noisy: bool = False

    def __init__(
        self, weight: Tensor, *, groups: int, generator: torch.Generator, transposed: bool = False, **options: Any
    ):
        super().__init__()
        self.groups = int(groups)
        self.weight_shape = tuple(weight.shape)
        # a transposed convolution stores its weight as (in, out/groups, *k)
        self.transposed = bool(transposed)
        self.n_out = weight.shape[1] * self.groups if self.transposed else weight.shape[0]
        # A plain reference (not registered): the forward weight stays where the model
        # keeps it; state_dict and parameters() list it once, under its own name.
        self._weight_ref: list[Tensor] = [weight]
        # set by the pass when the op uses the parameter transposed (``x @ P``)
        self.param_transposed = False
        self._last_weight: Tensor | None = None
        # set by the pass where the model computes the weight from its parameters (in a
        # plain list: a GraphModule reading the model's own parameter objects, not a child)
        self._weight_fn: list[nn.Module] = []
        self.as_backprop = False  # set by pfa_fx.backprop_mode for gradient-alignment probes
        self.seed: int | None = None  # set by convert, which seeds the draws with (seed, op name)
        self.op_name = ""
        self.owner_path: str | None = None  # the path of the module owning the weight (set by convert)

    # -- state held in another shape ----------------------------------------------------
    # A parameter registered squeezed (``hold_squeezed``) keeps its own shape for the node
    # (``held``), ``state_dict`` and ``load_state_dict``: FSDP2 shards dim 0, which a
    # (1, out, n̄) tensor could not split. The attribute itself stays the registered
    # parameter, which FSDP2 reads back with ``getattr`` and replaces.
    def held(self, name: str) -> Tensor:
        """State tensor ``name`` in the shape the rule defines it with."""
        t = getattr(self, name)
        shape = self.__dict__.get("_held_shapes", {}).get(name)
        return t if shape is None else t.view(shape)

    def hold_squeezed(self, name: str) -> None:
        """Register tensor ``name`` without its leading size-1 dimensions (a contiguous
        parameter); :meth:`held`, ``state_dict`` and ``load_state_dict`` still see its shape."""
        t = self._parameters[name]
        k = next((i for i, n in enumerate(t.shape) if n != 1), t.dim())
        if k == 0 or k == t.dim():
            return
        self.__dict__.setdefault("_held_shapes", {})[name] = tuple(t.shape)
        self._parameters[name] = nn.Parameter(t.detach().reshape(t.shape[k:]).contiguous(), t.requires_grad)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, shape in self.__dict__.get("_held_shapes", {}).items():
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].view(shape)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        for name in self.__dict__.get("_held_shapes", {}):
            t = state_dict.get(prefix + name)
            if t is not None:
                state_dict[prefix + name] = t.view(self._parameters[name].shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- what the op calls -------------------------------------------------------------
    def state(self) -> tuple[Tensor, ...]:
        """Tensors the op passes through autograd for this step (trainable state receives
        the gradients :meth:`state_grads` returns)."""
        return ()

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        """``W_b`` from the forward weight and this step's state."""
        raise NotImplementedError

    def state_grads(self, grad_weight: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """Gradients of the state tensors, given the (unchanged) weight gradient. Plastic
        rules whose ``W_b`` is a state tensor itself (KP) get ``grad_W`` as is."""
        return tuple(grad_weight if t.requires_grad else None for t in state)

    def backward(self, family: Any, e: Tensor, x: Tensor, weight: Tensor, state: tuple[Tensor, ...], need: Any):
        """The op's backward: ``(grad_x, grad_W, grad_b, state grads)``. The default builds
        ``W_b`` and makes BP's own fused call with it in W's place; rules with a cheaper
        route for some shapes (PFA) override it."""
        weight_b = self.feedback_from(weight, state)
        gx, gw, gb = family.fused(e, x, weight_b, need.x, need.w or need.state, need.b)
        return gx, gw, gb, self.state_grads(gw, state) if need.state else (None,) * len(state)

    def backward_input_first(
        self, family: Any, e: Tensor, x: Tensor, weight: Tensor, state: tuple[Tensor, ...], need: Any
    ):
        """:meth:`backward` in two native calls: the input gradient through a ``W_b`` built for
        it alone, then W's and the bias's gradients once ``W_b`` is gone. For a ``W_b`` that
        is redrawn rather than held (``store_feedback=False``): it and ``grad_W`` (both
        W-sized) are then never alive together, so the step's peak memory stays BP's, whose
        one call holds W and ``grad_W``. Each gradient comes out as from the fused call."""
        gx = family.fused(e, x, self.feedback_from(weight, state), True, False, False)[0] if need.x else None
        _, gw, gb = family.fused(e, x, weight, False, need.w or need.state, need.b)  # W only gives shapes
        return gx, gw, gb, self.state_grads(gw, state) if need.state else (None,) * len(state)

    def run_backward(self, family: Any, e: Tensor, x: Tensor, weight: Tensor, state: tuple[Tensor, ...], need: Any):
        """What the op calls: the rule's backward, or BP's inside ``pfa_fx.backprop_mode``."""
        if self.as_backprop:
            gx, gw, gb = family.fused(e, x, weight, need.x, need.w, need.b)
            return gx, gw, gb, (None,) * len(state)
        return self.backward(family, e, x, weight, state, need)

    def inspect_state(self) -> tuple[Tensor, ...]:
        """The state :meth:`feedback_weight` reports (the last step's, without advancing)."""
        return self.state()

    def note_weight(self, weight: Tensor) -> None:
        # called by the op on every training call; kept only for a weight that is not the
        # parameter itself (computed, e.g. StdConv; transposed; or a replaced parameter):
        # node.weight reads a plain parameter anyway, and under torch.compile the write
        # would be one graph output per op. Straight into __dict__, where __init__'s plain
        # attribute lives (nn.Module.__setattr__ would cost more than the rest of it)
        if weight is not self._weight_ref[0]:
            if hasattr(weight, "device_mesh"):  # rare branch: the check costs the hot path nothing
                raise ConversionError(
                    f"op '{self.op_name}' received a sharded (DTensor) weight: its model was converted by a "
                    f"graph front end ({getattr(self, 'conversion_path', 'graph')}), whose graph reads weights "
                    "without calling their modules, so FSDP2's per-module fully_shard never gathers them. "
                    "Convert with pfa_fx.convert(model, ..., capture='modules') to shard per block"
                )
            self.__dict__["_last_weight"] = weight.detach()

    def record_input(self, x: Tensor) -> None:
        """Called with the op's input on training calls when :attr:`records_input` is set."""

    def noisy_forward(self, family: Any, native: Any, x: Tensor, weight: Tensor) -> Tensor:
        """The op's output while :attr:`noisy` is set; ``native(x, with_bias)`` is the op."""
        return native(x, True)

    # -- model-level hooks -------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> None:
        """Called once by ``convert`` with the converted model and this rule's nodes, for
        rules that need something at the model level (DFA captures the output error with
        a forward hook; PAL links each op to the op that reads its output)."""

    @classmethod
    def report_notes(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> list[str]:
        """Lines :func:`pfa_fx.report` prints about this rule's model-level behaviour."""
        return []

    # -- public inspection API ---------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """This node's actual options, e.g. ``{"expansion": 2, "compact": True, ...}`` for a
        node converted with ``expansion=2, compact=True`` (defaults resolved: WM's
        ``mirror_lr=None`` shows as the rate it stands for; ``store_feedback`` only where it
        is False). :attr:`options` holds the class's defaults instead."""
        # store_feedback appears only where it is False: a conversion with the default keeps
        # the config, repr, report and checkpoint record it always had
        return {k: getattr(self, k) for k in self.options if not (k == "store_feedback" and self.store_feedback)}

    @property
    def fixed_draws(self) -> tuple[str, ...]:
        """Names of the fixed random tensors of this node's configuration (FA's ``"B"``):
        buffers under ``store_feedback=True``, redrawn by :meth:`redraw` otherwise."""
        return ()

    def redraw(self, name: str) -> Tensor:
        """The fixed tensor ``name`` as a ``store_feedback=True`` conversion with the same
        seed would hold it now (its dtype and device after the model's moves)."""
        raise KeyError(f"{self.rule}: no fixed random tensor {name!r} to redraw")

    @property
    def draws_from_seed(self) -> bool:
        """Whether the node keeps drawing random numbers after conversion from streams seeded
        by ``(seed, op name)`` that ``state_dict`` does not hold (DFA's projections, WM's and
        PAL's noise, brSF's magnitudes): a checkpoint then resumes the same run only under
        the same ``seed``. Rules whose random draws all end up in saved tensors return False."""
        return False

    def state_numel(self) -> int:
        """Numbers this node holds as feedback state (its own parameters and buffers, and
        the generator snapshots a redraw starts from, if any)."""
        tensors = [*self._parameters.values(), *self._buffers.values(), *self.__dict__.get("_draw_keys", {}).values()]
        return sum(t.numel() for t in tensors if isinstance(t, Tensor))

    @property
    def weight(self) -> Tensor:
        """The forward weight ``W`` the op uses: the model's computed weight (e.g. after
        standardization) evaluated from the current parameters where the pass could lift
        its computation out of the graph, else the last one the op used, else the
        parameter itself."""
        if self._weight_fn:
            with torch.no_grad():
                return self._weight_fn[0]()
        if self._last_weight is not None:
            return self._last_weight
        w = self._weight_ref[0].detach()
        if self.param_transposed:
            w = w.t()
        return w.reshape(self.weight_shape)  # an expert bank: as kernels

    @torch.no_grad()
    def feedback_weight(self) -> Tensor:
        """``W_b``, the weight the backward pass uses now; W's shape."""
        return self.feedback_from(self.weight, self.inspect_state()).detach()

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        shape = "x".join(map(str, self.weight_shape))
        return f"rule={self.rule!r}, weight={shape}, groups={self.groups}" + (f", {opts}" if opts else "")

    # -- helpers for subclasses ----------------------------------------------------------
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
        for start, stop, values in gaussian_pieces(generator_at(self._draw_keys[key]), out.numel(), std):
            flat[start:stop].copy_(self._trail.apply(values))
        fmt = self._redraw_format()
        return out if fmt == torch.contiguous_format else out.contiguous(memory_format=fmt)

    @staticmethod
    def draw(shape: tuple[int, ...], generator: torch.Generator, like: Tensor, std: float) -> Tensor:
        """Gaussian draw on the CPU in float64, then cast: identical values on every device."""
        t = torch.randn(shape, generator=generator, dtype=torch.float64) * std
        return t.to(device=like.device, dtype=like.dtype)

    def _grouped(self, t: Tensor) -> Tensor:
        """A W-shaped (or R-shaped) tensor as ``(groups, rows, rest)``, rows along the
        output axis: axis 0, or axis 1 of a transposed convolution's ``(in, out/g, *k)``."""
        g = self.groups
        if not self.transposed:
            return t.reshape(g, t.shape[0] // g, -1)
        a, r = t.shape[0] // g, t.shape[1]
        return t.reshape(g, a, r, -1).transpose(1, 2).reshape(g, r, -1)

    def _ungrouped(self, m: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`_grouped`: ``(groups, rows, rest)`` back to ``shape``."""
        if not self.transposed:
            return m.reshape(shape)
        g, r = m.shape[0], m.shape[1]
        a = shape[0] // g
        return m.reshape(g, r, a, -1).transpose(1, 2).reshape(shape)
