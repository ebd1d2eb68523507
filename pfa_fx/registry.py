"""Where feedback state lives in a converted model: what rules, checkpoints and metrics
need to know of "the converted model", and nothing of how it was converted.

Every converted weight op has one :class:`~pfa_fx.node.FeedbackNode` (so it saves with
``state_dict`` and moves with ``.to()``), registered in one of two places:

- under ``<NAMESPACE>.<op name>`` at the root, for the graph front ends and the eager
  interception; a converted graph also binds it to one flat instance attribute that the
  graph reads (a nested chain costs one ``nn.Module.__getattr__`` per level on every call);
- as a child of the module that owns the op's weight, ``<owner>.<NAMESPACE>`` (its
  ``weight``) or ``<owner>.<NAMESPACE>.<attribute>`` (another parameter), for the
  module-preserving front end: the state then belongs to whatever block wraps the owner
  (FSDP2's ``fully_shard``).

Either way ``NAMESPACE`` is one component of every feedback state path
(:func:`is_feedback_path`), and :func:`feedback_modules` names each node by its op.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from .node import FeedbackNode
from .record import record_of

#: the child module of a converted model that holds every op's feedback node
NAMESPACE = "pfa_feedback"


def feedback_modules(model: nn.Module) -> Iterator[tuple[str, FeedbackNode]]:
    """Yield ``(op name, node)`` for every converted weight op of ``model``.

    ``node.rule`` is the rule name, ``node.config`` the options it was converted with,
    ``node.weight`` the forward weight and ``node.feedback_weight()`` the ``W_b`` the
    backward uses now.
    """
    marker = NAMESPACE + "."
    for name, m in model.named_modules():
        if isinstance(m, FeedbackNode):
            if m.op_name:
                yield m.op_name, m
                continue
            i = name.find(marker)
            yield (name[i + len(marker) :] if i >= 0 else name), m


def is_feedback_path(name: str) -> bool:
    """Whether a parameter, buffer or module path of a converted model is feedback state."""
    return NAMESPACE in name.split(".")


def owner_slot(op: str, owner_path: str) -> str:
    """Where, under its owner module, the module-preserving front end registers the node
    of op ``op``: ``NAMESPACE`` for the owner's own weight (op named by the owner's path),
    ``NAMESPACE.<attribute>`` for another parameter of it (``in_proj_weight``)."""
    if op == owner_path:
        return NAMESPACE
    rest = op[len(owner_path) + 1 :] if owner_path and op.startswith(owner_path + ".") else op
    return f"{NAMESPACE}.{re.sub(r'[^0-9A-Za-z_]', '_', rest)}"


def op_of_state_key(key: str) -> tuple[str, str] | None:
    """``(op name, leaf)`` of a feedback state_dict key in either layout
    (``pfa_feedback.<op>.<leaf>``, ``<owner>.pfa_feedback[.<attribute>].<leaf>``), else None."""
    parts = key.split(".")
    if NAMESPACE not in parts[:-1]:
        return None
    i = parts.index(NAMESPACE)
    inner, leaf = parts[i + 1 : -1], parts[-1]
    if i == 0:
        return (".".join(inner), leaf) if inner else None
    return ".".join(parts[:i] + inner), leaf


def node_path(op: str, owner_path: str) -> str:
    """The module path of op ``op``'s node when placed under its owner at ``owner_path``."""
    slot = owner_slot(op, owner_path)
    return f"{owner_path}.{slot}" if owner_path else slot


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


def op_readers(model: nn.Module) -> dict[str, list[str]]:
    """``{op name: [op names reading its output]}`` as the pass found it in the training
    graph, in the order found; empty for a model converted without a graph."""
    return record_of(model).op_readers


__all__ = [
    "NAMESPACE",
    "attr",
    "bind_flat",
    "feedback_modules",
    "is_feedback_path",
    "node_path",
    "op_readers",
    "owner_slot",
    "place_node",
]
