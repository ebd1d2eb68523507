"""The feedback-aware ops: one per op family (linear, convolution).

Each op computes exactly the forward of ``F.linear`` / ``F.conv{1,2,3}d`` and, in the
backward, sends the error down through the node's feedback weight ``W_b``:

==========  ===============  ======================================
            backprop         feedback-aware op
==========  ===============  ======================================
forward     ``L_W(x) + b``   identical, bit for bit
grad x      ``L_W^T(e)``     ``L_{W_b}^T(e)`` (same stride/padding/…)
grad W      ``e ⊗ x``        unchanged
grad b      ``sum(e)``       unchanged
state       –                the rule's local update from ``grad W``
==========  ===============  ======================================

The op saves what BP saves (``x`` and the weight) plus references to the rule's state;
``W_b`` is built in the backward by the node. Where no gradient is wanted
(``torch.no_grad``, frozen inputs) the ops call the native function directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _ntuple

from .rules.base import FeedbackNode

# Bound once: pfa_fx.intercept may patch torch.nn.functional's names while opaque code runs.
_LINEAR = torch._C._nn.linear
_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
_CONV_T = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}


class Need(NamedTuple):
    """Which gradients the backward must produce."""

    x: bool
    w: bool
    b: bool
    state: bool


def _autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast like autocast casts a native linear/conv's inputs (feedback state included, like
    W); the op then runs with autocast off, so its backward sees one dtype."""
    first = tensors[0]
    assert first is not None
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _match_layout(kernel: Tensor, like: Tensor) -> Tensor:
    # Same memory format as the input keeps the backward on the kernel BP would pick.
    if kernel.dim() == 4 and like.dim() == 4:
        cl = torch.channels_last
        if like.is_contiguous(memory_format=cl) and not like.is_contiguous():
            return kernel.contiguous(memory_format=cl)
    return kernel


def _not_a_view(out: Tensor) -> Tensor:
    # linear on N-D input returns a view of its 2-D result; a custom Function's view
    # output could not be modified in place (e.g. by ReLU(inplace=True)) afterwards.
    # _unsafe_view is what matmul itself uses for the same reason.
    return torch.ops.aten._unsafe_view(out, out.shape) if out.dim() > 2 else out


# ----------------------------------------------------------------------------- linear
class LinearFamily:
    """Backward building blocks of ``y = x W^T + b`` (channels last)."""

    @staticmethod
    def positions(e: Tensor) -> int:
        return e.numel() // e.shape[-1]

    @staticmethod
    def fused(e: Tensor, x: Tensor, kernel: Tensor, need_x: bool, need_w: bool, need_b: bool):
        """``(L^T_kernel(e), e ⊗ x, sum e)``, each only where asked for."""
        gx = e.matmul(kernel) if need_x else None
        gw = gb = None
        if need_w or need_b:
            e2 = e.reshape(-1, e.shape[-1])
            gw = e2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
            gb = e2.sum(0) if need_b else None
        return gx, gw, gb

    @staticmethod
    def mix(e: Tensor, M: Tensor) -> Tensor:
        """Channel mix ``e -> e M`` with ``M`` of shape ``(1, c_in, c_out)``."""
        return e.matmul(M[0])


class _FeedbackLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, node, *state):
        return _not_a_view(_LINEAR(x, weight, bias))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, node, *state = inputs
        ctx.save_for_backward(x, weight, *state)
        ctx.node = node
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *state = ctx.saved_tensors
        nx, nw, nb, _, *ns = ctx.needs_input_grad
        need = Need(nx, nw, nb and ctx.has_bias, any(ns))
        gx, gw, gb, gs = ctx.node.run_backward(LinearFamily, e, x, weight, tuple(state), need)
        return gx, gw if nw else None, gb, None, *gs


def feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, node: FeedbackNode) -> Tensor:
    """``F.linear(x, weight, bias)`` whose backward uses ``node``'s feedback weight."""
    if not _wants_grad(x, weight, bias, *node.parameters()):
        if node.noisy:
            return node.noisy_forward(LinearFamily, lambda t, b: _LINEAR(t, weight, bias if b else None), x, weight)
        return _LINEAR(x, weight, bias)
    node.note_weight(weight)
    if node.records_input:
        node.record_input(x)
    x, weight, bias, *state = _autocast_inputs(x, weight, bias, *node.state())
    with torch.autocast(x.device.type, enabled=False):
        return _FeedbackLinear.apply(x, weight, bias, node, *state)


