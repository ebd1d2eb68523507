"""Expert banks applied per expert (mixture-of-experts layers), and matrices applied as the
left operand of a product (``W @ x``).

A bank is a 3-D parameter ``K`` of ``E`` experts, stored ``(E, out, in)`` (Mixtral, Qwen-MoE,
OLMoE, DeepSeek-V3, Granite-MoE: ``F.linear(x, K[e])``) or ``(E, in, out)`` (gpt-oss:
``x @ K[e]``). Its node holds the bank as ``E`` groups of one weight of shape
``(E·out, in)`` (or, transposed, ``(E·in, out)``: the layout of a transposed convolution's
weight), so every rule lays its state out per expert exactly as it does per convolution
group: FA's ``B[e]``, SF's ``sign(W[e])·M[e]``, KP's ``B[e]``, PFA's ``B[e]·R[e]`` (compact
``G[e]·S[e]``), WM's and PAL's ``B[e]``; dim 0 of every state tensor runs over the experts,
which is what FSDP2 shards.

A bank is applied in one of three ways (transformers' ``experts_implementation``), each of
which is one :class:`BankCall`:

- ``"slice"``: ``F.linear(x, K[e])``, ``x @ K[e]`` (or ``K[e] @ x``) for the tokens routed to
  ``e`` (the eager loop);
- ``"gather"``: ``torch.bmm(K[ids], x)`` or ``torch.bmm(x, K[ids])`` with one expert per row
  (``batched_mm``);
- ``"grouped"``: ``grouped_mm(x, K or Kᵀ, offs)`` on rows sorted by expert (``grouped_mm``,
  ``torch._grouped_mm`` or transformers' ``grouped_mm_fallback`` custom op).

A plain 2-D weight applied as the left operand, ``W @ x`` (a state-space model's
projection), is a ``"slice"`` call of the whole weight. The op's forward is the model's own
native call with its own tensors (bit for bit); its backward sends the error down through
``W_b[e]`` for the rows routed to ``e``, returns BP's gradient of the bank, and hands it to
the rule for its state's gradient. ``W_b`` of a bank is built once per backward and shared
by the calls of that backward (the eager loop makes one call per expert). DFA projects the
output error of the token each row belongs to (the per-token form), the rows' tokens being
read from the autograd graph of the call's input (the gather that picked them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .node import FeedbackNode
from .ops import _grad_on, _state_wants_grad, note_weight

_BMM = torch.bmm
_KINDS = ("linear", "right", "left")


class BankCall:
    """One native call of a bank (or of a matrix, ``expert=None``): how its operand comes from
    the weight ``K`` and how the product uses it.

    ``mode``: ``"slice"`` (operand ``K[e]``, or ``K`` itself), ``"gather"`` (``K[ids]``) or
    ``"grouped"`` (``K`` with offsets). ``kind``: ``"linear"`` (``x @ opᵀ``), ``"right"``
    (``x @ op``) or ``"left"`` (``op @ x``). ``op_t``: the operand is the transpose of the
    weight's slice (``K[e].T``, ``K.transpose(-2, -1)``). ``native``: the model's own call,
    ``native(x)``, dropped once the forward ran."""

    def __init__(self, mode, kind, native, *, expert=None, ids=None, offs=None, op_t=False, model_rows=None):
        self.mode, self.kind, self.native = mode, kind, native
        self.expert, self.ids, self.offs, self.op_t = expert, ids, offs, op_t
        self.rows: Tensor | None = model_rows  # DFA: the token of each row of x
        self.shape: tuple[int, ...] = ()  # the weight's (set by feedback_bank_call)

    # -- as an op family (PAL's noisy pass learns through it) ------------------------------
    @staticmethod
    def positions(e: Tensor) -> int:
        return e.shape[0]

    @staticmethod
    def population_call_macs(device: torch.device) -> int:
        return 0

    def fused(self, e: Tensor, x: Tensor, kernel: Tensor, need_x: bool, need_w: bool, need_b: bool):
        """The family's backward call with ``kernel`` in the node's layout (PAL's ``KGrad``)."""
        K = kernel.reshape(self.shape) if kernel.dim() == 2 and len(self.shape) == 3 else kernel
        gx, gK = self.grads(e, x, K, K, need_x, need_w)
        return gx, None if gK is None else gK.reshape(kernel.shape), None

    def operand(self, K: Tensor) -> Tensor:
        """The operand the call applies, taken from a tensor of ``K``'s shape."""
        if self.mode == "gather":
            return K[self.ids]
        op = K if self.expert is None else K[self.expert]
        return op.transpose(-2, -1) if self.op_t else op

    def grads(self, g: Tensor, x: Tensor, K: Tensor, kernel: Tensor, need_x: bool, need_w: bool):
        """``(grad_x, grad_K)``: the input's through ``kernel`` (``K``-shaped), ``K``'s BP's."""
        gx = gK = None
        if self.mode == "grouped":
            return self._grouped_grads(g, x, K, kernel, need_x, need_w)
        if need_x:
            op = self.operand(kernel)
            gx = g.matmul(op) if self.kind == "linear" else g.matmul(op.mT) if self.kind == "right" else op.mT.matmul(g)
        if need_w:
            if self.mode == "gather":  # bmm: each row's operand gradient, summed into its expert's
                gsel = _BMM(g, x.mT) if self.kind == "left" else _BMM(x.mT, g)
                gK = torch.zeros_like(K).index_put_((self.ids,), gsel, accumulate=True)
            else:
                gop = _linear_weight_grad(g, x, self.kind)
                gop = gop.t() if self.op_t else gop
                if self.expert is None:
                    gK = gop
                else:
                    gK = torch.zeros_like(K)
                    gK[self.expert] = gop
        return gx, gK

    def _grouped_grads(self, g, x, K, kernel, need_x, need_w):
        op_b = self.operand(kernel)  # (E, in, out)
        gx = torch.zeros_like(x) if need_x else None
        gop = K.new_zeros(self.operand(K).shape) if need_w else None
        start = 0
        for i, end in enumerate(self.offs.tolist()):  # one sync, as transformers' own fallback
            if end > start:
                if need_x:
                    torch.mm(g[start:end], op_b[i].T, out=gx[start:end])
                if need_w:
                    torch.mm(x[start:end].T, g[start:end], out=gop[i])
            start = end
        gK = None if gop is None else gop.transpose(-2, -1) if self.op_t else gop
        return gx, gK


def _linear_weight_grad(g: Tensor, x: Tensor, kind: str) -> Tensor:
    """BP's gradient of the 2-D operand of ``F.linear(x, op)`` / ``x @ op`` / ``op @ x``."""
    if kind == "left":  # (..., out, n) and (..., in, n): sum over batch and columns
        g2, x2 = g.mT.reshape(-1, g.shape[-2]), x.mT.reshape(-1, x.shape[-2])
        return g2.t().mm(x2)
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    return g2.t().mm(x2) if kind == "linear" else x2.t().mm(g2)


# -------------------------------------------------------------------- the node's view
def node_view(node: FeedbackNode, K: Tensor) -> Tensor:
    """``K`` (the parameter's layout) as the node's weight: a bank flattened over its first two
    axes, a matrix stored ``(in, out)`` transposed."""
    if K.dim() == 3:
        return K.reshape(node.weight_shape)
    return K.t() if node.param_transposed else K


def from_node_view(node: FeedbackNode, T: Tensor, K: Tensor) -> Tensor:
    return T.t() if K.dim() == 2 and node.param_transposed else T.reshape(K.shape)


def bank_feedback(node: FeedbackNode, K: Tensor, state: tuple[Tensor, ...]) -> Tensor:
    """``W_b`` in ``K``'s layout, built once for the calls of one backward: kept on the node
    while calls of this step are pending, keyed by the backward (autograd's graph task) and the
    tensors (and versions) it comes from."""
    task = torch._C._current_graph_task_id()  # this backward: nothing is reused across backwards
    key = (task, K.data_ptr(), K._version, K.dtype, tuple((s.data_ptr(), s._version) for s in state))
    cached = node.__dict__.get("_pfa_bank_feedback")
    if cached is not None and cached[0] == key:
        return cached[1]
    fb = from_node_view(node, node.feedback_from(node_view(node, K), state), K)
    node.__dict__["_pfa_bank_feedback"] = (key, fb)
    return fb


def _pending(node: FeedbackNode, delta: int) -> None:
    n = node.__dict__.get("_pfa_bank_pending", 0) + delta
    node.__dict__["_pfa_bank_pending"] = max(n, 0)
    if n <= 0:  # the step's last call ran its backward: W_b is not held until the next one
        node.__dict__.pop("_pfa_bank_feedback", None)


class _FeedbackBankCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, K, node, call, *state):
        out = call.native(x)
        call.native = None  # the model's tensors are not kept beyond the forward
        ctx.save_for_backward(x, K, *state)
        ctx.node, ctx.call = node, call
        ctx.pfa_rows = call.rows  # read by later calls on this call's output (DFA)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, K, *state = ctx.saved_tensors
        node, call = ctx.node, ctx.call
        nx, nk, _, _, *ns = ctx.needs_input_grad
        need_state = any(ns) and not node.as_backprop
        dt = g.dtype  # under autocast the native call ran in a lower precision: so does its backward
        xs = x.to(dt)
        try:
            Kd = K.to(dt)
            if node.as_backprop:
                kernel = Kd
            elif not node.has_feedback_weight:  # DFA: the output error, projected per token
                kernel = None
            else:
                kernel = bank_feedback(node, K, tuple(state)).to(dt)
            gx, gK = call.grads(
                g, xs, Kd, Kd if kernel is None else kernel, nx and kernel is not None, nk or need_state
            )
            if kernel is None and nx:
                gx = dfa_rows_error(node, call, x) if K.dim() == 3 else node.input_error(x, call.kind != "left")
        finally:
            _pending(node, -1)
        gs: tuple = (None,) * len(state)
        if need_state and gK is not None:
            grads = node.state_grads(node_view(node, gK.to(K.dtype)), tuple(state))
            gs = tuple(s if s is None else s.reshape(t.shape) for s, t in zip(grads, state))
        gx = None if gx is None else gx.to(x.dtype)
        gK = None if gK is None or not nk else gK.to(K.dtype)
        return gx, gK, None, None, *gs


