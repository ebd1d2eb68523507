"""The rewrite of a captured graph: every weight op becomes the feedback-aware op of
:mod:`pfa_fx.ops` for its family, with the op's node read through one flat attribute.

One rewrite serves every front end that yields an ``fx.Graph``. It rewrites calls of plain
Linear/Conv/ConvTranspose modules, ``F.linear``/``F.conv*d``/``F.conv_transpose*d`` calls on
parameters or on weights computed from them, ``x @ P`` / ``x @ P.T`` on a 2-D parameter,
and calls of opaque modules or FX-wrapped functions holding weights (routed at run time
by :mod:`pfa_fx.capture.intercept`). Nothing else of the graph changes.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops
from .capture import intercept
from .computed_weights import weight_function
from .errors import ConversionError
from .install import FeedbackInstaller
from .node import FeedbackNode
from .registry import NAMESPACE, attr
from .rewrite_banks import rewrite_bank_product
from .weights import (
    TRANSPOSED_MODULES,
    WEIGHT_MODULES,
    HiddenWeight,
    get_module,
    hidden_weights,
    is_param,
    is_plain_weight_module,
    route_paths,
    source_parameter,
    weights_passed_to,
)

aten = torch.ops.aten
# torch.fx graphs call the Python functions; torch.export's training IR calls the aten ops,
# whose schemas take the same arguments in the same order
_LINEAR_FNS = {F.linear, aten.linear.default}
_MATMUL_FNS = {operator.matmul, torch.matmul, torch.mm, aten.matmul.default, aten.mm.default}
_ADDMM_FNS = {torch.addmm, aten.addmm.default}
_CONV_FNS = {F.conv1d, F.conv2d, F.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_CONV_T_FNS = {
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_T_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class Rewriter:
    """Rewrites the graphs of one conversion; the nodes come from one installer, so both
    graphs (train and eval) of a model share each op's node."""

    def __init__(self, gm: nn.Module, root: nn.Module, nodes: FeedbackInstaller):
        # root: the traced copy, whose module types the GraphModule's copied paths may lack
        self.gm, self.root, self.nodes = gm, root, nodes

    def rewrite(self, graph: fx.Graph) -> None:
        """Rewrite every weight op of ``graph`` in place."""
        for node in list(graph.nodes):
            if node.op == "call_module":
                m = self.gm.get_submodule(node.target)
                if is_plain_weight_module(m):
                    self._rewrite_module_call(graph, node, m)
                    continue
                hidden = hidden_weights(m, node.target)
                self._note_unroutable(m, node.target, hidden)
                if hidden:
                    self._rewrite_opaque_call(graph, node, hidden)
            elif node.op == "call_function" and rewrite_bank_product(self, graph, node):
                continue  # an expert bank applied per expert, or a matrix applied as W @ x
            elif node.op == "call_function" and (
                node.target in _LINEAR_FNS or node.target in _CONV_FNS or node.target in _CONV_T_FNS
            ):
                self._rewrite_function_call(graph, node)
            elif node.op == "call_function" and (node.target in _MATMUL_FNS or node.target in _ADDMM_FNS):
                self._rewrite_matmul_with_parameter(graph, node)
            elif (
                node.op == "call_function"
                and inspect.isfunction(node.target)
                and (hidden := weights_passed_to(self.root, node))
            ):
                self._rewrite_opaque_call(graph, node, hidden)
        graph.lint()  # no dead-code elimination: the model's own side effects stay

    def _note_unroutable(self, m: nn.Module, path: str, hidden: list[HiddenWeight]) -> None:
        """Weight-like parameters (>= 2-D, named ``*weight``) that an opaque module uses in
        code the pass cannot route (e.g. timm's CondConv2d mixes a kernel per sample):
        recorded, so the report names them and ``strict=True`` refuses."""
        routed = {id(h.weight if h.bank is None else h.bank) for h in hidden}
        for rel, sub in m.named_modules():
            if isinstance(sub, (*WEIGHT_MODULES, nn.Embedding, nn.EmbeddingBag)):
                continue
            for name, p in sub.named_parameters(recurse=False):
                if p.dim() >= 2 and name.endswith("weight") and id(p) not in routed:
                    full = ".".join(x for x in (path, rel, name) if x)
                    key = full[: -len(".weight")] if full.endswith(".weight") else full
                    self.nodes.skipped[key] = (
                        f"used inside opaque module '{path}' ({type(m).__qualname__}) by code the pass "
                        "cannot route (not a Linear/Conv weight): stays on BP"
                    )

    def _feedback_attr(self, graph: fx.Graph, key: str) -> fx.Node:
        """The op's node, read by the graph as one flat attribute of the converted model
        (:func:`pfa_fx.registry.bind_flat`)."""
        return graph.get_attr(self.nodes.flat_name(key))

    def _rewrite_module_call(self, graph: fx.Graph, node: fx.Node, m: nn.Module) -> None:
        groups = getattr(m, "groups", 1)
        transposed = isinstance(m, TRANSPOSED_MODULES)
        fb = self.nodes.node_for(node.target, m.weight, groups, m, transposed=transposed)
        if fb is None:
            return
        x = node.args[0] if node.args else node.kwargs["input"]
        with graph.inserting_before(node):
            # the module once, then its weight and bias: one attribute chain per op, not three
            # (each level of a chain is an nn.Module.__getattr__ on every call)
            mod = graph.get_attr(node.target)
            w = graph.call_function(getattr, (mod, "weight"))
            b = graph.call_function(getattr, (mod, "bias")) if m.bias is not None else None
            f = self._feedback_attr(graph, node.target)
            if isinstance(m, nn.Linear):
                new = graph.call_function(ops.feedback_linear, (x, w, b, f))
            elif transposed:
                # output_padding as nn.ConvTranspose*d computes it (from output_size if given)
                size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
                out_pad = m.output_padding
                if size is not None:
                    out_pad = graph.call_function(_transposed_output_padding, (mod, x, size))
                args = (x, w, b, f, m.stride, m.padding, out_pad, m.groups, m.dilation)
                new = graph.call_function(ops.feedback_conv_transpose, args)
            else:
                padding = m.padding
                if m.padding_mode != "zeros":
                    # nn.Conv*d pads explicitly for these modes, then convolves unpadded
                    x = graph.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
                    padding = 0
                new = graph.call_function(ops.feedback_conv, (x, w, b, f, m.stride, padding, m.dilation, m.groups))
        _replace_call(graph, node, new, fb)

    def _rewrite_function_call(self, graph: fx.Graph, node: fx.Node) -> None:
        is_linear = node.target in _LINEAR_FNS
        transposed = node.target in _CONV_T_FNS
        names = ("input", "weight", "bias") if is_linear else _CONV_T_ARGS if transposed else _CONV_ARGS
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        if not is_linear:
            for k, v in (_CONV_T_DEFAULTS if transposed else _CONV_DEFAULTS).items():
                bound.setdefault(k, v)
        bound.setdefault("bias", None)
        w_node = bound["weight"]
        param_path = source_parameter(self.gm, w_node)
        scope = node.meta.get("pfa_scope", "")
        owner = get_module(self.root, scope)
        if param_path is None:
            # weight not derived from a parameter (e.g. computed from the input): its shape
            # is unknown before a forward, so it stays on BP and the report says so.
            self.nodes.skipped[f"{scope}:{node.name}"] = "weight is not computed from a parameter"
            return
        weight = self.gm.get_parameter(param_path) if is_param(self.gm, param_path) else self.gm.get_buffer(param_path)
        key = param_path[: -len(".weight")] if param_path.endswith(".weight") else param_path
        if scope and key != scope and getattr(owner, "weight", None) is weight:
            key = scope  # a tied weight (an LM head sharing the embedding): named after the module applying it
        groups = bound.get("groups", 1)
        if is_linear and weight.dim() != 2:  # a slice of an expert bank in a form the pass does not know
            self.nodes.skipped[key] = (
                f"a {weight.dim()}-D parameter applied by F.linear in a form the pass cannot route"
            )
            return
        if not isinstance(groups, int):
            # e.g. CondConv: one kernel per sample, mixed from experts by input-dependent
            # routing; its feedback would have to be mixed the same way
            self.nodes.skipped[key] = "groups is computed at run time (a per-sample kernel, e.g. CondConv)"
            return
        fb = self.nodes.node_for(key, weight, groups, owner, transposed=transposed)
        if fb is None:
            return
        if not fb._weight_fn and (fn := weight_function(self.gm, w_node, fb.weight_shape)) is not None:
            fb._weight_fn = [fn]
        with graph.inserting_before(node):
            f = self._feedback_attr(graph, key)
            if is_linear:
                new = graph.call_function(ops.feedback_linear, (bound["input"], w_node, bound["bias"], f))
            elif transposed:
                rest = tuple(bound[k] for k in _CONV_T_ARGS[3:])
                new = graph.call_function(
                    ops.feedback_conv_transpose, (bound["input"], w_node, bound["bias"], f, *rest)
                )
            else:
                new = graph.call_function(
                    ops.feedback_conv,
                    (
                        bound["input"],
                        w_node,
                        bound["bias"],
                        f,
                        bound["stride"],
                        bound["padding"],
                        bound["dilation"],
                        groups,
                    ),
                )
        _replace_call(graph, node, new, fb)

    def _rewrite_matmul_with_parameter(self, graph: fx.Graph, node: fx.Node) -> None:
        """A matrix product whose right operand is a 2-D parameter ``P`` is a weight op:
        ``x @ Pᵀ`` (the relative-position tables of BoTNet/HaloNet attention) is
        ``F.linear(x, P)``; ``x @ P`` (SwiftFormer's ``q @ w_g``) and ``torch.addmm(b, x, P)``
        (Hugging Face's ``Conv1D``, which stores ``(in, out)``) are ``F.linear(x, Pᵀ, b)``.
        The error to ``x`` runs through ``P``, so it gets feedback like any weight, held as
        ``(out, in)`` as nn.Linear holds its own."""
        bias = None
        if node.target in _ADDMM_FNS:
            if len(node.args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
                return
            if set(node.kwargs) - {"beta", "alpha"} or not _is_vector(self.gm, node.args[0]):
                return  # F.linear's bias is a vector
            bias, x, operand = node.args
        elif len(node.args) == 2 and not node.kwargs:
            x, operand = node.args
        else:
            return
        if not isinstance(operand, fx.Node):
            return
        src, pt = operand, None
        if _is_matrix_transpose(operand):
            src, pt = operand.args[0], operand
        if not (isinstance(src, fx.Node) and src.op == "get_attr"):
            return
        param = attr(self.gm, src.target)
        if not isinstance(param, nn.Parameter) or param.dim() != 2:
            return
        key = src.target[: -len(".weight")] if src.target.endswith(".weight") else src.target
        made = self.nodes.made.get(key)
        if made is not None and made.param_transposed != (pt is None):
            # a square P would pass the shape check and get the other orientation's feedback
            raise ConversionError(
                f"parameter '{src.target}' is used both as x @ P and as x @ P.T (or as a Linear weight); "
                "one feedback state cannot serve both orientations"
            )
        weight = param if pt is not None else param.t()
        fb = self.nodes.node_for(key, weight, 1, get_module(self.root, src.target.rpartition(".")[0]))
        if fb is None:
            return
        if pt is None:
            fb._weight_ref = [param]  # the parameter itself: follows .to() and loads
            fb.param_transposed = True
        with graph.inserting_before(node):
            w = src if pt is not None else graph.call_method("t", (src,))
            new = graph.call_function(ops.feedback_linear, (x, w, bias, self._feedback_attr(graph, key)))
        _replace_call(graph, node, new, fb)
        if pt is not None:
            graph.erase_node(pt)

    def _rewrite_opaque_call(self, graph: fx.Graph, node: fx.Node, hidden: list[HiddenWeight]) -> None:
        """Weights used inside code tracing keeps opaque: route their ops at run time."""
        path = "opaque module" if node.op == "call_module" else "opaque function"
        routes = [(p, h.key) for h in hidden if self.nodes.node_for_hidden(h, path) for p in route_paths(self.gm, h)]
        if not routes:
            return
        with graph.inserting_before(node):
            pairs = tuple((graph.get_attr(path), key) for path, key in routes)
            ns = graph.get_attr(NAMESPACE)
            if node.op == "call_module":
                args = (graph.get_attr(node.target), ns, pairs, *node.args)
                new = graph.call_function(intercept.call_with_feedback, args, dict(node.kwargs))
            else:
                new = graph.call_function(intercept.routed(node.target), (ns, pairs, *node.args), dict(node.kwargs))
        _replace_call(graph, node, new)


def _replace_call(graph: fx.Graph, old: fx.Node, new: fx.Node, fb: FeedbackNode | None = None) -> None:
    """``new`` takes ``old``'s place (uses and metadata). A feedback op whose node's backward
    cannot be traced ahead of time (``FeedbackNode.traceable_backward``: DFA) calls the op's
    version that torch.compile leaves out of its graphs."""
    if fb is not None and not fb.traceable_backward:
        new.target = ops.BETWEEN_GRAPHS[new.target]
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def _is_matrix_transpose(n: fx.Node) -> bool:
    """``P.t()``, ``P.T``, ``P.transpose(0, 1)`` / ``(-1, -2)``, ``P.permute(1, 0)`` of a
    matrix, used once (the rewrite replaces its one use)."""
    if len(n.users) != 1 or n.op not in ("call_method", "call_function"):
        return False
    if n.target is getattr:  # P.T (P.mT is the same for a matrix)
        return len(n.args) == 2 and n.args[1] in ("T", "mT")
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    name = name.split(".")[0]  # aten overloads: "t.default", "transpose.int"
    if name in ("t", "numpy_T", "mT"):  # torch.export writes P.T as aten.numpy_T, P.mT as aten.mT
        return len(n.args) == 1
    if name == "transpose":
        return len(n.args) == 3 and {n.args[1], n.args[2]} in ({-1, -2}, {0, 1})
    if name == "permute":
        dims = n.args[1:] if n.op == "call_method" and len(n.args) == 3 else n.args[1] if len(n.args) == 2 else ()
        return list(dims) == [1, 0]
    return False


def _is_vector(gm: nn.Module, n: Any) -> bool:
    """Whether a graph argument is a 1-D tensor: a parameter or buffer, or a node whose
    example value (torch.export records one) is 1-D."""
    if not isinstance(n, fx.Node):
        return False
    if n.op == "get_attr":
        t = attr(gm, n.target)
        return isinstance(t, torch.Tensor) and t.dim() == 1
    val = n.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 1


def _transposed_output_padding(m: nn.Module, x: torch.Tensor, output_size: Any) -> list[int]:
    """``output_padding`` of ``m(x, output_size)``, computed as ``nn.ConvTranspose*d`` does."""
    n = m.weight.dim() - 2
    return m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, n, m.dilation)