# ----------------------------------------------------------------------- convolution
class ConvFamily:
    """Backward building blocks of a convolution with fixed stride/padding/dilation/groups."""

    def __init__(self, stride, padding, dilation, groups, bias_sizes, transposed=False, output_padding=None):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.bias_sizes = bias_sizes
        # a transposed convolution's weight is (in, out/groups, *k); its backward is the
        # same native call with transposed=True
        self.transposed = transposed
        self.output_padding = output_padding if output_padding is not None else [0] * len(stride)

    @staticmethod
    def positions(e: Tensor) -> int:
        return e.numel() // e.shape[1]

    def fused(self, e: Tensor, x: Tensor, kernel: Tensor, need_x: bool, need_w: bool, need_b: bool):
        """One native call, the one BP makes: ``grad_x`` runs through ``kernel``; the weight
        and bias gradients never read the kernel's values."""
        return torch.ops.aten.convolution_backward(
            e,
            x,
            _match_layout(kernel, x),
            self.bias_sizes if need_b else None,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.output_padding,
            self.groups,
            [need_x, need_w, need_b],
        )

    def mix(self, e: Tensor, M: Tensor) -> Tensor:
        """Per-group channel mix with ``M`` of shape ``(groups, c_in/g, c_out/g)``: a 1x1 conv."""
        g, a, b = M.shape
        if g == 1 and e.numel() == e.shape[0] * e.shape[1]:
            # one position per sample (e.g. a ResNet's last stage on small images): a plain
            # matmul, about twice as fast as mkldnn's 1x1 convolution on the CPU
            return e.reshape(e.shape[0], a).mm(M[0]).reshape(e.shape[0], b, *e.shape[2:])
        kernel = M.transpose(1, 2).reshape(g * b, a, *([1] * (e.dim() - 2)))
        return _CONV[e.dim() - 2](e, _match_layout(kernel, e), None, 1, 0, 1, g)


