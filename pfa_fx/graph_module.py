"""The module a graph front end returns: a ``GraphModule`` holding one graph per mode,
with every parameter and buffer of the original model under its own name, and a forward
that takes the original forward's arguments and presents its signature."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from .checkpoint import load_state_dict_checked


class ConvertedModule(fx.GraphModule):
    """A ``GraphModule`` with one graph per mode: ``train()``/``eval()`` switch between
    the graph traced in training mode and the one traced in eval mode, so forwards that
    branch on ``self.training`` behave as before conversion.

    Its forward takes the arguments of ``root``'s class forward under their own names and
    kinds, and ``inspect.signature(converted.forward)`` is that forward's signature, so
    callers that read it (Hugging Face ``Trainer`` keeps only the dataset columns the
    forward names) see the original inputs."""

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str):
        try:
            signature: inspect.Signature | None = inspect.signature(type(root).forward)
        except (TypeError, ValueError):  # a forward without a readable signature: fx's own
            signature = None
        if signature is not None:
            for graph in {id(g): g for g in (train_graph, eval_graph)}.values():
                _match_placeholders(graph, signature)
        self.__dict__["_pfa_signature"] = signature  # before the first compile, which reads it
        super().__init__(root, train_graph if root.training else eval_graph, class_name)
        self._pfa_graphs = {True: train_graph, False: eval_graph}
        for graph in (train_graph, eval_graph):
            graph.owning_module = self
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module") and not _has_attr(self, node.target):
                    fx.graph_module._copy_attr(root, self, node.target)
        _keep_every_tensor(root, self)

    def recompile(self) -> Any:
        """``GraphModule.recompile``, the new forward presenting the original signature."""
        code = super().recompile()
        signature = self.__dict__.get("_pfa_signature")
        if signature is not None:
            type(self).forward.__signature__ = signature  # the function compiled for this instance alone
        return code

    def train(self, mode: bool = True) -> ConvertedModule:
        super().train(mode)
        graphs = self.__dict__.get("_pfa_graphs")
        if graphs is not None and graphs[bool(mode)] is not self.graph:
            self.graph = graphs[bool(mode)]  # recompiles forward
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ConvertedModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        signature = self.__dict__.get("_pfa_signature")
        memo[id(signature)] = signature  # immutable, and its annotations need not be copyable
        res.__dict__.update(copy.deepcopy(self.__dict__, memo))
        for graph in res._pfa_graphs.values():
            graph.owning_module = res
        res.recompile()
        return res

    passes_load_strict = True  # checkpoint.watch_checkpoints: load_state_dict below hands on strict

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.load_state_dict``; a checkpoint saved from another conversion (rule,
        options, or the seed of rules that keep drawing from it) is refused with a
        :class:`ConversionError` naming both configurations."""
        return load_state_dict_checked(self, super().load_state_dict, state_dict, *args, **kwargs)

    def __reduce__(self):
        raise TypeError(
            "a converted model is saved with its state_dict (torch.save(model.state_dict())) and "
            "rebuilt with pfa_fx.convert; pickling the module itself is not supported"
        )


def _match_placeholders(graph: fx.Graph, signature: inspect.Signature) -> None:
    """Give the traced forward the original one's parameters: torch.fx names an argument
    traced at a constant default ``<name>_1`` (so ``forward(x, labels=None)`` became
    ``forward(x, labels_1=None)``, refusing ``labels=``) and puts keyword-only parameters
    before ``*args``. Each placeholder takes its parameter's name back (the node keeps its
    own, so the code is unchanged but for one assignment), and ``*args`` moves in front of
    the keyword-only ones."""
    params = signature.parameters
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        stars = len(node.target) - len(node.target.lstrip("*"))
        name = node.target[stars:]
        base = name.rpartition("_")[0]
        if name not in params and base in params:
            node.target = "*" * stars + base
    var_positional = next((n for n in placeholders if n.target.startswith("*") and n.target[1] != "*"), None)
    keyword_only = [
        n for n in placeholders if n.target in params and params[n.target].kind is inspect.Parameter.KEYWORD_ONLY
    ]
    if var_positional is not None and keyword_only:
        keyword_only[0].prepend(var_positional)


def _has_attr(mod: nn.Module, target: str) -> bool:
    for item in target.split("."):
        if not hasattr(mod, item):
            return False
        mod = getattr(mod, item)
    return True


def _keep_every_tensor(root: nn.Module, gm: nn.Module) -> None:
    """GraphModule copies only what the graph touches; keep every parameter and buffer
    (unused heads included) under its own name, persistent or not as it was, so
    ``state_dict`` keys match the original model's and checkpoints keep loading."""
    for path, _ in list(root.named_parameters(remove_duplicate=False)) + list(
        root.named_buffers(remove_duplicate=False)
    ):
        if not _has_attr(gm, path):
            fx.graph_module._copy_attr(root, gm, path)
    for path, mod in root.named_modules(remove_duplicate=False):
        if not mod._non_persistent_buffers_set:
            continue
        try:
            target = gm.get_submodule(path)
        except AttributeError:
            continue
        if target is not mod:
            target._non_persistent_buffers_set |= mod._non_persistent_buffers_set & set(target._buffers)


__all__ = ["ConvertedModule"]
