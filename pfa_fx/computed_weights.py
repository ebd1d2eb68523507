"""Weights the model computes (timm's ``StdConv2d`` standardizes its kernel in forward):
the computation lifted out of the graph, so a node can report the weight the next forward
will use before any forward runs, after a checkpoint load and after an optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .registry import attr


def weight_function(gm: nn.Module, w_node: Any, shape: tuple[int, ...]) -> fx.GraphModule | None:
    """A computed weight (e.g. StdConv2d's standardized kernel) as a function of the model's
    tensors alone: the graph's nodes upstream of ``w_node``, copied into a small
    GraphModule that reads the same parameter objects. ``node.weight`` evaluates it, so
    :func:`pfa_fx.alignment` sees the weight the next forward will use, also before any
    forward (after loading a checkpoint) and after an optimizer step. None for a plain
    parameter, and where the weight depends on the input or on a module call."""
    if not isinstance(w_node, fx.Node) or w_node.op == "get_attr":
        return None
    upstream, stack = set(), [w_node]
    while stack:
        n = stack.pop()
        if n in upstream:
            continue
        if n.op not in ("get_attr", "call_function", "call_method"):
            return None  # the input, or a module with state of its own
        if n.op == "get_attr" and not isinstance(attr(gm, n.target), nn.Parameter):
            return None  # a buffer: .to() replaces it, so a copy of its reference would go stale
        upstream.add(n)
        stack += n.all_input_nodes
    graph, env = fx.Graph(), {}
    holder = nn.Module()
    for n in w_node.graph.nodes:  # graph order is a topological order
        if n in upstream:
            env[n] = graph.node_copy(n, env.__getitem__)
            if n.op == "get_attr":
                fx.graph_module._copy_attr(gm, holder, n.target)
    graph.output(env[w_node])
    fn = fx.GraphModule(holder, graph, "ComputedWeight")
    try:
        with torch.no_grad():
            out = fn()
    except Exception:  # any failure: the op's last forward weight serves instead
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape):
        return None
    return fn


__all__ = ["weight_function"]
