"""The module a graph front end returns: a ``GraphModule`` holding one graph per mode,
with every parameter and buffer of the original model under its own name."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from .checkpoint import load_state_dict_checked


class ConvertedModule(fx.GraphModule):
    """A ``GraphModule`` with one graph per mode: ``train()``/``eval()`` switch between
    the graph traced in training mode and the one traced in eval mode, so forwards that
    branch on ``self.training`` behave as before conversion."""

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str):
        super().__init__(root, train_graph if root.training else eval_graph, class_name)
        self._pfa_graphs = {True: train_graph, False: eval_graph}
        for graph in (train_graph, eval_graph):
            graph.owning_module = self
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module") and not _has_attr(self, node.target):
                    fx.graph_module._copy_attr(root, self, node.target)
        _keep_every_tensor(root, self)

    def train(self, mode: bool = True) -> ConvertedModule:
        super().train(mode)
        graphs = self.__dict__.get("_pfa_graphs")
        if graphs is not None and graphs[bool(mode)] is not self.graph:
            self.graph = graphs[bool(mode)]  # recompiles forward
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ConvertedModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        res.__dict__.update(copy.deepcopy(self.__dict__, memo))
        for graph in res._pfa_graphs.values():
            graph.owning_module = res
        res.recompile()
        return res

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
