"""Weight ops the FX graph cannot see.

Some code must stay opaque to tracing: modules timm registers as leaves (``Conv2dSame``,
``MobileVitBlock``, ...), torch's ``nn.MultiheadAttention`` (its packed input projection
is a bare parameter), and functions wrapped for FX that receive weights as arguments
(torchvision Swin's ``shifted_window_attention``). Their graph node becomes
``call_with_feedback(target, namespace, routes, *args)``: it runs the original code with
a ``TorchFunctionMode`` that routes each ``F.linear`` / ``F.conv*d`` / ``F.conv_transpose*d`` call whose weight is
(or was computed from, e.g. by weight standardization) a routed parameter to the
feedback op of that parameter's node. A bank of expert kernels (timm's ``CondConv2d``)
is routed at its ``torch.matmul(routing, bank)``, and the convolution with the mixed
per-sample kernels then runs its error through the same mix of feedback kernels.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import expert_ops, ops
from ..node import FeedbackNode
from . import banks

_LINEAR = {F.linear, torch._C._nn.linear}
_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_T = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
# the optional arguments after (input, weight, bias), in the functions' own order
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONV_T_DEFAULTS = {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
_MATMUL = {torch.matmul, torch.mm, Tensor.matmul, Tensor.mm, Tensor.__matmul__}
_ADDMM = {torch.addmm}
_PATCHED = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_TORCH_FUNCTIONAL = {name: getattr(F, name) for name in _PATCHED}


def _source_node(weight: Tensor, routes: dict[int, FeedbackNode], max_nodes: int = 64) -> FeedbackNode | None:
    """The node of the routed parameter ``weight`` is, or was computed from (found by
    walking its ``grad_fn`` graph)."""
    hit = routes.get(id(weight))
    if hit is not None or weight.grad_fn is None:
        return hit
    frontier, seen = [weight.grad_fn], 0
    while frontier and seen < max_nodes:
        fn = frontier.pop(0)
        seen += 1
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in routes:
            return routes[id(var)]
        frontier += [nxt for nxt, _ in fn.next_functions if nxt is not None]
    return None


def _matmul_weight(w: Any, routes: dict[int, FeedbackNode]) -> tuple[FeedbackNode, Tensor] | None:
    """``(node, W)`` where the right operand of a matrix product is a routed weight: an
    ``(in, out)`` parameter itself (``x @ W``, HF Conv1D), or the transpose of an
    ``(out, in)`` one (``x @ W.T``); ``W`` is then the ``(out, in)`` weight of ``F.linear``."""
    if not isinstance(w, Tensor) or w.dim() != 2:
        return None
    node = routes.get(id(w))
    if node is not None:
        return (node, w.t()) if node.param_transposed else None
    base = w._base
    node = routes.get(id(base)) if base is not None else None
    if node is None or node.param_transposed or base.dim() != 2:
        return None
    if tuple(w.shape) == tuple(base.shape)[::-1] and w.stride() == base.stride()[::-1]:
        return node, w.t()
    return None


def _route_matmul(func: Callable, args: tuple, kwargs: dict, routes: dict[int, FeedbackNode]) -> Any:
    """A matrix product with a routed weight as its right operand, as ``F.linear``:
    ``x @ W``, ``torch.mm``/``matmul``, ``torch.addmm(b, x, W)`` (HF Conv1D); and
    ``routing @ bank`` on a routed bank of expert kernels (timm's CondConv)."""
    if func in _ADDMM:
        names = ("input", "mat1", "mat2")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if set(bound) - set(names) - {"beta", "alpha"} or bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1:
            return func(*args, **kwargs)
        bias, x, w = bound.get("input"), bound.get("mat1"), bound.get("mat2")
        if not (isinstance(bias, Tensor) and bias.dim() == 1):
            return func(*args, **kwargs)  # F.linear's bias is a vector
    elif len(args) == 2 and not kwargs:
        (x, w), bias = args, None
        node = routes.get(id(w)) if func is torch.matmul and isinstance(w, Tensor) else None
        if node is not None and getattr(node, "expert_bank", False):
            return expert_ops.feedback_expert_mix(x, w, node)
    else:
        return func(*args, **kwargs)
    hit = _matmul_weight(w, routes)
    if hit is None or not isinstance(x, Tensor) or x.dim() == 0:
        return func(*args, **kwargs)
    node, weight = hit
    op = ops.feedback_linear if node.traceable_backward else ops.BETWEEN_GRAPHS[ops.feedback_linear]
    return op(x, weight, bias, node)


def _route_call(func: Callable, args: tuple, kwargs: dict, routes: dict[int, FeedbackNode]) -> Any:
    names = ("input", "weight", "bias") if func in _LINEAR else _CONV_T_ARGS if func in _CONV_T else _CONV_ARGS
    bound = dict(zip(names, args))
    bound.update(kwargs)
    weight = bound.get("weight")
    mix = expert_ops.expert_mix_of(weight) if func in _CONV and isinstance(weight, Tensor) else None
    if mix is not None:  # per-sample kernels mixed from a routed expert bank
        node: FeedbackNode | None = expert_ops.PerSampleKernelFeedback(weight, mix)
    else:
        node = _source_node(weight, routes) if isinstance(weight, Tensor) else None
        if node is None or tuple(weight.shape) != node.weight_shape or node.transposed != (func in _CONV_T):
            return func(*args, **kwargs)  # not a routed weight (or a slice of one): stays native
    op = (
        ops.feedback_linear
        if func in _LINEAR
        else ops.feedback_conv_transpose
        if func in _CONV_T
        else ops.feedback_conv
    )
    if not node.traceable_backward:  # DFA: outside compiled graphs, as the pass calls it
        op = ops.BETWEEN_GRAPHS[op]
    if func in _LINEAR:
        return op(bound["input"], weight, bound.get("bias"), node)
    defaults = _CONV_T_DEFAULTS if func in _CONV_T else _CONV_DEFAULTS
    rest = (bound.get(k, d) for k, d in defaults.items())
    return op(bound["input"], weight, bound.get("bias"), node, *rest)


@contextlib.contextmanager
def _functional_patched(routes: dict[int, FeedbackNode]) -> Iterator[None]:
    """Inside a composite function that dispatched to the mode (which is then off, e.g.
    ``F.multi_head_attention_forward``), route its calls of ``F.linear``/``F.conv*d``,
    which it looks up as module globals."""
    saved = {name: getattr(F, name) for name in _PATCHED}

    def patch(orig: Callable) -> Callable:
        return lambda *a, **k: _route_call(orig, a, k, routes)

    try:
        for name in _PATCHED:
            # torch's own function, also where an enclosing composite already patched it
            # (nested owners under capture="modules": the innermost routes)
            setattr(F, name, patch(_TORCH_FUNCTIONAL[name]))
        yield
    finally:
        for name, orig in saved.items():
            setattr(F, name, orig)


class RouteWeightOps(TorchFunctionMode):
    """Routes each weight op on a parameter of ``routes`` (``{id(parameter): node}``) to its
    node's feedback op, while active."""

    def __init__(self, routes: dict[int, FeedbackNode]):
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if banks.is_bank_function(func):  # an expert bank applied per expert, a matrix as W @ x
            out = banks.route(func, args, kwargs, self.routes)
            if out is not banks.NOT_ROUTED:
                return out
        if func in _LINEAR or func in _CONV or func in _CONV_T:
            return _route_call(func, args, kwargs, self.routes)
        if func in _MATMUL or func in _ADDMM:
            return _route_matmul(func, args, kwargs, self.routes)
        if inspect.isfunction(func):  # a Python composite: its inner calls must be seen too
            with _functional_patched(self.routes):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class _RecordMatrixUses(TorchFunctionMode):
    """Which parameters a forward applies as the weight of ``F.linear`` (``(out, in)``) or as
    the right operand of a matrix product (``(in, out)``, or ``(out, in)`` through ``.T``)."""

    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.params, self.found = params, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            self._note(w, in_out=False)
        elif func in _MATMUL or func in _ADDMM:
            w = (args[2] if len(args) > 2 else kwargs.get("mat2")) if func in _ADDMM else args[-1] if args else None
            left = args[0] if func in _MATMUL and len(args) == 2 else None
            if isinstance(w, Tensor) and id(w) in self.params:
                self._note(w, in_out=True)
            elif isinstance(left, Tensor) and id(left) in self.params and isinstance(w, Tensor) and w.dim() >= 2:
                self._note(left, in_out=False)  # W @ x: W held (out, in)
            elif (
                isinstance(w, Tensor) and w._base is not None and w.dim() == 2 and w.stride() == w._base.stride()[::-1]
            ):
                self._note(w._base, in_out=False)  # x @ P.T
        return func(*args, **kwargs)

    def _note(self, w: Any, in_out: bool) -> None:
        if isinstance(w, Tensor) and w.dim() == 2 and id(w) in self.params:
            self.found.setdefault(self.params[id(w)], in_out)


def matrix_uses(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, bool]:
    """``{parameter path: stored (in, out)}`` for the 2-D parameters one eval-mode forward on
    ``kwargs`` applies as a linear map (no grad; modes and random state restored)."""
    params = {id(p): name for name, p in model.named_parameters() if p.dim() == 2}
    recorder = _RecordMatrixUses(params)
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), recorder:
            model.eval()
            model(**kwargs)
    finally:
        model.train(was_training)
    return recorder.found


