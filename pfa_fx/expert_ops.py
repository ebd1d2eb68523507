"""Expert-mixed kernels (timm's CondConv): per-sample kernels mixed from a bank of expert
kernels, ``routing @ bank``, whose backward runs the error to the routing through the bank's
feedback; the conv that consumes the mixed kernels sends its error down through the same
mix of feedback kernels (:class:`PerSampleKernelFeedback`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .node import FeedbackNode
from .ops import _apply_slow, _wants_grad, note_weight


class _FeedbackExpertMix(torch.autograd.Function):
    """``routing @ bank``: per-sample kernels mixed from a bank of expert kernels (timm's
    CondConv). The error reaching the routing runs through the bank's feedback instead of
    the bank; the bank's gradient is BP's (``routing^T g``) and feeds the rule's update.
    The conv that consumes the mixed kernels finds this node through its weight's
    ``grad_fn`` and sends its error down through the same mix of feedback kernels."""

    @staticmethod
    def forward(ctx, routing, bank, node, *state):
        _FeedbackExpertMix._keep(ctx, routing, bank, node, state)
        return torch.matmul(routing, bank)

    @staticmethod
    def _keep(ctx, routing, bank, node, state) -> None:
        ctx.save_for_backward(routing, bank, *state)
        ctx.node = node
        ctx.pfa_expert_mix = True
        ctx.feedback_bank = None  # built once per step, by whichever backward needs it first

    @staticmethod
    def feedback_kernels(ctx) -> Tensor:
        """``routing @ feedback_bank``: the per-sample feedback kernels, flat."""
        routing, bank, *state = ctx.saved_tensors
        return torch.matmul(routing, _feedback_bank(ctx, bank, state))

    @staticmethod
    def backward(ctx, g: Tensor):
        routing, bank, *state = ctx.saved_tensors
        node = ctx.node
        n_routing, n_bank, _, *n_state = ctx.needs_input_grad
        if node.as_backprop:
            fb = bank
        else:
            fb = _feedback_bank(ctx, bank, state)
        grad_r = torch.matmul(g, fb.transpose(-1, -2)) if n_routing else None
        grad_bank = None
        if n_bank or any(n_state):
            g2, r2 = g.reshape(-1, g.shape[-1]), routing.reshape(-1, routing.shape[-1])
            grad_bank = r2.t().mm(g2)
        gs: tuple = (None,) * len(state)
        if any(n_state) and not node.as_backprop:
            gs = tuple(
                s if s is None else s.reshape(t.shape)
                for s, t in zip(node.state_grads(grad_bank.reshape(node.weight_shape), tuple(state)), state)
            )
        return grad_r, grad_bank if n_bank else None, None, *gs


class _FeedbackExpertMixFunc(_FeedbackExpertMix):
    """The same op with ``setup_context``, the form ``torch.func`` transforms accept."""

    @staticmethod
    def forward(routing, bank, node, *state):  # type: ignore[override]
        return torch.matmul(routing, bank)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        routing, bank, node, *state = inputs
        _FeedbackExpertMix._keep(ctx, routing, bank, node, tuple(state))


_EXPERT_MIX_FNS = (_FeedbackExpertMix, _FeedbackExpertMixFunc)


def _feedback_bank(ctx, bank: Tensor, state) -> Tensor:
    if ctx.feedback_bank is None:
        node = ctx.node
        fb = node.feedback_from(bank.reshape(node.weight_shape), tuple(state))
        ctx.feedback_bank = fb.reshape(bank.shape)
    return ctx.feedback_bank


def feedback_expert_mix(routing: Tensor, bank: Tensor, node: FeedbackNode) -> Tensor:
    """``torch.matmul(routing, bank)`` for a bank of expert kernels ``(experts, k)`` whose
    node holds their feedback state (W's shape ``(experts·out, in/g, *k)``)."""
    if not _wants_grad(routing, bank, None, node):
        return torch.matmul(routing, bank)
    note_weight(node, bank.reshape(node.weight_shape))
    return _apply_slow(_EXPERT_MIX_FNS, routing, bank, node, *node.state())


def expert_mix_of(weight: Tensor, max_nodes: int = 8):
    """The ``_FeedbackExpertMix`` autograd node a (reshaped) conv kernel comes from, or None."""
    fn, seen = weight.grad_fn, 0
    while fn is not None and seen < max_nodes:
        if getattr(fn, "pfa_expert_mix", False):
            return fn
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:  # only views/reshapes lie between the mix and the conv
            return None
        fn, seen = nxt[0], seen + 1
    return None


class PerSampleKernelFeedback(FeedbackNode):
    """Feedback of a conv whose kernel is an expert mix: ``W_b`` is the same mix of the
    experts' feedback kernels. Holds no state; built per call by the interception."""

    rule = "expert-mix"

    def __init__(self, weight: Tensor, mix) -> None:
        super().__init__(weight, groups=1, generator=None)  # type: ignore[arg-type]
        self._mix = mix

    @property
    def as_backprop(self) -> bool:  # follows the bank's node (pfa_fx.backprop_mode)
        mix = self.__dict__.get("_mix")
        return bool(mix is not None and mix.node.as_backprop)

    @as_backprop.setter
    def as_backprop(self, value: bool) -> None:
        pass

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return _FeedbackExpertMix.feedback_kernels(self._mix).reshape(weight.shape)
