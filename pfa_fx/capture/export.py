"""The torch.export front end, for models torch.fx symbolic tracing cannot take (Hugging Face
transformers 5 models among them): one graph per mode in torch.export's training IR, which
the same rewrite as torch.fx graphs turns into feedback-aware ops.

Exporting needs example inputs: ``convert(..., example_inputs=...)`` (a dict of keyword
tensors, or positional tensors), else a Hugging Face model's own ``dummy_inputs``. Every
dimension of every input is exported as ``Dim.AUTO``: batch and sequence length are not
baked in unless the model's code requires it. A forward that takes ``use_cache`` is
captured with ``use_cache=False`` (a training step returns no cache).

The converted model keeps its own class (``generate``, ``config``, ``save_pretrained``
and the rest stay), and its forward dispatches: a call with the captured keyword
tensors (positional ones are bound to their names) runs the rewritten graph of the
current mode; any other call — with a KV cache or ``use_cache=True`` as ``generate``
makes, with ``labels``, with other options — runs the class's own forward with its
weight ops intercepted (:mod:`.intercept`), through the same feedback nodes.
"""

from __future__ import annotations

import inspect
import operator
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn

from ..errors import TraceError
from ..registry import NAMESPACE, attr
from . import intercept


@dataclass
class ExportedGraphs:
    """What the converted model's forward needs from the capture."""

    keys: tuple[str, ...]  # the captured keyword inputs, in their order
    forced: dict[str, Any]  # keyword arguments fixed at capture (use_cache=False)
    graphs: dict[bool, fx.Graph]  # training mode -> graph
    out_specs: dict[bool, pytree.TreeSpec]
    forwards: dict[bool, Callable[..., Any]] = field(default_factory=dict)
    signature: inspect.Signature | None = None
    placement: tuple[torch.device, torch.dtype] | None = None  # of the parameters the graphs were captured with
    warned: bool = False


def example_kwargs(model: nn.Module, example_inputs: Any) -> dict[str, Tensor] | None:
    """Keyword example inputs for ``model``: ``example_inputs`` (a mapping, a tensor or a
    tuple of positional tensors, bound to the forward's parameter names), else the
    model's ``dummy_inputs`` (Hugging Face models have them), else None."""
    if example_inputs is None:
        example_inputs = _hf_example_inputs(model)
        if example_inputs is None:
            return None
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, tuple):
        try:
            bound = inspect.signature(type(model).forward).bind(None, *example_inputs)
        except TypeError as exc:
            raise TraceError(f"example_inputs do not fit {type(model).__qualname__}.forward: {exc}") from exc
        example_inputs = {k: v for k, v in bound.arguments.items() if k != next(iter(bound.signature.parameters))}
    if not isinstance(example_inputs, Mapping) or not all(isinstance(v, Tensor) for v in example_inputs.values()):
        raise TraceError("example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors")
    return dict(example_inputs)


def _hf_example_inputs(model: nn.Module) -> dict[str, Tensor] | None:
    """A Hugging Face model's example inputs: its ``dummy_inputs`` where they hold its main
    input (text models), else images of the config's size for ``pixel_values``."""
    main = getattr(model, "main_input_name", None)
    if not isinstance(main, str):
        return None
    try:
        dummy = model.dummy_inputs
    except Exception:  # some models' dummy_inputs need what their config lacks
        dummy = None
    if isinstance(dummy, Mapping) and main in dummy and all(isinstance(v, Tensor) for v in dummy.values()):
        return dict(dummy)
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if main == "pixel_values" and size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return {main: torch.randn(2, getattr(config, "num_channels", 3), h, w, dtype=dtype)}
    return None