def feedback_bank_call(x: Tensor, K: Tensor, node: FeedbackNode, call: BankCall) -> Tensor:
    """``call.native(x)`` whose backward sends the error through the node's feedback for
    ``K`` (a bank or a matrix): the op every route of an expert bank, and of a matrix applied
    as the left operand, ends in."""
    call.shape = tuple(K.shape)
    if not (_grad_on() and (x.requires_grad or K.requires_grad or _state_wants_grad(None, node))):
        if node.noisy:  # PAL's noisy pass (a matrix stored (in, out) is not a bank: W's layout as is)
            W = node_view(node, K.detach()) if K.dim() == 3 else K.detach()
            return node.noisy_forward(call, lambda t, b: call.native(t), x, W)
        return call.native(x)
    if node.records_input:
        node.record_input(x)
    if hasattr(K, "device_mesh"):
        note_weight(node, K)  # a graph front end's op given a sharded weight: refused, naming capture="modules"
    if not node.has_feedback_weight and call.rows is None:
        call.rows = token_rows(x)
    _pending(node, 1)
    return _FeedbackBankCall.apply(x, K, node, call, *node.state())


# ------------------------------------------------------------------- DFA: rows' tokens
def token_rows(x: Tensor, max_nodes: int = 32) -> Tensor | None:
    """The token each row of ``x`` belongs to, read from its autograd graph: the index of the
    gather that picked its rows from the ``(tokens, hidden)`` states (``h[idx]``,
    ``index_select``, ``repeat_interleave``), or the rows of an earlier bank call whose output
    it is computed from row by row. None where none is found."""
    rows = x.shape[0] if x.dim() >= 2 else None
    frontier, seen = [x.grad_fn], 0
    while frontier and seen < max_nodes:
        fn = frontier.pop(0)
        seen += 1
        if fn is None:
            continue
        found = getattr(fn, "pfa_rows", None)
        if found is None:
            found = _gathered_rows(fn)
        if found is not None and found.numel() == rows:
            return found
        frontier += [nxt for nxt, _ in fn.next_functions if nxt is not None]
    return None


