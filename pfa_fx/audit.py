"""Audit an autograd graph: which weights still get their error through a standard
(transposed) matmul or convolution, i.e. are still trained by backprop."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import is_feedback_path

# autograd nodes of the standard weight ops (their backward uses the weight's transpose)
STANDARD_WEIGHT_OPS = {
    "ConvolutionBackward0",
    "ConvolutionBackward1",
    "MkldnnConvolutionBackward0",
    "CudnnConvolutionBackward0",
    "SlowConv2DBackward0",
    "ThnnConv2DBackward0",
    "ConvDepthwise2DBackward0",
    "AddmmBackward0",
    "MmBackward0",
    "BmmBackward0",
    "BaddbmmBackward0",
    "AddbmmBackward0",
    "MvBackward0",
    "MatmulBackward0",
    "LinearBackward0",
    "EinsumBackward0",
    "DotBackward0",
    "AddmvBackward0",
}
# nodes that only reshape, cast or re-lay a tensor: a weight seen through them is still the weight
_PASS_THROUGH = (
    "TBackward",
    "TransposeBackward",
    "PermuteBackward",
    "ViewBackward",
    "UnsafeViewBackward",
    "ReshapeAliasBackward",
    "ExpandBackward",
    "ToCopyBackward",
    "CloneBackward",
    "SliceBackward",
    "SplitBackward",
    "SplitWithSizesBackward",
    "UnbindBackward",
    "SelectBackward",
    "AliasBackward",
    "UnsqueezeBackward",
    "SqueezeBackward",
    "ContiguousBackward",
    "IndexBackward",  # an expert bank's rows gathered per token (batched_mm)
    "IndexSelectBackward",
)


def weights_on_backprop(output: Tensor, model: nn.Module, min_dim: int = 2) -> list[str]:
    """Names of ``model``'s parameters (at least ``min_dim``-D, feedback state excluded)
    whose gradient comes from a standard matmul/convolution backward in the autograd
    graph of ``output``. Empty for a fully converted model."""
    by_id = {id(p): name for name, p in model.named_parameters() if p.dim() >= min_dim and not is_feedback_path(name)}
    found: set[str] = set()
    seen: set[int] = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        name = type(fn).__name__
        # grouped products (MoE experts: torch._grouped_mm, transformers' grouped_mm ops) by name
        if name in STANDARD_WEIGHT_OPS or "grouped_mm" in name.lower() or "groupedmm" in name.lower():
            names = [_weight_behind(nxt, by_id) for nxt, _ in fn.next_functions]
            # the weight transports error only if some other input receives a gradient
            # (a one-hot @ table lookup sends none through the table)
            others = [nxt for (nxt, _), n in zip(fn.next_functions, names) if nxt is not None and n is None]
            if others:
                found.update(n for n in names if n is not None)
        stack += [nxt for nxt, _ in fn.next_functions if nxt is not None]
    return sorted(found)


def _weight_behind(fn, by_id: dict[int, str], depth: int = 8) -> str | None:
    for _ in range(depth):
        if fn is None:
            return None
        var = getattr(fn, "variable", None)
        if var is not None:
            return by_id.get(id(var))
        if not type(fn).__name__.startswith(_PASS_THROUGH):
            return None
        nexts = [n for n, _ in fn.next_functions if n is not None]
        if len(nexts) != 1:
            return None
        fn = nexts[0]
    return None