def _forced_kwargs(model: nn.Module) -> dict[str, Any]:
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def export_modes(root: nn.Module, kwargs: dict[str, Tensor]) -> ExportedGraphs:
    """Export ``root`` in training and in eval mode (Python forwards and dropout depend on
    it); ``root``'s mode is restored. Raises :class:`TraceError` with torch.export's reason."""
    forced = _forced_kwargs(root)
    dynamic = {k: {i: torch.export.Dim.AUTO for i in range(v.dim())} for k, v in kwargs.items()}
    dynamic.update({k: None for k in forced})
    was_training = root.training
    exported: dict[bool, fx.GraphModule] = {}
    try:
        for mode in (True, False):
            root.train(mode)
            try:
                ep = torch.export.export(root, (), {**kwargs, **forced}, dynamic_shapes=dynamic, strict=False)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                err = TraceError(
                    f"torch.export cannot capture '{type(root).__qualname__}': {type(exc).__name__}: {first}"
                )
                err.path, err.reason = "", f"{type(exc).__name__}: {first}"
                raise err from exc
            exported[mode] = ep.module()
    finally:
        root.train(was_training)
    for gm in exported.values():
        _inline_regions(gm)
        _refuse_weights_in_subgraphs(root, gm)
    # root changes only once both modes are captured (a failed capture leaves it as it was)
    graphs = {mode: _adopt(root, gm, "train" if mode else "eval") for mode, gm in exported.items()}
    out_specs = {mode: gm._out_spec for mode, gm in exported.items()}
    return ExportedGraphs(tuple(kwargs), forced, graphs, out_specs)


# higher-order ops that only run their subgraph under a grad mode or an autocast state:
# torch.export makes them of ``with torch.no_grad():`` / ``with torch.autocast(...):`` regions
# (transformers < 5.24 compute rotary embeddings in one). Their arguments before the subgraph.
_REGION_HOPS = {"wrap_with_set_grad_enabled": 1, "wrap_with_autocast": 4}


