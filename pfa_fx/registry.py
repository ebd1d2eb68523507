"""Where feedback state lives in a converted model: what rules, checkpoints and metrics
need to know of "the converted model", and nothing of how it was converted.

Every converted weight op has one :class:`~pfa_fx.node.FeedbackNode`, registered under
``<NAMESPACE>.<op name>`` (so it saves with ``state_dict`` and moves with ``.to()``) and,
for a converted graph, also bound to one flat instance attribute that the graph reads
(a nested chain costs one ``nn.Module.__getattr__`` per level on every call).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from .node import FeedbackNode

#: the child module of a converted model that holds every op's feedback node
NAMESPACE = "pfa_feedback"

# plain (unregistered) attribute: {op name: [op names reading its output]}, set by the pass
_READERS = "_pfa_op_readers"


def feedback_modules(model: nn.Module) -> Iterator[tuple[str, FeedbackNode]]:
    """Yield ``(op name, node)`` for every converted weight op of ``model``.

    ``node.rule`` is the rule name, ``node.config`` the options it was converted with,
    ``node.weight`` the forward weight and ``node.feedback_weight()`` the ``W_b`` the
    backward uses now.
    """
    marker = NAMESPACE + "."
    for name, m in model.named_modules():
        if isinstance(m, FeedbackNode):
            i = name.find(marker)
            yield (name[i + len(marker) :] if i >= 0 else name), m


def attr(obj: Any, target: str) -> Any:
    """``obj.a.b.c`` for ``target="a.b.c"``."""
    for item in target.split("."):
        obj = getattr(obj, item)
    return obj


def place_node(namespace: nn.Module, key: str, node: nn.Module) -> None:
    """Register ``node`` at the dotted path ``key`` under ``namespace``, making plain
    containers for the levels in between (an op name may be the prefix of another)."""
    *parents, leaf = key.split(".")
    mod = namespace
    for p in parents:
        child = getattr(mod, p, None)
        if child is None:
            child = nn.Module()
            mod.add_module(p, child)
        mod = child
    existing = mod._modules.get(leaf)
    if existing is not None:
        # a container made earlier for a nested key: keep its children under the node
        for name, child in existing.named_children():
            node.add_module(name, child)
    mod.add_module(leaf, node)


def bind_flat(model: nn.Module, key: str, node: FeedbackNode) -> str:
    """Bind ``node`` to a new flat instance attribute of ``model`` and return its name.

    The object is never replaced (loading copies into its tensors), so the flat reference
    cannot go stale; it is not a registered child, so ``state_dict`` and ``named_modules``
    list the node once, under the namespace."""
    base = "pfa_fb_" + re.sub(r"\W", "_", key)
    name, i = base, 1
    while hasattr(model, name):
        name, i = f"{base}_{i}", i + 1
    model.__dict__[name] = node
    return name


def set_op_readers(model: nn.Module, readers: Mapping[str, list[str]]) -> None:
    """Record, per op, the weight ops that read its output (no weight op in between)."""
    model.__dict__[_READERS] = {k: list(v) for k, v in readers.items()}


def op_readers(model: nn.Module) -> dict[str, list[str]]:
    """``{op name: [op names reading its output]}`` as the pass found it in the training
    graph, in the order found; empty for a model converted without a graph."""
    return model.__dict__.get(_READERS, {})


__all__ = ["NAMESPACE", "attr", "bind_flat", "feedback_modules", "op_readers", "place_node"]