_ROUTED: dict[Callable, Callable] = {}


def routed(fn: Callable) -> Callable:
    """``fn`` as a graph target taking ``(namespace, routes, *args)``: the FX code then
    reads ``<fn>_with_feedback(...)`` (a function cannot be a graph argument)."""
    wrapper = _ROUTED.get(fn)
    if wrapper is None:

        def wrapper(namespace: nn.Module, routes: tuple, /, *args: Any, **kwargs: Any) -> Any:
            return call_with_feedback(fn, namespace, routes, *args, **kwargs)

        wrapper.__name__ = wrapper.__qualname__ = f"{fn.__name__}_with_feedback"
        _ROUTED[fn] = wrapper
    return wrapper


def call_with_feedback(
    target: nn.Module | Callable, namespace: nn.Module, routes: tuple[tuple[Tensor, str], ...], /, *args, **kwargs
) -> Any:
    """Run ``target(*args, **kwargs)`` with the weight ops on the routed parameters made
    feedback-aware; ``routes`` pairs each parameter with its node's path in ``namespace``."""
    table = {id(param): namespace.get_submodule(key) for param, key in routes}
    # no graph to build under no_grad, unless a rule runs its own no-grad pass through the ops (PAL)
    if not torch.is_grad_enabled() and not any(node.noisy for node in table.values()):
        return target(*args, **kwargs)
    with RouteWeightOps(table):
        return target(*args, **kwargs)