def _gathered_rows(fn) -> Tensor | None:
    name = fn.name()
    if name == "IndexBackward0":
        idx = fn._saved_indices
        if len(idx) == 1 and idx[0] is not None and idx[0].dim() == 1 and not idx[0].is_floating_point():
            return idx[0]
    elif name == "IndexSelectBackward0" and fn._saved_dim == 0:
        return fn._saved_index
    elif name == "ViewBackward0":  # h.repeat_interleave(k, 0): view(expand(unsqueeze(h, 1)))
        nxt = fn.next_functions[0][0]
        if nxt is not None and nxt.name() == "ExpandBackward0":
            sizes = fn._saved_self_sym_sizes
            if len(sizes) == 3:
                n, k = int(sizes[0]), int(sizes[1])
                return torch.arange(n).repeat_interleave(k)
    return None


def dfa_rows_error(node, call: BankCall, x: Tensor) -> Tensor:
    """DFA's input error of a bank call: each row gets its token's output error projected
    (``e[token] @ P``, the per-token form), in ``x``'s shape."""
    err = None if node._output is None else node._output.error
    if err is None or err.dim() < 2:
        return node.input_error(x, feature_last=False)  # raises the rule's own message
    n_tok = err.numel() // err.shape[-1]
    e = err.reshape(n_tok, err.shape[-1]).to(x.dtype)
    rows = call.rows
    if rows is None and x.shape[0] == n_tok:
        rows = torch.arange(n_tok)
    if rows is None or int(rows.max()) >= n_tok:
        raise RuntimeError(
            f"dfa: op '{node.op_name}' (an expert bank) cannot tell which token each of its {x.shape[0]} rows "
            f"belongs to for the output error's {n_tok} positions; map it to another rule with a rule mapping"
        )
    node.last_form = "token"
    per_row = x.numel() // x.shape[0]
    return node.project(e[rows.to(e.device)], per_row).reshape(x.shape)


__all__ = ["BankCall", "bank_feedback", "feedback_bank_call", "node_view", "token_rows"]
