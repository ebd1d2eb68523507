"""The last front end: a model whose own forward defeats every graph capture keeps its
class, gains the feedback namespace, and runs its forward with every weight op on a
converted parameter intercepted at run time (:mod:`pfa_fx.capture.intercept`)."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..audit import weights_on_backprop
from ..install import FeedbackInstaller, finish
from ..record import record_of
from ..registry import NAMESPACE
from ..weights import HiddenWeight, hidden_weights, route_paths
from . import intercept


def _eager_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Forward of a model converted without a graph: the class's own forward, with every
    routed weight op made feedback-aware at run time."""
    namespace = getattr(self, NAMESPACE)
    routes = tuple((self.get_parameter(path), key) for path, key in record_of(self).routes)
    return intercept.call_with_feedback(
        lambda *a, **k: type(self).forward(self, *a, **k), namespace, routes, *args, **kwargs
    )


def applied_weights(root: nn.Module, kwargs: dict[str, Any] | None, known: list[HiddenWeight]) -> list[HiddenWeight]:
    """Matrix parameters outside weight modules (a router's ``weight`` applied with
    ``F.linear``, a projection applied as ``x @ P``) that one probe forward on example
    inputs applies as a linear map, in the orientation it applies them."""
    if kwargs is None:
        return []
    try:
        uses = intercept.matrix_uses(root, kwargs)
    except Exception:  # the model needs other inputs: only the weight modules are routed
        return []
    seen = {id(root.get_parameter(p)) for h in known for p in route_paths(root, h)}  # tied ones too
    found = []
    for path, in_out in uses.items():
        if id(root.get_parameter(path)) in seen:
            continue
        p = root.get_parameter(path)
        key = path[: -len(".weight")] if path.endswith(".weight") else path
        owner = root.get_submodule(path.rpartition(".")[0])
        found.append(HiddenWeight(path, key, p.t() if in_out else p, 1, owner, in_out=p if in_out else None))
    return found


def convert_eagerly(
    root: nn.Module, installer: FeedbackInstaller, reason: str, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Convert ``root`` in place (a copy of the user's model) through ``installer``, whose
    namespace ``root`` holds; ``reason`` is why no graph could be captured. Example inputs
    (``kwargs``) let a probe forward find matrix parameters outside weight modules."""
    routes = []
    known = hidden_weights(root, "")
    for h in known + applied_weights(root, kwargs, known):
        if installer.node_for_hidden(h, "eager") is not None:
            routes += [(p, h.key) for p in route_paths(root, h)]
    installer.record(root, "eager", {"": reason}, routes=tuple(routes))
    root.forward = types.MethodType(_eager_forward, root)
    finish(root)
    return root


def left_on_backprop(converted: nn.Module, kwargs: dict[str, Any], kept_native: set[str]) -> dict[str, str]:
    """Parameters left on BP in the autograd graph of one eval-mode forward (no backward):
    the check for models converted without a graph."""
    was_training = converted.training
    try:
        with torch.random.fork_rng(devices=[]):
            converted.eval()
            out = converted(**kwargs)
    except Exception:  # the model needs other inputs: nothing to conclude
        return {}
    finally:
        converted.train(was_training)
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    if not leaves:
        return {}
    total = sum(t.float().sum() for t in leaves)
    kept = set(kept_native)
    return {
        name: "an operand of a matrix product the interception does not route"
        for name in weights_on_backprop(total, converted)
        if name.rpartition(".")[0] not in kept and name not in kept
    }


__all__ = ["applied_weights", "convert_eagerly", "left_on_backprop"]
