"""Weight ops inside modules that tracing keeps opaque.

Some modules must stay leaves of the FX graph (timm registers e.g. ``Conv2dSame`` and
``MobileVitBlock`` because their forwards compute padding or shapes in Python). Their
``call_module`` node becomes ``call_with_feedback(module, ...)``, which runs the module's
own forward under a ``TorchFunctionMode`` that routes each ``F.linear`` / ``F.conv*d``
call to the feedback op of the weight module it belongs to: the one whose weight is the
argument, or (for computed weights such as weight standardization) the one whose weight
the argument was computed from, found by walking the autograd graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import ops
from .rules.base import FeedbackNode

_LINEAR = {F.linear, torch._C._nn.linear}
_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _source_param(weight: Tensor, params: dict[int, Any], max_nodes: int = 64) -> Any:
    """The known parameter ``weight`` was computed from, by walking its ``grad_fn`` graph."""
    hit = params.get(id(weight))
    if hit is not None or weight.grad_fn is None:
        return hit
    frontier, seen = [weight.grad_fn], 0
    while frontier and seen < max_nodes:
        fn = frontier.pop(0)
        seen += 1
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in params:
            return params[id(var)]
        frontier += [nxt for nxt, _ in fn.next_functions if nxt is not None]
    return None


class _RouteWeightOps(TorchFunctionMode):
    def __init__(self, routes: dict[int, FeedbackNode]):
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR or func in _CONV:
            names = ("input", "weight", "bias") if func in _LINEAR else _CONV_ARGS
            bound = dict(zip(names, args))
            bound.update(kwargs)
            weight = bound.get("weight")
            node = _source_param(weight, self.routes) if isinstance(weight, Tensor) else None
            if node is not None and tuple(weight.shape) == node.weight_shape:
                if func in _LINEAR:
                    return ops.feedback_linear(bound["input"], weight, bound.get("bias"), node)
                return ops.feedback_conv(
                    bound["input"],
                    weight,
                    bound.get("bias"),
                    node,
                    bound.get("stride", 1),
                    bound.get("padding", 0),
                    bound.get("dilation", 1),
                    bound.get("groups", 1),
                )
        return func(*args, **kwargs)


def call_with_feedback(module: nn.Module, namespace: nn.Module, path: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``module`` (at ``path`` in the converted model) with its weight ops made
    feedback-aware by the nodes under ``namespace``."""
    routes: dict[int, FeedbackNode] = {}
    for rel, sub in module.named_modules():
        w = getattr(sub, "weight", None)
        if not isinstance(w, Tensor):
            continue
        key = f"{path}.{rel}" if rel else path
        try:
            node = namespace.get_submodule(key)
        except AttributeError:
            continue
        if isinstance(node, FeedbackNode):
            routes[id(w)] = node
    if not routes or not torch.is_grad_enabled():
        return module(*args, **kwargs)
    with _RouteWeightOps(routes):
        return module(*args, **kwargs)