class _FeedbackConv(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, node, stride, padding, dilation, groups, output_padding, *state):
        n = weight.dim() - 2
        if output_padding is None:
            return _CONV[n](x, weight, bias, stride, padding, dilation, groups)
        return _CONV_T[n](x, weight, bias, stride, padding, output_padding, groups, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, node, stride, padding, dilation, groups, output_padding, *state = inputs
        ctx.save_for_backward(x, weight, *state)
        ctx.node = node
        bias_sizes = None if bias is None else list(bias.shape)
        ctx.family = ConvFamily(
            stride, padding, dilation, groups, bias_sizes, output_padding is not None, output_padding
        )

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *state = ctx.saved_tensors
        nx, nw, nb, *rest = ctx.needs_input_grad
        ns = rest[6:]
        need = Need(nx, nw, nb and ctx.family.bias_sizes is not None, any(ns))
        gx, gw, gb, gs = ctx.node.run_backward(ctx.family, e, x, weight, tuple(state), need)
        return gx, gw if nw else None, gb, None, None, None, None, None, None, *gs


def _same_padding(x: Tensor, weight: Tensor, dilation: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Resolve ``padding="same"`` as torch does: symmetric, extra element on the far side."""
    n = weight.dim() - 2
    pads, extra = [], []
    for d in range(n):
        total = dilation[d] * (weight.shape[2 + d] - 1)
        pads.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        pad_arg: list[int] = []
        for d in reversed(range(n)):
            pad_arg += [0, extra[d]]
        x = F.pad(x, pad_arg)
    return x, pads


def _conv_args(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[Tensor, list, list, list]:
    """Stride, padding and dilation as lists; ``"same"``/``"valid"`` resolved (``x`` padded
    on the far side where ``"same"`` needs an odd total)."""
    n = weight.dim() - 2
    tup = _ntuple(n)
    stride, dilation = list(tup(stride)), list(tup(dilation))
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * n
        elif padding == "same":
            x, padding = _same_padding(x, weight, dilation)
        else:
            raise ValueError(f"padding must be 'valid', 'same' or numbers, got {padding!r}")
    return x, stride, list(tup(padding)), dilation


def feedback_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    node: FeedbackNode,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv{1,2,3}d`` whose backward uses ``node``'s feedback weight."""
    n = weight.dim() - 2
    if not _wants_grad(x, weight, bias, *node.parameters()):
        if node.noisy:
            x, stride, padding, dilation = _conv_args(x, weight, stride, padding, dilation)
            family = ConvFamily(stride, padding, dilation, groups, None)
            conv = _CONV[n]
            return node.noisy_forward(
                family, lambda t, b: conv(t, weight, bias if b else None, stride, padding, dilation, groups), x, weight
            )
        return _CONV[n](x, weight, bias, stride, padding, dilation, groups)
    x, stride, padding, dilation = _conv_args(x, weight, stride, padding, dilation)
    node.note_weight(weight)
    if node.records_input:
        node.record_input(x)
    x, weight, bias, *state = _autocast_inputs(x, weight, bias, *node.state())
    with torch.autocast(x.device.type, enabled=False):
        return _FeedbackConv.apply(x, weight, bias, node, stride, padding, dilation, groups, None, *state)


def feedback_conv_transpose(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    node: FeedbackNode,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """``F.conv_transpose{1,2,3}d`` (same argument order) whose backward uses ``node``'s
    feedback weight; ``weight`` is ``(in, out/groups, *k)`` as torch stores it."""
    n = weight.dim() - 2
    wants_grad = _wants_grad(x, weight, bias, *node.parameters())
    if not wants_grad and not node.noisy:
        return _CONV_T[n](x, weight, bias, stride, padding, output_padding, groups, dilation)
    tup = _ntuple(n)
    stride, padding, dilation = list(tup(stride)), list(tup(padding)), list(tup(dilation))
    output_padding = list(tup(output_padding))
    if not wants_grad:  # a rule's own no-grad pass (PAL's noisy pass)
        family = ConvFamily(stride, padding, dilation, groups, None, True, output_padding)
        conv_t = _CONV_T[n]
        return node.noisy_forward(
            family,
            lambda t, b: conv_t(t, weight, bias if b else None, stride, padding, output_padding, groups, dilation),
            x,
            weight,
        )
    node.note_weight(weight)
    if node.records_input:
        node.record_input(x)
    x, weight, bias, *state = _autocast_inputs(x, weight, bias, *node.state())
    with torch.autocast(x.device.type, enabled=False):
        return _FeedbackConv.apply(x, weight, bias, node, stride, padding, dilation, groups, output_padding, *state)


# ------------------------------------------------------------- expert-mixed kernels
class _FeedbackExpertMix(torch.autograd.Function):
    """``routing @ bank``: per-sample kernels mixed from a bank of expert kernels (timm's
    CondConv). The error reaching the routing runs through the bank's feedback instead of
    the bank; the bank's gradient is BP's (``routing^T g``) and feeds the rule's update.
    The conv that consumes the mixed kernels finds this node through its weight's
    ``grad_fn`` and sends its error down through the same mix of feedback kernels."""

    @staticmethod
    def forward(routing, bank, node, *state):
        return torch.matmul(routing, bank)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        routing, bank, node, *state = inputs
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


def _feedback_bank(ctx, bank: Tensor, state) -> Tensor:
    if ctx.feedback_bank is None:
        node = ctx.node
        fb = node.feedback_from(bank.reshape(node.weight_shape), tuple(state))
        ctx.feedback_bank = fb.reshape(bank.shape)
    return ctx.feedback_bank


def feedback_expert_mix(routing: Tensor, bank: Tensor, node: FeedbackNode) -> Tensor:
    """``torch.matmul(routing, bank)`` for a bank of expert kernels ``(experts, k)`` whose
    node holds their feedback state (W's shape ``(experts·out, in/g, *k)``)."""
    if not _wants_grad(routing, bank, *node.parameters()):
        return torch.matmul(routing, bank)
    node.note_weight(bank.reshape(node.weight_shape))
    routing, bank, *state = _autocast_inputs(routing, bank, *node.state())
    with torch.autocast(routing.device.type, enabled=False):
        return _FeedbackExpertMix.apply(routing, bank, node, *state)


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