def weight_op_readers(model: nn.Module, graph: fx.Graph) -> dict[str, list[str]]:
    """``{op name: [names of the weight ops that read its output]}`` in a rewritten graph:
    the first weight ops downstream of each op, in the order found; a path through an
    opaque call (whose weight ops the graph does not show) or to the output ends there."""
    weight_ops = (*ops.OP_FUNCTIONS, *ops.BETWEEN_GRAPHS.values())
    op_key: dict[fx.Node, str] = {}
    opaque: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in weight_ops and isinstance(n.args[3], fx.Node) and n.args[3].op == "get_attr":
            op_key[n] = attr(model, n.args[3].target).op_name
        elif n.target is intercept.call_with_feedback or getattr(n.target, "__name__", "").endswith("_with_feedback"):
            opaque.add(n)  # weight ops inside: the response there is not an op input we see
    readers: dict[str, list[str]] = {}
    for n, key in op_key.items():
        found = readers.setdefault(key, [])
        frontier, seen = list(n.users), set()
        while frontier and len(seen) < 500:
            u = frontier.pop(0)
            if u in seen:
                continue
            seen.add(u)
            if u in op_key:
                if op_key[u] != key and op_key[u] not in found:
                    found.append(op_key[u])
                continue
            if u in opaque or u.op == "output":
                continue
            frontier += list(u.users)
    return readers


