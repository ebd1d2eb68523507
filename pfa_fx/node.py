"""The feedback node every rule builds on.

A :class:`FeedbackNode` owns one weight op's feedback state. The feedback op calls
``node.backward`` with the error ``e``; the default builds ``W_b = feedback_from(W, state)``
and runs BP's own fused backward call with ``W_b`` in W's place, so ``grad_W`` and
``grad_b`` come out exactly as BP's, and hands ``grad_W`` to :meth:`~FeedbackNode.state_grads`
for the rule's local update (KP: ``grad_B = grad_W``; PFA: ``grad_R = B^T grad_W``).
``W_b`` is built in the backward, so nothing beyond BP's own tensors is kept between
forward and backward (docs/design.md, section 'The feedback op').

A rule is a :class:`~pfa_fx.RuleConfig` (its options) and a node class (its state and
backward), registered with :func:`pfa_fx.register_rule`. Drawing and redrawing fixed
feedback live in :mod:`pfa_fx.draws`, sharded and squeezed state in :mod:`pfa_fx.sharding`;
the node mixes them in.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .config import RuleConfig
from .draws import (  # noqa: F401  (names rules and older code import from here)
    DEFAULT_SCALE,
    SCALES,
    CastTrail,
    Redrawing,
    derived_seed,
    feedback_std,
    gaussian_pieces,
    generator_at,
    generator_key,
    seeded_generator,
    xavier_std,
)
from .errors import ConversionError
from .sharding import HeldShapes, gathered, local_part, local_tensor, units_gathered  # noqa: F401


class FeedbackNode(Redrawing, HeldShapes, nn.Module):
    """Feedback state of one weight op.

    Attributes:
        rule: the rule's registered name (``"fa"``, ``"pfa"``, ...).
        config_type: the rule's :class:`~pfa_fx.RuleConfig` class; :attr:`rule_config` is
            this node's instance, :attr:`config` its options as a dict.
        groups: convolution groups; feedback never crosses a group.
        seed: the ``seed`` of the conversion that drew this node's state (None when the
            node was built outside :func:`pfa_fx.convert`).
        op_name: the op's name in the converted model (``"layer1.0.conv1"``).
    """

    rule: ClassVar[str] = ""
    config_type: ClassVar[type[RuleConfig]] = RuleConfig
    #: the options the rule accepts with their defaults (from :attr:`config_type`)
    options: ClassVar[dict[str, Any]] = {}
    #: whether W_b depends on trainable state (the op then returns grad_W for it)
    plastic: ClassVar[bool] = False
    #: False for rules without a W-shaped ``W_b`` (DFA projects the output error instead)
    has_feedback_weight: ClassVar[bool] = True
    #: whether torch.compile may trace the op's backward ahead of time (not DFA's)
    traceable_backward: ClassVar[bool] = True
    #: whether the op hands its input to :meth:`record_input` on training calls (PAL)
    records_input: ClassVar[bool] = False
    #: False where fixed random feedback is redrawn in every backward instead of held
    store_feedback: bool = True
    #: set during a rule's own no-grad pass (PAL's): the op calls :meth:`noisy_forward`
    noisy: bool = False
    #: from :attr:`config_type` (see :class:`~pfa_fx.RuleConfig`)
    compute_only_options: ClassVar[frozenset[str]] = frozenset({"store_feedback"})
    learned_feedback: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.take_config()

    @classmethod
    def take_config(cls) -> None:
        """Read the options, their defaults and the flags from :attr:`config_type`: one
        source of a rule's options (run for every subclass, and by ``register_rule``)."""
        cls.options = cls.config_type.defaults()
        cls.compute_only_options = cls.config_type.compute_only
        cls.learned_feedback = cls.config_type.learned_feedback

    def __init__(
        self,
        weight: Tensor,
        *,
        groups: int,
        generator: torch.Generator,
        transposed: bool = False,
        config: RuleConfig | None = None,
        **options: Any,
    ):
        super().__init__()
        if config is None:
            config = self.config_type.from_options(options)
        elif options or type(config) is not self.config_type:
            raise ConversionError(f"{type(self).__name__} takes one {self.config_type.__name__}, got {config!r}")
        self.rule_config = config
        self.groups = int(groups)
        self.weight_shape = tuple(weight.shape)
        self.transposed = bool(transposed)  # a transposed convolution's weight is (in, out/groups, *k)
        self.n_out = weight.shape[1] * self.groups if self.transposed else weight.shape[0]
        # a plain reference, not registered: state_dict lists the weight once, under its own name
        self._weight_ref: list[Tensor] = [weight]
        self.param_transposed = False  # set by the pass when the op uses the parameter as x @ P
        self._last_weight: Tensor | None = None
        # set by the pass where the model computes the weight from its parameters
        self._weight_fn: list[nn.Module] = []
        self.as_backprop = False  # set by pfa_fx.backprop_mode for gradient-alignment probes
        self.seed: int | None = None  # set by convert, which seeds the draws with (seed, op name)
        self.generator = "mt19937"  # and draws with this generator (draws.GENERATORS)
        self.op_name = ""
        self.owner_path: str | None = None  # the path of the module owning the weight (set by convert)

    # -- what a rule defines -------------------------------------------------------------
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

    def inspect_state(self) -> tuple[Tensor, ...]:
        """The state :meth:`feedback_weight` reports (the last step's, without advancing)."""
        return self.state()

    def record_input(self, x: Tensor) -> None:
        """Called with the op's input on training calls when :attr:`records_input` is set."""

    def noisy_forward(self, family: Any, native: Any, x: Tensor, weight: Tensor) -> Tensor:
        """The op's output while :attr:`noisy` is set; ``native(x, with_bias)`` is the op."""
        return native(x, True)

    @classmethod
    def attach(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> None:
        """Called once by ``convert`` with the converted model and this rule's nodes, for
        rules that need something at the model level (DFA's output-error hook)."""

    @classmethod
    def report_notes(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> list[str]:
        """Lines :func:`pfa_fx.report` prints about this rule's model-level behaviour."""
        return []

    @property
    def draws_from_seed(self) -> bool:
        """Whether the node keeps drawing from ``(seed, op name)`` streams that ``state_dict``
        does not hold (DFA, WM, PAL, brSF): a checkpoint then resumes only under its seed."""
        return False

    # -- inspection --------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """This node's options with defaults resolved (WM's ``mirror_lr=None`` as the rate it
        stands for); ``store_feedback`` only where it is False, as checkpoints record it."""
        return {k: getattr(self, k) for k in self.options if not (k == "store_feedback" and self.store_feedback)}

    @property
    def weight(self) -> Tensor:
        """The forward weight ``W``: the model's computed weight (e.g. standardized) from the
        current parameters where the pass lifted its computation, else the last one the op
        used, else the parameter itself."""
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
