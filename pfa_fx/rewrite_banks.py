"""The graph rewrite of expert banks applied per expert and of matrices applied as the left
operand (:mod:`pfa_fx.grouped_ops`), for the fx and torch.export front ends.

What a captured graph shows, and becomes ``graph_bank_call(x, K, node, spec, aux)``:

- ``grouped_mm(x, K or K.transpose(-2, -1), offs)``: ``aten._grouped_mm``, ``F.grouped_mm``
  or transformers' ``grouped_mm_fallback`` custom op (transformers' default
  ``experts_implementation``; torch.export records the custom op);
- ``bmm(K[ids], x)`` / ``bmm(x, K[ids])`` with ``K[ids]`` an ``aten.index`` (or
  ``getitem``) of the bank (``batched_mm``);
- ``linear(x, K[e])``, ``matmul(x, K[e])``, ``matmul(K[e], x)`` with ``K[e]`` an
  ``aten.select`` (or ``getitem`` with an int) of the bank, possibly transposed;
- ``matmul(W, x)`` / ``mm(W, x)`` with ``W`` a 2-D parameter (``W @ x``).

The replacement recomputes the operand from the bank with the same view or gather and calls
the same aten op, so the forward is the graph's own, bit for bit; the operand's node is
erased where nothing else reads it. The eager loop (``experts_implementation="eager"``)
cannot be exported (its loop runs over a data-dependent set of experts): such models take
the eager interception, which routes the same calls.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .grouped_ops import BankCall, feedback_bank_call
from .registry import attr
from .weights import HiddenWeight, bank_weight, get_module

aten = torch.ops.aten

#: the native calls a rewritten graph makes, by name (graph arguments must be plain values)
NATIVES: dict[str, Any] = {
    "linear": aten.linear.default,
    "matmul": aten.matmul.default,
    "mm": aten.mm.default,
    "bmm": aten.bmm.default,
}
_GROUPED_NAMES = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


def _grouped_native(name: str) -> Any:
    if name == "grouped_mm_fallback":
        return torch.ops.transformers.grouped_mm_fallback.default
    return aten._grouped_mm.default


def graph_bank_call(x, K, node, spec: tuple, aux=None):
    """A bank (or left-operand matrix) call of a rewritten graph: ``spec`` is ``(mode, kind,
    native name, operand transposed, expert)``, ``aux`` the offsets or the gathered ids."""
    mode, kind, name, op_t, expert = spec
    if mode == "grouped":
        native, op = _grouped_native(name), K.transpose(-2, -1) if op_t else K
        call = BankCall(mode, kind, lambda t: native(t, op, aux), offs=aux, op_t=op_t)
    elif mode == "gather":
        op, bmm = aten.index.Tensor(K, [aux]), NATIVES["bmm"]
        fn = (lambda t: bmm(op, t)) if kind == "left" else lambda t: bmm(t, op)
        call = BankCall(mode, kind, fn, ids=aux)
    else:
        op = K if expert is None else aten.select.int(K, 0, expert)
        op = op.mT if op_t else op
        native = NATIVES[name]
        fn = (lambda t: native(op, t)) if kind == "left" else lambda t: native(t, op)
        call = BankCall(mode, kind, fn, expert=expert, op_t=op_t)
    return feedback_bank_call(x, K, node, call)


def _target_name(target: Any) -> str:
    if target is operator.matmul or target is torch.matmul:
        return "matmul"
    if target is F.linear:
        return "linear"
    if target is torch.mm:
        return "mm"
    if target is torch.bmm:
        return "bmm"
    name = getattr(target, "__name__", "")
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    return name


def _param_node(gm: nn.Module, n: Any, dim: int) -> tuple[fx.Node, nn.Parameter] | None:
    if isinstance(n, fx.Node) and n.op == "get_attr":
        p = attr(gm, n.target)
        if isinstance(p, nn.Parameter) and p.dim() == dim:
            return n, p
    return None


def _is_swap(n: fx.Node) -> bool:
    """``t.transpose(-2, -1)`` of a 3-D tensor (or ``(1, 2)``), ``t.T`` / ``.t()`` of a matrix."""
    name = _target_name(n.target) if n.op == "call_function" else n.target if n.op == "call_method" else ""
    if name in ("transpose", "transpose.int") and len(n.args) == 3:
        return {n.args[1], n.args[2]} in ({-2, -1}, {1, 2}, {0, 1})
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) == 2 and n.args[1] in ("T", "mT")
    return name in ("t", "numpy_T", "mT") and len(n.args) == 1


def _operand(gm: nn.Module, n: Any):
    """What a product's operand is: ``("bank", K node, K, op_t)``, ``("slice", K node, K, op_t,
    e)``, ``("gather", K node, K, ids node)``, ``("matrix", W node, W)``, else None."""
    if not isinstance(n, fx.Node):
        return None
    op_t = False
    if _is_swap(n) and isinstance(n.args[0], fx.Node):
        op_t, n = True, n.args[0]
    if (hit := _param_node(gm, n, 3)) is not None:
        return ("bank", *hit, op_t)
    if (hit := _param_node(gm, n, 2)) is not None:
        return None if op_t else ("matrix", *hit)
    if n.op != "call_function" or not n.args:
        return None
    src = _param_node(gm, n.args[0], 3)
    if src is None:
        return None
    name = _target_name(n.target)
    if name == "select" and n.args[1:2] == (0,) and isinstance(n.args[2], int):
        return ("slice", *src, op_t, n.args[2])
    if n.target is operator.getitem and isinstance(n.args[1], int):
        return ("slice", *src, op_t, n.args[1])
    if not op_t and name == "index" and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) == 1:
        return ("gather", *src, n.args[1][0])
    if not op_t and n.target is operator.getitem and isinstance(n.args[1], fx.Node):
        return ("gather", *src, n.args[1])
    return None


def rewrite_bank_product(rewriter: Any, graph: fx.Graph, node: fx.Node) -> bool:
    """Rewrite ``node`` if it applies an expert bank or a left-operand matrix; True if done."""
    if node.op != "call_function":
        return False
    name = _target_name(node.target)
    gm = rewriter.gm
    if name in _GROUPED_NAMES:
        names = ("input", "weight", "offs") if name == "grouped_mm_fallback" else ("self", "mat2", "offs")
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        if set(bound) - {*names, "mat_a", "mat_b", "bias", "out_dtype"} or bound.get("bias") is not None:
            return False
        x, w = bound.get(names[0], bound.get("mat_a")), bound.get(names[1], bound.get("mat_b"))
        what = _operand(gm, w)
        if what is None or what[0] != "bank" or bound.get("offs") is None or bound.get("out_dtype") is not None:
            return False
        _, k_node, K, op_t = what
        return _replace(
            rewriter, graph, node, x, k_node, K, not op_t, ("grouped", "right", name, op_t, None), bound["offs"], w
        )
    if name not in ("linear", "matmul", "mm", "bmm") or len(node.args) != 2 or node.kwargs:
        return False
    a, b = node.args
    right, left = _operand(gm, b), _operand(gm, a) if name != "linear" else None
    if name == "bmm":
        if right is not None and right[0] == "gather":
            return _replace(
                rewriter, graph, node, a, right[1], right[2], True, ("gather", "right", name, False, None), right[3], b
            )
        if left is not None and left[0] == "gather":
            return _replace(
                rewriter, graph, node, b, left[1], left[2], False, ("gather", "left", name, False, None), left[3], a
            )
        return False
    if right is not None and right[0] == "slice":
        _, k_node, K, op_t, e = right
        kind = "linear" if name == "linear" else "right"
        transposed = (kind == "right") != op_t  # the bank's layout as this call reads it
        return _replace(rewriter, graph, node, a, k_node, K, transposed, ("slice", kind, name, op_t, e), None, b)
    if left is not None and left[0] == "slice":
        _, k_node, K, op_t, e = left
        return _replace(rewriter, graph, node, b, k_node, K, op_t, ("slice", "left", name, op_t, e), None, a)
    if left is not None and left[0] == "matrix" and right is None and not _operand_is_weight(gm, b):
        return _replace_left_matrix(rewriter, graph, node, b, left[1], left[2], name)
    return False


def _operand_is_weight(gm: nn.Module, n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr" and isinstance(attr(gm, n.target), nn.Parameter)


def _replace(rewriter, graph, node, x, k_node, K, transposed, spec, aux, operand) -> bool:
    path = k_node.target
    owner = get_module(rewriter.root, path.rpartition(".")[0])
    transposed = bool(getattr(owner, "is_transposed", transposed))
    fb = rewriter.nodes.node_for_hidden(bank_weight(path, K, owner, transposed), rewriter.nodes.path)
    if fb is None:
        return True  # kept on BP on purpose (the rule mapping)
    _emit(rewriter, graph, node, x, k_node, fb.op_name, spec, aux, operand)
    return True


def _replace_left_matrix(rewriter, graph, node, x, w_node, W, name) -> bool:
    path = w_node.target
    key = path[: -len(".weight")] if path.endswith(".weight") else path
    made = rewriter.nodes.made.get(key)
    if made is not None and made.param_transposed:
        return False  # held (in, out) for x @ W: W @ x would read it in the other orientation
    owner = get_module(rewriter.root, path.rpartition(".")[0])
    fb = rewriter.nodes.node_for_hidden(HiddenWeight(path, key, W, 1, owner), rewriter.nodes.path)
    if fb is not None:
        _emit(rewriter, graph, node, x, w_node, key, ("slice", "left", name, False, None), None, None)
    return True


def _emit(rewriter, graph, node, x, k_node, key, spec, aux, operand) -> None:
    with graph.inserting_before(node):
        f = graph.get_attr(rewriter.nodes.flat_name(key))
        new = graph.call_function(graph_bank_call, (x, k_node, f, spec, aux))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if isinstance(operand, fx.Node) and operand is not k_node and not operand.users:
        inner = operand.args[0] if operand.args and isinstance(operand.args[0], fx.Node) else None
        graph.erase_node(operand)  # the view or gather the native call made (recomputed inside)
        if inner is not None and inner is not k_node and not inner.users and inner.op == "call_function":
            graph.erase_node(inner)


__all__ = ["graph_bank_call", "rewrite_bank_product"]
