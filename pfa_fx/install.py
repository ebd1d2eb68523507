"""Installing feedback nodes into the model being converted: one node per weight op, made
from the rule mapping and seeded by ``(seed, op name)``, placed under the feedback
namespace; then each rule's own hooks and the checkpoint hooks. Every front end (the
graph rewrite and the eager interception) makes its nodes here, so an op gets the same
node, name and state whichever way it was reached."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import RuleConfig
from .errors import ConversionError
from .mapping import RuleSpec, resolve_spec
from .node import FeedbackNode, seeded_generator
from .record import ConversionRecord, set_record
from .registry import NAMESPACE, bind_flat, feedback_modules, owner_slot, place_node
from .rules import node_class_of
from .weights import HiddenWeight


def make_node(
    rule: RuleConfig | str,
    opts: Mapping[str, Any],
    weight: torch.Tensor,
    groups: int,
    seed: int,
    key: str,
    transposed: bool = False,
    generator: str = "mt19937",
) -> FeedbackNode:
    """The node of ``rule`` (a config, or a name with ``opts``, of which the options the rule
    accepts are taken) for one weight, its state drawn from ``(seed, key)`` with ``generator``."""
    config = resolve_spec(rule, key, None, opts)
    cls = node_class_of(config)
    gen = seeded_generator(seed, key, generator)
    node = cls(weight, groups=groups, generator=gen, transposed=transposed, config=config)
    node.seed = seed  # what the node's draws came from: saved with checkpoints, checked on load
    node.generator = generator
    return node


class FeedbackInstaller:
    """What one conversion shares between its front ends and graphs: one node per weight,
    and the record of every op reached, kept native or skipped."""

    def __init__(
        self,
        model: nn.Module,
        spec: str | Mapping[Any, RuleSpec],
        options: dict[str, Any],
        seed: int,
        in_owners: bool = False,
    ):
        self.model, self.spec, self.options, self.seed = model, spec, options, seed
        self.generator = "mt19937"  # how fixed feedback is drawn (convert's generator=)
        # in_owners: each node a child of the module owning its weight (registry.owner_slot),
        # for the module-preserving front end; else all under one namespace at the root
        self.in_owners = in_owners
        self.namespace = nn.Module()
        if not in_owners:
            model.add_module(NAMESPACE, self.namespace)
        self._owner_paths: dict[int, str] | None = None
        self.made: dict[str, FeedbackNode | None] = {}
        self.owners: dict[str, nn.Module | None] = {}  # every op the pass reached, with its module
        self.kept_native: set[str] = set()  # ops the rule mapping leaves on BP on purpose
        self.skipped: dict[str, str] = {}  # weight ops the pass could not convert, with why
        self.flat_names: dict[str, str] = {}  # op name -> the graph's flat attribute for its node
        self.path = "graph"  # the front end graph ops come from, as report() names it

    def node_for(
        self,
        key: str,
        weight: torch.Tensor,
        groups: int,
        owner: nn.Module | None,
        path: str | None = None,
        transposed: bool = False,
    ) -> FeedbackNode | None:
        """The node of the op named ``key`` (made on first use); None keeps it native."""
        if key in self.made:
            node = self.made[key]
            if node is not None and tuple(weight.shape) != node.weight_shape:
                raise ConversionError(f"weight '{key}' is used with two shapes; cannot share its feedback")
            if node is not None and node.transposed != transposed:
                raise ConversionError(
                    f"weight '{key}' is used by a convolution and by a transposed convolution; "
                    "their feedback has different output axes and cannot be shared"
                )
            return node
        self.owners[key] = owner
        config = resolve_spec(self.spec, key, owner, self.options)
        node = None
        if config is not None:
            node = make_node(config, {}, weight, groups, self.seed, key, transposed, self.generator)
            node.op_name = key
            node.conversion_path = path or self.path
            node.op_owner = f"{type(owner).__module__}.{type(owner).__qualname__}" if owner is not None else ""
            # where the other layout keeps it, so checkpoints of either layout load (checkpoint.py)
            node.owner_path = self.owner_path(owner)
            if self.in_owners and node.owner_path is not None:
                place_node(owner, owner_slot(key, node.owner_path), node)
            else:
                place_node(self.namespace, key, node)
        else:
            self.kept_native.add(key)
        self.made[key] = node
        return node

    def owner_path(self, owner: nn.Module | None) -> str | None:
        """``owner``'s path in the model being converted (None: not one of its modules)."""
        if owner is None:
            return None
        if self._owner_paths is None:  # the model's own modules are all there before any node is
            self._owner_paths = {
                id(m): name for name, m in self.model.named_modules() if not isinstance(m, FeedbackNode)
            }
        return self._owner_paths.get(id(owner))

    def node_for_hidden(self, h: HiddenWeight, path: str) -> FeedbackNode | None:
        """The node of a weight used inside code the graph does not show."""
        node = self.node_for(h.key, h.weight, h.groups, h.owner, path, h.transposed)
        if node is not None and h.bank is not None:
            node._weight_ref = [h.bank]  # the parameter itself: follows .to() and loads
            if h.experts is None:
                node.expert_bank = True  # kernels mixed per sample (CondConv)
            else:
                node.grouped_experts = h.experts  # a mixture-of-experts bank, one group per expert
        if node is not None and h.in_out is not None:
            node._weight_ref = [h.in_out]  # the (in, out) parameter itself, used as x @ W
            node.param_transposed = True
        return node

    def flat_name(self, key: str) -> str:
        """The flat attribute of the model through which a graph reads the op's node."""
        name = self.flat_names.get(key)
        if name is None:
            name = self.flat_names[key] = bind_flat(self.model, key, self.made[key])
        return name

    def record(
        self,
        model: nn.Module,
        front_end: str,
        fallbacks: Mapping[str, str],
        routes: tuple[tuple[str, str], ...] = (),
    ) -> ConversionRecord:
        """The model's :class:`~pfa_fx.record.ConversionRecord`, made once the ops are installed
        (the graph front ends add what only the graph shows: ``left_on_bp``, ``op_readers``)."""
        rec = ConversionRecord(
            front_end,
            ops=list(self.owners),
            fallbacks=dict(fallbacks),
            kept_native=sorted(self.kept_native),
            skipped=dict(self.skipped),
            routes=tuple(routes),
        )
        set_record(model, rec)
        return rec


def finish(model: nn.Module) -> None:
    """The pass's hooks for rules and checkpoints. Each rule class present gets the model
    and its nodes once (``FeedbackNode.attach``), for what a rule needs beyond its ops;
    then ``state_dict`` records the conversion and ``load_state_dict`` checks it."""
    by_class: dict[type[FeedbackNode], list[tuple[str, FeedbackNode]]] = {}
    for name, node in feedback_modules(model):
        by_class.setdefault(type(node), []).append((name, node))
    for cls, nodes in by_class.items():
        cls.attach(model, nodes)
    checkpoint.watch_checkpoints(model)


__all__ = ["FeedbackInstaller", "finish", "make_node"]
