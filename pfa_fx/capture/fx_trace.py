"""The torch.fx front end: trace a model with timm's and torchvision's own FX registries.

``trace_modes`` traces a model twice, in training and in eval mode, because Python
forwards may branch on ``self.training``. The tracer keeps the modules timm registers as
notrace leaves opaque (``timm.layers._fx.get_notrace_modules``), autowraps its notrace
functions and ``torchvision.ops``, keeps Linear/Conv modules with torch's own forward as
leaves (their weight op is the call), stamps each node with the module path it came
from (``node.meta["pfa_scope"]``), and names the module at fault when tracing fails;
with ``fallback``, such a module becomes an opaque leaf and tracing starts over.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from ..errors import TraceError
from ..weights import WEIGHT_MODULES, is_plain_weight_module


def _notrace_from_libraries() -> tuple[tuple[type, ...], tuple[Any, ...], tuple[Any, ...]]:
    """Leaf modules and opaque functions the model libraries register for FX themselves."""
    leaves: list[type] = []
    functions: list[Any] = []
    modules: list[Any] = [math]
    try:
        from timm.layers import _fx as timm_fx

        leaves += list(timm_fx.get_notrace_modules())
        functions += list(timm_fx.get_notrace_functions())
    except ImportError:  # timm is optional for users of plain torch models
        pass
    try:
        import torchvision.ops

        modules.append(torchvision.ops)
    except ImportError:
        pass
    return tuple(leaves), tuple(functions), tuple(modules)


class FeedbackTracer(fx.Tracer):
    """``fx.Tracer`` that keeps timm's notrace modules opaque, autowraps its notrace
    functions, stamps each node with the module path it came from, and names the
    module at fault when tracing fails."""

    def __init__(self, leaf_paths: Iterable[str] = ()) -> None:
        leaves, functions, modules = _notrace_from_libraries()
        super().__init__(autowrap_modules=modules, autowrap_functions=functions)
        self.extra_leaves = leaves
        self.leaf_paths = set(leaf_paths)  # modules that failed to trace: kept opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.extra_leaves) or qualname in self.leaf_paths:
            return True
        if isinstance(m, WEIGHT_MODULES):
            return is_plain_weight_module(m)
        return super().is_leaf_module(m, qualname)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["pfa_scope"] = self.scope.module_path
        return node

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception as exc:
            path = self.path_of_module(m)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            err = TraceError(
                f"torch.fx cannot trace module '{path}' ({type(m).__module__}.{type(m).__qualname__}): "
                f"{reason}. Register it as a leaf (timm.layers.register_notrace_module), keep it on BP "
                "with a rule mapping, or let convert() fall back (fallback=True)."
            )
            err.path, err.reason = path, reason
            raise err from exc


def _constant_defaults(model: nn.Module) -> dict[str, Any] | None:
    """Forward arguments with constant defaults (``mask=None``, ``is_causal=False``, ...) are
    traced at their defaults: a proxy would make ``if mask is not None`` or ``if is_causal``
    take the wrong branch or fail. The converted forward keeps only the other arguments."""
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    found = {
        n: p.default
        for n, p in params.items()
        if n != "self" and p.kind in kinds and (p.default is None or isinstance(p.default, bool | int | float | str))
    }
    return found or None


def trace(model: nn.Module, leaf_paths: dict[str, str], fallback: bool) -> fx.Graph:
    """Trace ``model``; with ``fallback``, a submodule that cannot be traced becomes an
    opaque leaf (recorded in ``leaf_paths`` with the reason) and tracing starts over."""
    while True:
        try:
            return FeedbackTracer(leaf_paths).trace(model, concrete_args=_constant_defaults(model))
        except TraceError as err:
            path = getattr(err, "path", "")
            if not fallback or not path or path in leaf_paths:
                raise
            leaf_paths[path] = err.reason
        except Exception as exc:
            err = TraceError(
                f"torch.fx cannot trace the forward of '{type(model).__qualname__}' (the root module): "
                f"{type(exc).__name__}: {exc}"
            )
            err.path, err.reason = "", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise err from exc


def trace_modes(root: nn.Module, fallback: bool) -> tuple[fx.Graph, fx.Graph, dict[str, str]]:
    """``(train graph, eval graph, {opaque module path: why})`` of ``root``; the eval graph
    is the train graph itself where both have the same code. ``root``'s mode is restored."""
    was_training = root.training
    leaf_paths: dict[str, str] = {}
    try:
        root.train(True)
        train_graph = trace(root, leaf_paths, fallback)
        root.train(False)
        eval_graph = trace(root, leaf_paths, fallback)
        if leaf_paths:  # a leaf found in eval mode must be a leaf in train mode too
            root.train(True)
            train_graph = trace(root, leaf_paths, fallback)
    finally:
        root.train(was_training)
    if train_graph.python_code("self").src == eval_graph.python_code("self").src:
        eval_graph = train_graph
    return train_graph, eval_graph, leaf_paths


__all__ = ["FeedbackTracer", "trace", "trace_modes"]
