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

The Python work per call is kept to what the op needs (``benchmarks/op_overhead.py``
measures it): the Functions are ``forward(ctx, ...)`` ones, which autograd calls without
binding their arguments through ``inspect.signature`` (their ``setup_context`` twins serve
``torch.func`` transforms, which need that form); a convolution's stride/padding/dilation
are resolved once per node and argument set, not per call; autocast's casts and context
run only while autocast is on.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _ntuple

from .errors import ConversionError
from .node import FeedbackNode

# Bound once: pfa_fx.capture.intercept may patch torch.nn.functional's names while opaque code runs.
_LINEAR = torch._C._nn.linear
_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
_CONV_T = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_CL = torch.channels_last
# one C call each (torch.compile folds them to constants)
_grad_on = torch.is_grad_enabled
_autocast_on = torch._C._is_any_autocast_enabled
_transforms_on = torch._C._are_functorch_transforms_active
_compiling = torch.compiler.is_compiling


class Need(NamedTuple):
    """Which gradients the backward must produce."""

    x: bool
    w: bool
    b: bool
    state: bool


# the 16 of them, built once: (need_x, need_w, need_b, need_state) -> Need
_NEEDS = {k: Need(*k) for k in itertools.product((False, True), repeat=4)}


def _autocast_inputs(*args):
    """Cast like autocast casts a native linear/conv's inputs (feedback state included, like
    W; arguments that are not tensors pass as they are); the op then runs with autocast off,
    so its backward sees one dtype."""
    dev = args[0].device.type
    if not torch.is_autocast_enabled(dev):
        return args
    dtype = torch.get_autocast_dtype(dev)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t for t in args
    )


def _apply_slow(fns: tuple[type, type], x: Tensor, *args) -> Tensor:
    """``fn.apply(x, *args)`` where autocast or a ``torch.func`` transform is on: the
    setup_context twin under transforms; under autocast with the inputs and state cast as a
    native op's are, and autocast off inside (args: tensors, then ``node`` and other
    non-tensors, then the state tensors). The ops call ``fns[0].apply`` directly otherwise."""
    fn = fns[1] if _transforms_on() else fns[0]
    if not _autocast_on():
        return fn.apply(x, *args)
    cast = _autocast_inputs(x, *args)
    with torch.autocast(x.device.type, enabled=False):
        return fn.apply(*cast)


def _state_wants_grad(bias: Tensor | None, node: FeedbackNode) -> bool:
    """Whether the bias or any of the node's own parameters (KP's ``B``, PFA's ``R``/``S``)
    requires grad: what the ops ask only when neither the input nor the weight does."""
    return (bias is not None and bias.requires_grad) or any(p.requires_grad for p in node.parameters())


def _wants_grad(x: Tensor, weight: Tensor, bias: Tensor | None, node: FeedbackNode) -> bool:
    """Grad mode on and the input, the weight, the bias or the node's parameters requiring grad."""
    return _grad_on() and (x.requires_grad or weight.requires_grad or _state_wants_grad(bias, node))


def _match_layout(kernel: Tensor, like: Tensor) -> Tensor:
    # Same memory format as the input keeps the backward on the kernel BP would pick.
    if kernel.dim() == 4 and like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=_CL):
        return kernel.contiguous(memory_format=_CL)
    return kernel


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
            e2 = e if e.dim() == 2 else e.reshape(-1, e.shape[-1])
            if need_w:
                gw = e2.t().mm(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]))
            if need_b:
                gb = e2.sum(0)
        return gx, gw, gb

    @staticmethod
    def population_call_macs(device: torch.device) -> int:
        """Fixed cost, in multiply-adds, of the native calls a population route makes beyond
        a product route's: none for a linear op (both make the same number of matmuls)."""
        return 0

    @staticmethod
    def mix(e: Tensor, M: Tensor) -> Tensor:
        """Channel mix ``e -> e M`` with ``M`` of shape ``(1, c_in, c_out)``."""
        return e.matmul(M[0])


