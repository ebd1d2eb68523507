"""What a conversion did, op by op: which rule with which options, reached how, what its
feedback state costs, and what was left alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .checkpoint import format_option
from .draws import xavier_std
from .node import FeedbackNode
from .record import record_of
from .registry import feedback_modules, is_feedback_path

_KIND = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}


def _kind(node) -> str:
    kind = _KIND.get(len(node.weight_shape), f"{len(node.weight_shape)}-d")
    if getattr(node, "expert_bank", False):
        return f"{kind} expert bank"
    if getattr(node, "grouped_experts", None):
        return f"linear bank of {node.grouped_experts} experts"
    return kind.replace("conv", "conv_transpose") if getattr(node, "transposed", False) else kind


@dataclass
class OpEntry:
    """One converted weight op."""

    name: str
    kind: str
    rule: str
    path: str  # "graph", "opaque module", "opaque function" or "eager"
    owner: str
    options: dict[str, Any] = field(default_factory=dict)  # the node's actual options (node.config)
    state_numel: int = 0  # numbers of feedback state this op holds
    weight_numel: int = 0


@dataclass
class LeftAlone:
    """A parameter of at least two dimensions that no feedback is built for, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class ConversionReport:
    ops: list[OpEntry] = field(default_factory=list)
    kept_native: list[str] = field(default_factory=list)
    not_converted: dict[str, str] = field(default_factory=dict)
    left_alone: list[LeftAlone] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what rules do at the model level
    costs: list[str] = field(default_factory=list)  # what the chosen options (defaults included) cost
    state_bytes: int = 0  # memory of the feedback state (its tensors' own dtypes)

    @property
    def state_numel(self) -> int:
        """Numbers of feedback state in all converted ops."""
        return sum(op.state_numel for op in self.ops)

    @property
    def weight_numel(self) -> int:
        """Numbers in the weights of the converted ops."""
        return sum(op.weight_numel for op in self.ops)

    def __str__(self) -> str:
        lines = [f"{len(self.ops)} weight ops converted"]
        by_path: dict[str, int] = {}
        for op in self.ops:
            by_path[op.path] = by_path.get(op.path, 0) + 1
        lines[0] += " (" + ", ".join(f"{n} via {p}" for p, n in sorted(by_path.items())) + ")" if by_path else ""
        width = max((len(op.name) for op in self.ops), default=4)
        for op in self.ops:
            opts = " ".join(f"{k}={format_option(v)}" for k, v in op.options.items())
            lines.append(
                f"  {op.name:<{width}}  {op.kind:<7} {op.rule:<6} {op.path}  [{op.owner}]  "
                f"{opts + '  ' if opts else ''}state {_count(op.state_numel)}"
            )
        if self.ops:
            ratio = f" = {self.state_numel / self.weight_numel:.2f}x" if self.weight_numel else ""
            lines.append(
                f"feedback state: {_count(self.state_numel)} numbers ({self.state_bytes / 2**20:.1f} MiB){ratio} "
                f"the {_count(self.weight_numel)} weights of the converted ops"
            )
        lines += self.costs
        lines += self.notes
        if self.kept_native:
            lines.append("kept on BP by the rule mapping: " + ", ".join(self.kept_native))
        for name, why in self.not_converted.items():
            lines.append(f"NOT converted: {name}: {why}")
        for path, why in self.fallbacks.items():
            lines.append(f"fallback: '{path or '<root>'}' runs eagerly ({why})")
        if self.left_alone:
            lines.append("parameters (>= 2-D) that are not weight-op weights:")
            lines += [f"  {p.name} {tuple(p.shape)}: {p.reason}" for p in self.left_alone]
        return "\n".join(lines)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _state_bytes(node: FeedbackNode) -> int:
    tensors = [*node._parameters.values(), *node._buffers.values()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _costs(nodes: list[tuple[str, FeedbackNode]]) -> list[str]:
    """What the chosen options cost, and the cheaper setting where one exists."""
    lines = []
    explicit = [n for _, n in nodes if n.rule in ("pfa", "pfa-o") and not n.compact]
    if explicit:
        held = sum(n.state_numel() for n in explicit)
        weights = sum(math.prod(n.weight_shape) for n in explicit)
        # compact keeps S (W-shaped) and G = B B^T (n_out^2 / groups) whatever the expansion
        compact = sum(math.prod(n.weight_shape) + n.n_out**2 // n.groups for n in explicit)
        b_held = "B (expansion x n_out^2)" if any(n.store_feedback for n in explicit) else "no B (redrawn)"
        lines.append(
            f"cost: {len(explicit)} pfa op(s) with compact=False (the default) hold R (expansion x |W|) and "
            f"{b_held}: {_count(held)} numbers for {_count(weights)} weights; compact=True would "
            f"hold {_count(compact)} (S and G = B B^T) and train the same under torch.optim.SGD (not under "
            "Adam/AdamW/RMSprop)"
        )
    if any(n.rule in ("pfa", "pfa-o") and n.compact for _, n in nodes):
        lines.append(
            "note: compact=True equals explicit PFA under SGD; clip gradients with "
            "pfa_fx.clip_grad_norm_(model, max_norm), not torch.nn.utils.clip_grad_norm_(model.parameters(), ...), "
            "whose norm counts S's gradient"
        )
    redrawn = [name for name, n in nodes if n.fixed_draws and not n.store_feedback]
    if redrawn:
        lines.append(
            f"note: {len(redrawn)} op(s) hold no fixed random feedback (store_feedback=False): each backward "
            "redraws it from the seed (CPU draws, the same values as stored), and the ops run between "
            "torch.compile graphs"
        )
    off = []
    for name, node in nodes:
        if getattr(node, "scale", None) != "xavier" or not node.has_feedback_weight or node.rule in ("bp", "dfa"):
            continue
        w = node.weight.double()
        rms, target = float(w.square().mean().sqrt()), xavier_std(node.weight_shape)
        if rms > 0 and not 0.5 <= rms / target <= 2:
            off.append(name)
    if off:
        lines.append(
            f"note: scale='xavier' draws feedback at Xavier scale, but the weights of {len(off)} "
            f"op(s) ({', '.join(map(repr, off[:3]))}{', …' if len(off) > 3 else ''}) are more than 2x from it "
            "(pretrained or small-init weights?): scale='weight' draws at each W's own RMS"
        )
    return lines


def _why_left_alone(name: str, owner: nn.Module | None) -> str:
    leaf = name.rsplit(".", 1)[-1].lower()
    if isinstance(owner, nn.Embedding | nn.EmbeddingBag):
        return "embedding table: a lookup, not a linear map of an error-carrying input"
    if "relative_position" in name or "rel_pos" in leaf or "bias_table" in leaf:
        return "relative-position bias table: added to attention logits"
    if "pos" in leaf:
        return "positional embedding: added to activations"
    if "token" in leaf:
        return "learned token: concatenated to the sequence"
    if "gain" in leaf or "scale" in leaf or "gamma" in leaf:
        return "scale of a computed weight or activation: elementwise, no transpose to replace"
    return "not consumed by a linear or convolution op"


def report(model: nn.Module) -> ConversionReport:
    """Describe a converted model: every converted op with its rule, its options and the
    feedback state it holds, and how the pass reached it; the total feedback state
    against the converted weights, with what the chosen (or default) options cost and the
    cheaper setting where there is one; ops kept on BP, ops that could not be converted,
    fallbacks, and every parameter of at least 2 dimensions left alone with the reason.

    >>> print(pfa_fx.report(pfa_fx.convert(model, "pfa")))  # doctest: +SKIP
    """
    rec = record_of(model)
    rep = ConversionReport(
        kept_native=list(rec.kept_native), not_converted=dict(rec.skipped), fallbacks=dict(rec.fallbacks)
    )
    weights = set()
    by_class: dict[type, list] = {}
    nodes = list(feedback_modules(model))
    for name, node in nodes:
        by_class.setdefault(type(node), []).append((name, node))
        rep.ops.append(
            OpEntry(
                name,
                _kind(node),
                node.rule,
                getattr(node, "conversion_path", "graph"),
                getattr(node, "op_owner", ""),
                dict(node.config),
                node.state_numel(),
                math.prod(node.weight_shape),
            )
        )
        rep.state_bytes += _state_bytes(node)
        weights.add(id(node._weight_ref[0]))
    rep.costs = _costs(nodes)
    for cls, nodes_of_class in by_class.items():
        rep.notes += cls.report_notes(model, nodes_of_class)
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in weights or is_feedback_path(name):
            continue
        key = name[: -len(".weight")] if name.endswith(".weight") else name
        if key in rep.kept_native or key in rep.not_converted:  # listed with its reason already
            continue
        owner = modules.get(name.rpartition(".")[0])
        rep.left_alone.append(LeftAlone(name, tuple(p.shape), _why_left_alone(name, owner)))
    return rep
