"""The module-preserving front end (``convert(..., capture="modules")``): the model keeps
its class and its whole module tree, and every module that owns a converted weight runs
that weight's op feedback-aware inside its own forward, with the op's feedback node as
its child (``<owner>.pfa_feedback``).

Why a front end of its own: FSDP2 (``fully_shard``) gathers a block's parameters in the
block's pre-forward hook and frees them after; a graph that reads ``layer.weight``
without calling ``layer`` runs outside every hook (the graph front ends' converted
models cannot be sharded per block). Here each weight op runs where the model ran it,
and its feedback state sits in the same block, so one ``fully_shard(block)`` shards and
gathers both. Fixed feedback that other front ends keep as buffers (FA's ``B``, frSF's
``M``, PFA's ``B``, compact PFA's ``G``, implicit forms' ``D0``) is held here as frozen
parameters (``requires_grad=False``): FSDP2 shards parameters, never buffers. State dict
keys are the same tensors under ``<owner>.pfa_feedback.<name>``; checkpoints saved in
the root-namespace layout (``pfa_feedback.<op>.<name>``) load into this one and back
(:mod:`pfa_fx.checkpoint`).

A plain ``nn.Linear`` calls the feedback op directly. Every other owner (convolutions,
Hugging Face ``Conv1D``, ``nn.MultiheadAttention``, a module applying a bare matrix
parameter) runs its own forward with the weight ops on the parameters of its subtree
intercepted (:mod:`.intercept`); the table is built at call time, from the parameters
the module holds then, because FSDP2 swaps sharded and gathered parameter objects.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import ops
from ..install import FeedbackInstaller, finish
from ..node import FeedbackNode
from ..registry import NAMESPACE
from ..weights import hidden_weights, route_paths
from . import intercept
from .eager import applied_weights

#: the attribute of an owner module listing ``(parameter path, node)`` it routes: the node
#: objects themselves (modules are never replaced; copies of the model map them with the
#: rest of the owner's ``__dict__``), the parameters by path (FSDP2 replaces those)
_ROUTES = "_pfa_owner_routes"


def _linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` through the feedback op of its node."""
    node = self._modules[NAMESPACE]
    op = ops.feedback_linear if node.traceable_backward else ops.BETWEEN_GRAPHS[ops.feedback_linear]
    return op(input, self.weight, self.bias, node)


def _owner_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's own forward, with the weight ops on this module's converted parameters
    (its own and its children's, e.g. ``nn.MultiheadAttention``'s ``out_proj``) intercepted."""
    forward = type(self).forward
    routes: tuple[tuple[str, FeedbackNode], ...] = self.__dict__[_ROUTES]
    if not torch.is_grad_enabled() and not any(node.noisy for _, node in routes):
        return forward(self, *args, **kwargs)
    table = {id(self.get_parameter(param)): node for param, node in routes}
    with intercept.RouteWeightOps(table):
        return forward(self, *args, **kwargs)


class OwnerParameter(Sequence):
    """``node._weight_ref`` of a module-placed node: ``[0]`` is the parameter its owner
    holds *now* (FSDP2 replaces parameters with sharded ones, and swaps in gathered ones
    around the block's forward and backward), so optimizer hooks and metrics find it."""

    def __init__(self, owner: nn.Module, name: str):
        self.owner, self.name = owner, name

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if i not in (0, -1):
            raise IndexError(i)
        return self.owner._parameters[self.name]


def _is_plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and "weight" in m._parameters


def _relative(path: str, prefix: str) -> str | None:
    if not prefix:
        return path
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else None


def hold_fixed_state_as_parameters(node: FeedbackNode) -> None:
    """Turn the node's persistent tensor buffers (≥ 1-D, floating) into frozen parameters,
    which FSDP2 shards with the block along dim 0 (held without leading size-1
    dimensions: PFA's ``B`` of a linear op is ``(1, out, n̄)``); 0-D scalars (implicit
    forms' ``alpha``) stay buffers, replicated on every rank. Values, names, shapes and
    state dict entries are unchanged."""
    for name, buf in list(node._buffers.items()):
        if buf is None or buf.dim() == 0 or not buf.is_floating_point() or name in node._non_persistent_buffers_set:
            continue
        del node._buffers[name]
        # contiguous: FSDP2 refuses strided parameters (PFA's B is stored column-major)
        node.register_parameter(name, nn.Parameter(buf.contiguous(), requires_grad=False))
        node.hold_squeezed(name)


def _warn_unprobed(root: nn.Module, routed: set[str]) -> None:
    """Without example inputs no probe forward can tell whether a bare matrix parameter of
    the model's own modules (not torch's: embeddings, norms) is applied as a linear map:
    name the candidates instead of leaving them on BP in silence."""
    candidates = [
        f"{prefix}.{name}" if prefix else name
        for prefix, m in root.named_modules()
        if not type(m).__module__.startswith("torch.") and not isinstance(m, FeedbackNode)
        for name, p in m._parameters.items()
        if p is not None and p.dim() == 2 and (f"{prefix}.{name}" if prefix else name) not in routed
    ]
    if candidates:
        warnings.warn(
            "pfa_fx: capture='modules' without example inputs converts the weights of Linear/Conv/attention "
            f"modules only; {len(candidates)} matrix parameter(s) of the model's own modules "
            f"({', '.join(candidates[:5])}{', ...' if len(candidates) > 5 else ''}) stay on BP if its forward "
            "applies them as linear maps: pass example_inputs= so a probe forward finds them",
            UserWarning,
            stacklevel=5,
        )


def convert_in_modules(root: nn.Module, installer: FeedbackInstaller, kwargs: dict[str, Any] | None) -> nn.Module:
    """Convert ``root`` (the copy of the user's model) in place through ``installer``
    (made with ``in_owners=True``). Example inputs (``kwargs``) let a probe forward find
    matrix parameters outside weight modules, as for the eager front end."""
    known = hidden_weights(root, "")
    routed: list[tuple[str, FeedbackNode]] = []  # (parameter path, node) over the whole model
    owners: set[str] = set()  # the modules holding the nodes
    for h in known + applied_weights(root, kwargs, known):
        node = installer.node_for_hidden(h, "modules")
        if node is None:
            continue
        hold_fixed_state_as_parameters(node)
        owner = h.owner
        held = next((n for n, p in owner._parameters.items() if p is node._weight_ref[0]), None)
        if held is not None:
            node._weight_ref = OwnerParameter(owner, held)
        owners.add(node.owner_path)
        routed += [(p, node) for p in route_paths(root, h)]
    if kwargs is None:
        _warn_unprobed(root, {p for p, _ in routed})
    for owner_path in sorted(owners, key=len):
        owner = root.get_submodule(owner_path)
        # the converted parameters of the owner's subtree whose nodes are there too, relative to it
        mine = tuple(
            (rp, node)
            for p, node in routed
            if (rp := _relative(p, owner_path)) is not None
            and (node.owner_path == owner_path or _relative(node.owner_path, owner_path) is not None)
        )
        plain = _is_plain_linear(owner) and len(mine) == 1 and mine[0][0] == "weight"
        plain = plain and mine[0][1] is owner._modules.get(NAMESPACE)
        owner.__dict__[_ROUTES] = mine
        owner.forward = types.MethodType(_linear_forward if plain else _owner_forward, owner)
    installer.record(root, "modules", {})
    finish(root)
    return root


__all__ = ["convert_in_modules", "hold_fixed_state_as_parameters"]
