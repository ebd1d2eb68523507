"""The feedback node every rule builds on, and the shared helpers for drawing state.

A :class:`FeedbackNode` owns one weight op's feedback state. The feedback op calls
``node.backward`` with the error ``e``; the default builds ``W_b = feedback_from(W, state)``
and runs BP's own fused backward call with ``W_b`` in W's place, so ``grad_W`` and
``grad_b`` come out exactly as BP's, and hands ``grad_W`` to :meth:`state_grads` for the
rule's local update (KP: ``grad_B = grad_W``; PFA: ``grad_R = B^T grad_W``).
``W_b`` is built in the backward, so nothing beyond BP's own tensors is kept between
forward and backward (DESIGN.md §2).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import ConversionError, did_you_mean


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


SCALES = ("xavier", "weight")


def feedback_std(weight: Tensor, scale: str | float, rule: str) -> float:
    """Standard deviation for drawn feedback state: ``"xavier"`` for W's shape (the
    paper's recipe), ``"weight"`` for W's own root-mean-square at conversion (suits
    pretrained weights and models initialised far below Xavier scale, e.g. timm ViTs),
    or a positive number."""
    if isinstance(scale, str):
        if scale == "xavier":
            return xavier_std(weight.shape)
        if scale == "weight":
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
    #: options that only choose how the same numbers are computed (PFA's ``route``): a
    #: checkpoint may be loaded into a conversion where they differ
    compute_only_options: ClassVar[frozenset[str]] = frozenset()
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
        ``mirror_lr=None`` shows as the rate it stands for). :attr:`options` holds the
        class's defaults instead."""
        return {k: getattr(self, k) for k in self.options}

    @property
    def draws_from_seed(self) -> bool:
        """Whether the node keeps drawing random numbers after conversion from streams seeded
        by ``(seed, op name)`` that ``state_dict`` does not hold (DFA's projections, WM's and
        PAL's noise, brSF's magnitudes): a checkpoint then resumes the same run only under
        the same ``seed``. Rules whose random draws all end up in saved tensors return False."""
        return False

    def state_numel(self) -> int:
        """Numbers this node holds as feedback state (its own parameters and buffers)."""
        tensors = [*self._parameters.values(), *self._buffers.values()]
        return sum(t.numel() for t in tensors if t is not None)

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