class _FeedbackLinear(torch.autograd.Function):
    # forward(ctx, ...): autograd calls it without binding the arguments through
    # inspect.signature, which it does on every call of a setup_context Function
    @staticmethod
    def forward(ctx, x, weight, bias, node, *state):
        ctx.save_for_backward(x, weight, *state)
        ctx.node = node
        out = _LINEAR(x, weight, bias)
        # linear on N-D input returns a view of its 2-D result; a custom Function's view
        # output could not be modified in place (e.g. by ReLU(inplace=True)) afterwards.
        # detach() makes it a tensor of its own for autograd (the 2-D result is referenced
        # nowhere else), at a tenth of the cost of aten._unsafe_view's dispatch
        return out.detach() if out.dim() > 2 else out

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *state = ctx.saved_tensors
        nx, nw, nb, _, *ns = ctx.needs_input_grad  # nb: a bias was given and wants its gradient
        need = _NEEDS[nx, nw, nb, any(ns)]
        gx, gw, gb, gs = run_backward(ctx.node, LinearFamily, e, x, weight, tuple(state), need)
        return gx, gw if nw else None, gb, None, *gs


class _FeedbackLinearFunc(_FeedbackLinear):
    """The same op with ``setup_context``, the form ``torch.func`` transforms accept."""

    @staticmethod
    def forward(x, weight, bias, node, *state):  # type: ignore[override]
        out = _LINEAR(x, weight, bias)
        return out.detach() if out.dim() > 2 else out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, node, *state = inputs
        ctx.save_for_backward(x, weight, *state)
        ctx.node = node


_LINEAR_FNS = (_FeedbackLinear, _FeedbackLinearFunc)


def feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, node: FeedbackNode) -> Tensor:
    """``F.linear(x, weight, bias)`` whose backward uses ``node``'s feedback weight."""
    if not (_grad_on() and (x.requires_grad or weight.requires_grad or _state_wants_grad(bias, node))):
        if node.noisy:
            return node.noisy_forward(LinearFamily, lambda t, b: _LINEAR(t, weight, bias if b else None), x, weight)
        return _LINEAR(x, weight, bias)
    note_weight(node, weight)
    if node.records_input:
        node.record_input(x)
    if _autocast_on() or _transforms_on():
        return _apply_slow(_LINEAR_FNS, x, weight, bias, node, *node.state())
    return _FeedbackLinear.apply(x, weight, bias, node, *node.state())


# ----------------------------------------------------------------------- convolution
class ConvFamily:
    """Backward building blocks of a convolution with fixed stride/padding/dilation/groups
    (lists of ints, ``"same"``/``"valid"`` resolved; ``pre_pad``: the far-side padding
    ``"same"`` adds to the input where its total is odd, or None)."""

    def __init__(
        self, stride, padding, dilation, groups, bias_sizes, transposed=False, output_padding=None, pre_pad=None
    ):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.bias_sizes = bias_sizes
        # a transposed convolution's weight is (in, out/groups, *k); its backward is the
        # same native call with transposed=True
        self.transposed = transposed
        self.output_padding = output_padding if output_padding is not None else [0] * len(stride)
        self.pre_pad = pre_pad
        # the forward: native(x, weight, bias, *args)
        n = len(stride)
        if transposed:
            self.native = _CONV_T[n]
            self.args = (stride, padding, self.output_padding, groups, dilation)
        else:
            self.native = _CONV[n]
            self.args = (stride, padding, dilation, groups)

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The forward: the native convolution with these arguments."""
        return self.native(x, weight, bias, *self.args)

    @staticmethod
    def positions(e: Tensor) -> int:
        return e.numel() // e.shape[1]

    def fused(self, e: Tensor, x: Tensor, kernel: Tensor, need_x: bool, need_w: bool, need_b: bool):
        """One native call, the one BP makes: ``grad_x`` runs through ``kernel``; the weight
        and bias gradients never read the kernel's values."""
        # the kernel in the input's memory format keeps the backward on the path BP takes
        if kernel.dim() == 4 and not x.is_contiguous() and x.dim() == 4 and x.is_contiguous(memory_format=_CL):
            kernel = kernel.contiguous(memory_format=_CL)
        return _CONV_BACKWARD(
            e,
            x,
            kernel,
            self.bias_sizes if need_b else None,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.output_padding,
            self.groups,
            [need_x, need_w, need_b],
        )

    @staticmethod
    def population_call_macs(device: torch.device) -> int:
        """Fixed cost, in multiply-adds, of the calls a population route makes beyond a
        product route's: a second convolution backward and a 1x1 mix instead of one bmm.
        On this project's CPU the pair costs ~100 µs whatever the size (measured with
        ``benchmarks/op_overhead.py``), ~2 M multiply-adds of one core's throughput; on a GPU
        the launches cost far more than they compute."""
        return _POPULATION_CALL_MACS.get(device.type, _POPULATION_CALL_MACS["other"])

    def mix(self, e: Tensor, M: Tensor) -> Tensor:
        """Per-group channel mix with ``M`` of shape ``(groups, c_in/g, c_out/g)``: a 1x1 conv."""
        g, a, b = M.shape
        if g == 1 and e.numel() == e.shape[0] * e.shape[1]:
            # one position per sample (e.g. a ResNet's last stage on small images): a plain
            # matmul, about twice as fast as mkldnn's 1x1 convolution on the CPU
            return e.reshape(e.shape[0], a).mm(M[0]).reshape(e.shape[0], b, *e.shape[2:])
        kernel = M.transpose(1, 2).reshape(g * b, a, *([1] * (e.dim() - 2)))
        return _CONV[e.dim() - 2](e, _match_layout(kernel, e), None, 1, 0, 1, g)