def _hop_name(node: fx.Node) -> str | None:
    """The name of the higher-order op ``node`` calls, else None."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def _enter_grad_mode(enabled: bool) -> bool:
    """Enter an inlined ``wrap_with_set_grad_enabled`` region; returns the mode to restore."""
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(enabled)
    return previous


def _exit_grad_mode(previous: bool, *region_outputs: Any) -> None:
    """Leave an inlined grad-mode region (its outputs are arguments only to order this call after them)."""
    torch.set_grad_enabled(previous)


def _enter_autocast(*state: Any) -> Any:
    """Enter an inlined ``wrap_with_autocast`` region; returns the autocast context to leave."""
    return torch.amp.autocast_mode._enter_autocast(*state)


def _exit_autocast(context: Any, *region_outputs: Any) -> None:
    """Leave an inlined autocast region (its outputs are arguments only to order this call after them)."""
    torch.amp.autocast_mode._exit_autocast(context)


_REGION_CALLS = {
    "wrap_with_set_grad_enabled": (_enter_grad_mode, _exit_grad_mode),
    "wrap_with_autocast": (_enter_autocast, _exit_autocast),
}


def _inline_regions(exported: fx.GraphModule) -> None:
    """Inline the subgraphs of grad-mode and autocast regions into ``exported``'s graph, each
    between calls that enter and leave its state exactly as the higher-order op does (the
    previous grad mode restored, not the one at export): the rewrite then sees the weight
    ops inside them. Nested regions are inlined too; other higher-order ops stay."""
    graph = exported.graph
    done = False
    while not done:
        done = True
        for node in list(graph.nodes):
            name = _hop_name(node)
            if name not in _REGION_HOPS or not _inline_region(exported, node, name):
                continue
            done = False
    graph.lint()


def _inline_region(exported: fx.GraphModule, node: fx.Node, name: str) -> bool:
    """Inline one region call; False (nothing changed) where its form is not the expected one."""
    graph = exported.graph
    n_state = _REGION_HOPS[name]
    if node.kwargs or len(node.args) <= n_state:
        return False
    state, sub_node, operands = node.args[:n_state], node.args[n_state], node.args[n_state + 1 :]
    if not isinstance(sub_node, fx.Node) or sub_node.op != "get_attr":
        return False
    sub = attr(exported, sub_node.target)
    if not isinstance(sub, fx.GraphModule):
        return False
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in sub.graph.nodes if n.op == "output"]
    results = output.args[0]
    if len(placeholders) != len(operands) or any(n.op == "call_module" for n in sub.graph.nodes):
        return False
    users = list(node.users)
    if isinstance(results, (tuple, list)):
        # the op's result is a tuple, read element by element
        if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
            return False
    elif not isinstance(results, fx.Node):
        return False
    enter, leave = _REGION_CALLS[name]
    env: dict[fx.Node, Any] = dict(zip(placeholders, operands))
    with graph.inserting_before(node):
        entered = graph.call_function(enter, tuple(state))
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            copy = graph.node_copy(n, lambda a: env[a])
            if n.op == "get_attr":  # a nested subgraph or constant of the subgraph: now one of exported's
                target = _free_name(exported, f"pfa_inlined_{str(n.target).replace('.', '_')}")
                setattr(exported, target, attr(sub, n.target))
                copy.target = target
            env[n] = copy
        mapped = fx.node.map_arg(results, lambda a: env[a])
        flat = [a for a in pytree.tree_leaves(mapped) if isinstance(a, fx.Node)]
        graph.call_function(leave, (entered, *flat))
    if isinstance(results, fx.Node):
        node.replace_all_uses_with(mapped)
    else:
        for u in users:
            u.replace_all_uses_with(mapped[u.args[1]])
            graph.erase_node(u)
    graph.erase_node(node)
    if not sub_node.users:
        graph.erase_node(sub_node)
    return True


def _free_name(module: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _refuse_weights_in_subgraphs(root: nn.Module, exported: fx.GraphModule) -> None:
    """Warn and raise :class:`TraceError` (``convert`` then tries its next front end) where
    a higher-order op the pass does not inline (torch.cond, while_loop, map, ...) receives
    a trainable parameter of two or more dimensions and its subgraphs compute a matrix
    product or convolution: the rewrite does not enter subgraphs, so such a weight op would
    silently stay on BP. Other such ops are kept as they are (their subgraphs become
    submodules of the converted model)."""
    for node in exported.graph.nodes:
        name = _hop_name(node)
        if name is None:
            continue
        subs = [attr(exported, a.target) for a in node.all_input_nodes if a.op == "get_attr"]
        subs = [s for s in subs if isinstance(s, fx.GraphModule)]
        weights = [p for a in node.all_input_nodes if (p := _weight_behind(root, a)) is not None]
        if weights and any(_has_product(s) for s in subs):
            reason = (
                f"torch.export's graph passes {', '.join(dict.fromkeys(weights))} into the higher-order op "
                f"'{name}', whose subgraph computes a matrix product the pass cannot rewrite"
            )
            err = TraceError(f"torch.export cannot capture '{type(root).__qualname__}' for the pass: {reason}")
            err.path, err.reason = "", reason
            warnings.warn(
                f"pfa_fx: {reason}; the torch.export graph is not used for this model.", UserWarning, stacklevel=6
            )
            raise err


# ops that only re-lay or select from a tensor (aten.t.default's __name__ is "t.default")
_VIEWS = {"t", "transpose", "permute", "view", "reshape", "expand", "alias", "detach", "slice", "select", "to"}


def _weight_behind(root: nn.Module, n: fx.Node, depth: int = 8) -> str | None:
    """The path of the trainable ≥2-D parameter ``n`` is, seen through views."""
    for _ in range(depth):
        if n.op == "get_attr":
            try:
                t = attr(root, n.target)
            except AttributeError:
                return None
            return n.target if isinstance(t, nn.Parameter) and t.requires_grad and t.dim() >= 2 else None
        if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
            return None
        name = getattr(n.target, "__name__", "")
        if name.split(".")[0] not in _VIEWS:
            return None
        n = n.args[0]
    return None


def _has_product(sub: fx.GraphModule) -> bool:
    """Whether ``sub`` (or a subgraph nested in it) computes a matrix product or convolution."""
    from ..rewrite import _is_product  # the rewrite's own list of products

    for n in sub.graph.nodes:
        if n.op == "call_function" and _is_product(n.target):
            return True
        if n.op == "get_attr" and isinstance(nested := attr(sub, n.target), fx.GraphModule) and _has_product(nested):
            return True
    return False


def _adopt(root: nn.Module, exported: fx.GraphModule, mode: str) -> fx.Graph:
    """The exported graph made to run with ``root`` as ``self``: tensors the export lifted
    out of the code (constants) become non-persistent buffers of ``root``, the subgraphs of
    higher-order ops (torch.cond's branches, ...) and its input-guard module children of
    ``root``; each node records the module path it came from."""
    graph = exported.graph
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs: the dispatcher handles pytrees
    graph.owning_module = root
    for i, node in enumerate(n for n in graph.nodes if n.op in ("get_attr", "call_module")):
        if node.op == "call_module":
            name = f"pfa_export_guards_{mode}"
            root.add_module(name, exported.get_submodule(node.target))
            node.target = name
            continue
        try:
            attr(root, node.target)
        except AttributeError:
            value = attr(exported, node.target)
            if isinstance(value, nn.Module):  # a higher-order op's subgraph
                name = f"pfa_export_subgraph_{mode}_{i}"
                root.add_module(name, value)
            else:
                name = f"pfa_export_const_{mode}_{i}"
                root.register_buffer(name, value, persistent=False)
            node.target = name
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["pfa_scope"] = next(reversed(stack.values()))[0]
    return graph


def install_forwards(root: nn.Module, captured: ExportedGraphs) -> None:
    """Compile the rewritten graphs and make ``root``'s forward dispatch to them."""
    for mode, graph in captured.graphs.items():
        graph.lint()
        # a GraphModule's generated forward reads every tensor through ``self``: called with
        # root as self it sees root's current parameters, buffers and feedback nodes
        captured.forwards[mode] = type(fx.GraphModule(root, graph)).forward
    captured.signature = inspect.signature(type(root).forward)
    captured.placement = _placement(root)
    root.__dict__["_pfa_export"] = captured
    root.forward = types.MethodType(_exported_forward, root)


def _exported_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Forward of a model converted through torch.export: the captured graph of the current
    mode for calls it was captured for, else the class's own forward under interception."""
    captured: ExportedGraphs = self.__dict__["_pfa_export"]
    call = _captured_call(captured, args, kwargs)
    if call is not None and _placement(self) != captured.placement:
        # an exported graph bakes in dtypes and devices: after .to(...) only the eager route is right
        if not captured.warned:
            captured.warned = True
            warnings.warn(
                f"pfa_fx: this model was converted on {captured.placement} and now lives on {_placement(self)}; "
                "its captured graph is specialized to the former, so its forward runs the eager interception "
                "instead (same numbers, slower). Move or cast the model before pfa_fx.convert to get a graph.",
                UserWarning,
                stacklevel=3,
            )
        call = None
    if call is None:
        routes = tuple((self.get_parameter(path), key) for path, key in self.pfa_routes)
        return intercept.call_with_feedback(
            lambda *a, **k: type(self).forward(self, *a, **k), getattr(self, NAMESPACE), routes, *args, **kwargs
        )
    out = captured.forwards[self.training](self, *call.values())  # placeholders: keys, then forced
    return pytree.tree_unflatten(list(out), captured.out_specs[self.training])


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return None if p is None else (p.device, p.dtype)


def _captured_call(captured: ExportedGraphs, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's keyword inputs in captured order (with the forced ones), or None when the
    call is not one the graph was captured for."""
    if args:
        try:
            bound = captured.signature.bind_partial(None, *args, **kwargs).arguments
        except TypeError:
            return None
        bound.pop(next(iter(captured.signature.parameters)))
    else:
        bound = kwargs
    call: dict[str, Any] = {}
    for k, v in bound.items():
        if v is None:
            continue  # an optional input left at its default
        if k in captured.forced:
            if v != captured.forced[k]:
                return None
        elif k not in captured.keys or not isinstance(v, Tensor):
            return None
    for k in captured.keys:
        if not isinstance(bound.get(k), Tensor):
            return None
        call[k] = bound[k]
    call.update(captured.forced)
    return call


__all__ = ["ExportedGraphs", "example_kwargs", "export_modes", "install_forwards"]
