"""The feedback-aware ops: one per op family (linear, convolution).

Each op computes exactly the forward of ``F.linear`` / ``F.conv{1,2,3}d`` and, in the
backward, sends the error down through ``W_b = node(W)`` instead of ``W``:

==========  ===============  ======================================
            backprop         feedback-aware op
==========  ===============  ======================================
forward     ``L_W(x) + b``   identical, bit for bit
grad x      ``L_W^T(e)``     ``L_{W_b}^T(e)`` (same stride/padding/…)
grad W      ``e ⊗ x``        unchanged
grad b      ``sum(e)``       unchanged
grad W_b    –                ``grad W`` (autograd takes it to the rule's state)
==========  ===============  ======================================

Where no gradient is wanted (``torch.no_grad``, frozen inputs) the ops call the native
function directly and never build ``W_b``: inference costs exactly what it did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _ntuple, _reverse_repeat_tuple

from .rules.base import FeedbackNode

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast like autocast casts the inputs of a native linear/conv (the op then runs with
    autocast off, so its backward sees one dtype)."""
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


def _match_layout(weight_b: Tensor, weight: Tensor) -> Tensor:
    # Same memory format as W keeps the backward on the kernel BP would pick.
    if weight.dim() == 4 and weight_b.dim() == 4:
        cl = torch.channels_last
        if weight.is_contiguous(memory_format=cl) and not weight.is_contiguous():
            return weight_b.contiguous(memory_format=cl)
    return weight_b


# ----------------------------------------------------------------------------- linear
class _FeedbackLinear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _, bias, weight_b = inputs
        ctx.save_for_backward(x, weight_b)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight_b = ctx.saved_tensors
        need_x, need_w, need_b, need_wb = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = e.matmul(weight_b)
        if need_w or need_wb:
            e2 = e.reshape(-1, e.shape[-1])
            grad_w = e2.t().mm(x.reshape(-1, x.shape[-1]))
        if need_b and ctx.has_bias:
            grad_b = e.reshape(-1, e.shape[-1]).sum(0)
        return grad_x, grad_w if need_w else None, grad_b, grad_w if need_wb else None


class _PopulationLinear(torch.autograd.Function):
    """PFA as the paper describes it (reference-style, for comparison and as an oracle):
    the error population ``ē = e B`` is materialized over the batch."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, R: Tensor, B: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _, bias, R, B = inputs
        ctx.save_for_backward(x, R, B)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, e: Tensor):
        x, R, B = ctx.saved_tensors
        e2, x2 = e.reshape(-1, e.shape[-1]), x.reshape(-1, x.shape[-1])
        ebar = e2.mm(B[0])  # (batch, n̄)
        grad_x = ebar.mm(R).reshape(x.shape)
        grad_w = e2.t().mm(x2) if ctx.needs_input_grad[1] else None
        grad_b = e2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_R = ebar.t().mm(x2) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w, grad_b, grad_R, None


def feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, node: FeedbackNode) -> Tensor:
    """``F.linear(x, weight, bias)`` whose backward uses ``node``'s feedback weight."""
    if not _wants_grad(x, weight, bias, *node.parameters()):
        return F.linear(x, weight, bias)
    if getattr(node, "population", False):
        x, weight, bias, R, B = _autocast_inputs(x, weight, bias, node.R, node.B)
        with torch.autocast(x.device.type, enabled=False):
            return _PopulationLinear.apply(x, weight, bias, R, B)
    weight_b = node(weight)
    x, weight, bias, weight_b = _autocast_inputs(x, weight, bias, weight_b)
    with torch.autocast(x.device.type, enabled=False):
        return _FeedbackLinear.apply(x, weight, bias, weight_b)


# ----------------------------------------------------------------------- convolution
class _FeedbackConv(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, weight_b, stride, padding, dilation, groups):
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _, bias, weight_b, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight_b)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight_b = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b, need_wb = ctx.needs_input_grad[:4]
        # One native call, as BP makes it, with W_b in W's place: grad_x runs through W_b,
        # grad_W and grad_b (which never read the weight's values) come out unchanged.
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            e,
            x,
            weight_b,
            ctx.bias_sizes,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            groups,
            [need_x, need_w or need_wb, need_b and ctx.bias_sizes is not None],
        )
        return grad_x, grad_w if need_w else None, grad_b, grad_w if need_wb else None, None, None, None, None


class _PopulationConv(torch.autograd.Function):
    """Reference-style PFA for convolutions: ``ē`` (n̄ channels) materialized over the batch
    by a 1x1 channel mix with ``B``, then carried down by the full kernel ``R``."""

    @staticmethod
    def forward(x, weight, bias, R, B, stride, padding, dilation, groups):
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _, bias, R, B, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, R, B)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.weight_shape = inputs[1].shape

    @staticmethod
    def backward(ctx, e: Tensor):
        x, R, B = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        n, c = e.shape[:2]
        spatial = e.shape[2:]
        eg = e.reshape(n, groups, c // groups, -1)
        ebar = torch.einsum("ngos,gok->ngks", eg, B).reshape(n, -1, *spatial)
        zeros = [0] * len(stride)
        need_x, need_w, need_b, need_R = ctx.needs_input_grad[:4]
        grad_x, grad_R, _ = torch.ops.aten.convolution_backward(
            ebar, x, R, None, stride, padding, dilation, False, zeros, groups, [need_x, need_R, False]
        )
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            e,
            x,
            R.new_empty(ctx.weight_shape),
            ctx.bias_sizes,
            stride,
            padding,
            dilation,
            False,
            zeros,
            groups,
            [False, need_w, need_b and ctx.bias_sizes is not None],
        )
        return grad_x, grad_w, grad_b, grad_R, None, None, None, None, None


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


def feedback_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    node: FeedbackNode,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """``F.conv{1,2,3}d`` (or an ``nn.Conv*d`` with any ``padding_mode``) whose backward
    uses ``node``'s feedback weight."""
    n = weight.dim() - 2
    tup = _ntuple(n)
    if padding_mode != "zeros":
        # as nn.Conv*d does: pad explicitly, then convolve without padding
        x = F.pad(x, _reverse_repeat_tuple(tup(padding), 2), mode=padding_mode)
        padding = 0
    if not _wants_grad(x, weight, bias, *node.parameters()):
        return _CONV[n](x, weight, bias, stride, padding, dilation, groups)
    stride, dilation = list(tup(stride)), list(tup(dilation))
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * n
        elif padding == "same":
            x, padding = _same_padding(x, weight, dilation)
        else:
            raise ValueError(f"padding must be 'valid', 'same' or numbers, got {padding!r}")
    padding = list(tup(padding))
    if getattr(node, "population", False):
        x, weight, bias, R, B = _autocast_inputs(x, weight, bias, node.R, node.B)
        with torch.autocast(x.device.type, enabled=False):
            return _PopulationConv.apply(x, weight, bias, R, B, stride, padding, dilation, groups)
    weight_b = _match_layout(node(weight), weight)
    x, weight, bias, weight_b = _autocast_inputs(x, weight, bias, weight_b)
    with torch.autocast(x.device.type, enabled=False):
        return _FeedbackConv.apply(x, weight, bias, weight_b, stride, padding, dilation, groups)