_POPULATION_CALL_MACS = {"cpu": 2_000_000, "other": 100_000_000}


class _FeedbackConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, node, family, *state):
        ctx.save_for_backward(x, weight, *state)
        ctx.node = node
        ctx.family = family
        return family.native(x, weight, bias, *family.args)

    @staticmethod
    def backward(ctx, e: Tensor):
        x, weight, *state = ctx.saved_tensors
        nx, nw, nb, _, _, *ns = ctx.needs_input_grad  # nb: a bias was given and wants its gradient
        need = _NEEDS[nx, nw, nb, any(ns)]
        gx, gw, gb, gs = run_backward(ctx.node, ctx.family, e, x, weight, tuple(state), need)
        return gx, gw if nw else None, gb, None, None, *gs


class _FeedbackConvFunc(_FeedbackConv):
    """The same op with ``setup_context``, the form ``torch.func`` transforms accept."""

    @staticmethod
    def forward(x, weight, bias, node, family, *state):  # type: ignore[override]
        return family.native(x, weight, bias, *family.args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, node, family, *state = inputs
        ctx.save_for_backward(x, weight, *state)
        ctx.node = node
        ctx.family = family


_CONV_FNS = (_FeedbackConv, _FeedbackConvFunc)


def _same_padding(weight: Tensor, dilation: Sequence[int]) -> tuple[list[int], list[int] | None]:
    """Resolve ``padding="same"`` as torch does: symmetric, and where the total is odd one
    more element on the far side, added to the input (``F.pad`` arguments, or None)."""
    n = weight.dim() - 2
    pads, extra = [], []
    for d in range(n):
        total = dilation[d] * (weight.shape[2 + d] - 1)
        pads.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if not any(extra):
        return pads, None
    pad_arg: list[int] = []
    for d in reversed(range(n)):
        pad_arg += [0, extra[d]]
    return pads, pad_arg


def _conv_family(weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups, output_padding) -> ConvFamily:
    """Stride, padding, dilation (and a transposed convolution's output padding) as lists;
    ``"same"``/``"valid"`` resolved."""
    n = weight.dim() - 2
    tup = _ntuple(n)
    stride, dilation = list(tup(stride)), list(tup(dilation))
    pre_pad = None
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * n
        elif padding == "same":
            padding, pre_pad = _same_padding(weight, dilation)
        else:
            raise ValueError(f"padding must be 'valid', 'same' or numbers, got {padding!r}")
    bias_sizes = None if bias is None else list(bias.shape)
    transposed = output_padding is not None
    out_pad = list(tup(output_padding)) if transposed else None
    return ConvFamily(stride, list(tup(padding)), dilation, groups, bias_sizes, transposed, out_pad, pre_pad)


def _family(node: FeedbackNode, weight: Tensor, bias: Tensor | None, args: tuple) -> ConvFamily:
    """The node's :class:`ConvFamily` for ``args = (stride, padding, dilation, groups,
    output_padding)``: built on the first call and kept on the node (the arguments are
    constants of the converted graph), rebuilt where they change."""
    key = (args, bias is None, weight.shape)
    if _compiling():  # traced once: nothing to keep
        return _conv_family(weight, bias, *args)
    cached = node.__dict__.get("_pfa_conv_family")
    if cached is not None and cached[0] == key:
        return cached[1]
    family = _conv_family(weight, bias, *args)
    node.__dict__["_pfa_conv_family"] = (key, family)
    return family


def _noisy_conv(x: Tensor, weight: Tensor, bias: Tensor | None, node: FeedbackNode, args: tuple) -> Tensor:
    """A rule's own no-grad pass through the op (PAL's noisy pass)."""
    family = _family(node, weight, bias, args)
    if family.pre_pad is not None:
        x = F.pad(x, family.pre_pad)
    return node.noisy_forward(family, lambda t, b: family.conv(t, weight, bias if b else None), x, weight)


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
    if not (_grad_on() and (x.requires_grad or weight.requires_grad or _state_wants_grad(bias, node))):
        if node.noisy:
            return _noisy_conv(x, weight, bias, node, (stride, padding, dilation, groups, None))
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
    family = _family(node, weight, bias, (stride, padding, dilation, groups, None))
    if family.pre_pad is not None:
        x = F.pad(x, family.pre_pad)
    note_weight(node, weight)
    if node.records_input:
        node.record_input(x)
    if _autocast_on() or _transforms_on():
        return _apply_slow(_CONV_FNS, x, weight, bias, node, family, *node.state())
    return _FeedbackConv.apply(x, weight, bias, node, family, *node.state())


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
    if not (_grad_on() and (x.requires_grad or weight.requires_grad or _state_wants_grad(bias, node))):
        if node.noisy:
            return _noisy_conv(x, weight, bias, node, (stride, padding, dilation, groups, output_padding))
        return _CONV_T[weight.dim() - 2](x, weight, bias, stride, padding, output_padding, groups, dilation)
    family = _family(node, weight, bias, (stride, padding, dilation, groups, output_padding))
    note_weight(node, weight)
    if node.records_input:
        node.record_input(x)
    if _autocast_on() or _transforms_on():
        return _apply_slow(_CONV_FNS, x, weight, bias, node, family, *node.state())
    return _FeedbackConv.apply(x, weight, bias, node, family, *node.state())


def run_backward(node: FeedbackNode, family, e: Tensor, x: Tensor, weight: Tensor, state: tuple, need: Need):
    """What an op's backward calls: the rule's backward, or BP's inside ``pfa_fx.backprop_mode``."""
    if node.as_backprop:
        gx, gw, gb = family.fused(e, x, weight, need.x, need.w, need.b)
        return gx, gw, gb, (None,) * len(state)
    return node.backward(family, e, x, weight, state, need)


def note_weight(node: FeedbackNode, weight: Tensor) -> None:
    """Keep the weight an op was called with where it is not the parameter itself (computed,
    e.g. StdConv; transposed; replaced), for ``node.weight``. A plain parameter is not kept:
    ``node.weight`` reads it anyway, and under torch.compile the write would be one graph
    output per op. Straight into ``__dict__`` (``nn.Module.__setattr__`` would cost more than
    the rest of the call)."""
    if weight is not node._weight_ref[0]:
        if hasattr(weight, "device_mesh"):  # rare branch: the check costs the hot path nothing
            raise ConversionError(
                f"op '{node.op_name}' received a sharded (DTensor) weight: its model was converted by a "
                f"graph front end ({getattr(node, 'conversion_path', 'graph')}), whose graph reads weights "
                "without calling their modules, so FSDP2's per-module fully_shard never gathers them. "
                "Convert with pfa_fx.convert(model, ..., capture='modules') to shard per block"
            )
        node.__dict__["_last_weight"] = weight.detach()


#: the ops a converted graph calls
OP_FUNCTIONS = (feedback_linear, feedback_conv, feedback_conv_transpose)
#: their versions that torch.compile leaves out of its graphs: the pass (and the run-time
#: interception) calls these for nodes whose backward cannot be traced ahead of time (DFA),
#: so that the graph breaks cleanly at the call instead of failing inside the op and
#: recompiling it per shape
BETWEEN_GRAPHS = {f: torch.compiler.disable(f) for f in OP_FUNCTIONS}