# every product of an operand with a weight (what BP would transport an error through)
_PRODUCT_FNS = {
    *_LINEAR_FNS,
    *_MATMUL_FNS,
    *_ADDMM_FNS,
    *_CONV_FNS,
    *_CONV_T_FNS,
    torch.bmm,
    torch.baddbmm,
    torch.einsum,
    torch.tensordot,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.einsum.default,
    aten.addmv.default,
    aten.mv.default,
}
# ops that only re-lay, cast or select from a tensor: a weight seen through them is still the weight
_PASS_THROUGH = {
    "view", "reshape", "t", "numpy_T", "mT", "transpose", "permute", "expand", "unsqueeze", "squeeze", "contiguous", "to",
    "float", "half", "bfloat16", "type", "clone", "alias", "_to_copy", "select", "slice", "getitem", "chunk",
    "split", "unbind", "narrow", "flatten", "view_as", "reshape_as", "expand_as", "index", "unflatten",
}  # fmt: skip


def matrix_products_left(model: nn.Module, graphs: tuple[fx.Graph, ...], nodes: FeedbackInstaller) -> dict[str, str]:
    """``{parameter path: why}`` for every parameter of two or more dimensions that a
    rewritten graph still uses as an operand of a matrix product or convolution (through
    views, transposes and slices only): errors that stay on BP. Ops the rule mapping keeps
    native on purpose are not listed."""
    converted = {id(n._weight_ref[0]) for n in nodes.made.values() if n is not None}
    left: dict[str, str] = {}
    for graph in dict.fromkeys(graphs):
        for n in graph.nodes:
            if n.op == "call_module":
                m = model.get_submodule(n.target)
                if is_plain_weight_module(m) and id(m.weight) not in converted and n.target not in nodes.kept_native:
                    left.setdefault(f"{n.target}.weight", f"weight of {type(m).__name__} '{n.target}'")
                continue
            if n.op != "call_function" or not _is_product(n.target):
                continue
            for arg in n.all_input_nodes:
                path = _parameter_behind(model, arg)
                if path is None:
                    continue
                p = attr(model, path)
                key = path[: -len(".weight")] if path.endswith(".weight") else path
                if id(p) in converted or key in nodes.kept_native or n.meta.get("pfa_scope") in nodes.kept_native:
                    continue
                what = getattr(n.target, "__name__", str(n.target))
                left.setdefault(
                    path, f"an operand of {what} ({n.meta.get('pfa_scope') or 'the model'}) the pass cannot route"
                )
    return left


def _is_product(target: Any) -> bool:
    """A matrix product or convolution: the functions and aten ops above, and grouped matrix
    products by name (transformers' ``grouped_mm`` custom ops run MoE experts)."""
    try:
        if target in _PRODUCT_FNS:
            return True
    except TypeError:  # an unhashable target
        return False
    return "grouped_mm" in str(target)


def _parameter_behind(model: nn.Module, n: fx.Node, depth: int = 8) -> str | None:
    """The ≥2-D parameter a node is, seen through ops that only re-lay or select from it."""
    for _ in range(depth):
        if n.op == "get_attr":
            t = attr(model, n.target)
            return n.target if isinstance(t, nn.Parameter) and t.dim() >= 2 else None
        if n.op not in ("call_method", "call_function"):
            return None
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if n.target is getattr:  # P.T, P.mT
            name = "t" if len(n.args) == 2 and n.args[1] in ("T", "mT") else ""
        if name.split(".")[0] not in _PASS_THROUGH or not n.args or not isinstance(n.args[0], fx.Node):
            return None
        n = n.args[0]
    return None


__all__ = ["Rewriter", "matrix_products_left", "weight_op_readers"]
