"""Run-time routes of expert banks and of matrices applied as the left operand
(:mod:`pfa_fx.grouped_ops`), for the interception of :mod:`.intercept`.

A call is routed where its operand is recognisably a routed parameter seen through one
step: ``K[e]`` (a view of a bank: the eager loop's ``F.linear(x, K[e])`` / ``x @ K[e]``),
``K[ids]`` (a gather of a bank, found through its ``grad_fn``: ``torch.bmm``), the bank
itself or its ``transpose(-2, -1)`` (``grouped_mm``), or a 2-D weight itself as the left
operand of a product (``W @ x``). Anything else is left to the other routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..grouped_ops import BankCall, feedback_bank_call
from ..node import FeedbackNode

NOT_ROUTED = object()

_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.mm, Tensor.matmul, Tensor.mm, Tensor.__matmul__}
_BMM = {torch.bmm, Tensor.bmm}


def _grouped_functions() -> set[Callable]:
    found: set[Callable] = set()
    for fn in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)):
        if fn is not None:
            found.add(fn)
    packet = getattr(torch.ops.aten, "_grouped_mm", None)
    if packet is not None:
        found.add(packet.default)
    return found


_GROUPED = _grouped_functions()
#: every function a bank or a left-operand matrix can be applied with
FUNCTIONS = _LINEAR | _MATMUL | _BMM | _GROUPED


def _is_transformers_fallback(func: Any) -> bool:
    """transformers' ``grouped_mm_fallback`` custom op (its packet or its overload)."""
    if not isinstance(func, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return False
    return str(func).split(".")[:2] == ["transformers", "grouped_mm_fallback"]


def is_bank_function(func: Any) -> bool:
    try:
        if func in FUNCTIONS:
            return True
    except TypeError:
        return False
    return _is_transformers_fallback(func)


def _bank_node(K: Any, routes: dict[int, FeedbackNode]) -> FeedbackNode | None:
    node = routes.get(id(K)) if isinstance(K, Tensor) else None
    return node if node is not None and getattr(node, "grouped_experts", None) else None


def _slice_of_bank(w: Any, routes: dict[int, FeedbackNode]) -> tuple[FeedbackNode, Tensor, int, bool] | None:
    """``(node, K, e, transposed)`` where ``w`` is ``K[e]`` or ``K[e].T`` of a routed bank."""
    if not isinstance(w, Tensor) or w.dim() != 2 or w._base is None:
        return None
    K = w._base
    node = _bank_node(K, routes)
    if node is None or K.dim() != 3:
        return None
    rest, strides = tuple(K.shape[1:]), tuple(K.stride()[1:])
    if tuple(w.shape) == rest and w.stride() == strides:
        op_t = False
    elif tuple(w.shape) == rest[::-1] and w.stride() == strides[::-1]:
        op_t = True
    else:
        return None
    offset = w.storage_offset() - K.storage_offset()
    e, r = divmod(offset, K.stride(0))
    if r or not 0 <= e < K.shape[0]:
        return None
    return node, K, e, op_t


def _gather_of_bank(w: Any, routes: dict[int, FeedbackNode]) -> tuple[FeedbackNode, Tensor, Tensor] | None:
    """``(node, K, ids)`` where ``w`` is ``K[ids]`` of a routed bank (read from its ``grad_fn``)."""
    fn = getattr(w, "grad_fn", None) if isinstance(w, Tensor) and w.dim() == 3 else None
    if fn is None or fn.name() != "IndexBackward0":
        return None
    (src, _), *_ = fn.next_functions
    K = getattr(src, "variable", None)
    node = _bank_node(K, routes)
    idx = fn._saved_indices
    if node is None or len(idx) != 1 or idx[0] is None or idx[0].dim() != 1 or idx[0].is_floating_point():
        return None
    return node, K, idx[0]


def _bank_or_transpose(w: Any, routes: dict[int, FeedbackNode]) -> tuple[FeedbackNode, Tensor, bool] | None:
    """``(node, K, transposed)`` where ``w`` is a routed bank or its ``transpose(-2, -1)``."""
    node = _bank_node(w, routes)
    if node is not None:
        return node, w, False
    K = w._base if isinstance(w, Tensor) and w.dim() == 3 else None
    node = _bank_node(K, routes)
    if node is None or w.storage_offset() != K.storage_offset():
        return None
    s = K.stride()
    if tuple(w.shape) == (K.shape[0], K.shape[2], K.shape[1]) and w.stride() == (s[0], s[2], s[1]):
        return node, K, True
    return None


def _left_matrix(w: Any, routes: dict[int, FeedbackNode]) -> tuple[FeedbackNode, Tensor, bool] | None:
    """``(node, W, transposed)`` where ``w`` (the left operand) is a routed 2-D weight held
    ``(out, in)`` as itself, or one held ``(in, out)`` through ``.T``."""
    if not isinstance(w, Tensor) or w.dim() != 2:
        return None
    node = routes.get(id(w))
    if node is not None:
        ok = not node.param_transposed and not getattr(node, "expert_bank", False)
        return (node, w, False) if ok and tuple(w.shape) == node.weight_shape else None
    base = w._base
    node = routes.get(id(base)) if base is not None else None
    if node is None or not node.param_transposed or base.dim() != 2:
        return None
    if tuple(w.shape) == tuple(base.shape)[::-1] and w.stride() == base.stride()[::-1]:
        return node, base, True
    return None


def route(func: Callable, args: tuple, kwargs: dict, routes: dict[int, FeedbackNode]) -> Any:
    """The call routed to :func:`~pfa_fx.grouped_ops.feedback_bank_call`, else ``NOT_ROUTED``."""
    if func in _LINEAR:
        bound = dict(zip(("input", "weight", "bias"), args))
        bound.update(kwargs)
        x, w = bound.get("input"), bound.get("weight")
        hit = _slice_of_bank(w, routes) if bound.get("bias") is None and isinstance(x, Tensor) else None
        if hit is None:
            return NOT_ROUTED
        node, K, e, op_t = hit
        call = BankCall("slice", "linear", lambda t: func(t, w), expert=e, op_t=op_t)
        return feedback_bank_call(x, K, node, call)
    if func in _MATMUL:
        if len(args) != 2 or kwargs:
            return NOT_ROUTED
        a, b = args
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return NOT_ROUTED
        if (hit := _slice_of_bank(b, routes)) is not None:
            node, K, e, op_t = hit
            return feedback_bank_call(a, K, node, BankCall("slice", "right", lambda t: func(t, b), expert=e, op_t=op_t))
        if b.dim() < 2:
            return NOT_ROUTED
        if (hit := _slice_of_bank(a, routes)) is not None:
            node, K, e, op_t = hit
            return feedback_bank_call(b, K, node, BankCall("slice", "left", lambda t: func(a, t), expert=e, op_t=op_t))
        if (left := _left_matrix(a, routes)) is not None and routes.get(id(b)) is None:
            node, W, op_t = left
            return feedback_bank_call(b, W, node, BankCall("slice", "left", lambda t: func(a, t), op_t=op_t))
        return NOT_ROUTED
    if func in _BMM:
        if len(args) != 2 or kwargs:
            return NOT_ROUTED
        a, b = args
        if (hit := _gather_of_bank(a, routes)) is not None and isinstance(b, Tensor):
            node, K, ids = hit
            return feedback_bank_call(b, K, node, BankCall("gather", "left", lambda t: func(a, t), ids=ids))
        if (hit := _gather_of_bank(b, routes)) is not None and isinstance(a, Tensor):
            node, K, ids = hit
            return feedback_bank_call(a, K, node, BankCall("gather", "right", lambda t: func(t, b), ids=ids))
        return NOT_ROUTED
    # grouped_mm(x, K or K.transpose(-2, -1), offs=...)
    names = ("input", "weight", "offs") if _is_transformers_fallback(func) else ("mat_a", "mat_b", "offs")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, w, offs = (bound.get(k) for k in names)
    if set(bound) - {*names, "bias", "out_dtype"} or bound.get("bias") is not None or offs is None:
        return NOT_ROUTED
    if bound.get("out_dtype") not in (None, getattr(x, "dtype", None)) or not isinstance(x, Tensor) or x.dim() != 2:
        return NOT_ROUTED
    hit = _bank_or_transpose(w, routes)
    if hit is None:
        return NOT_ROUTED
    node, K, op_t = hit
    rest = {k: v for k, v in bound.items() if k not in names[:2]}

    def native(t: Tensor) -> Tensor:
        return func(t, w, **rest)

    return feedback_bank_call(x, K, node, BankCall("grouped", "right", native, offs=offs, op_t=op_t))


__all__ = ["FUNCTIONS", "NOT_ROUTED", "is_bank_function", "route"]
