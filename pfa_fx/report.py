"""What a conversion did, op by op: which rule, reached how, and what was left alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .convert import NAMESPACE, feedback_modules

_KIND = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}


def _kind(node) -> str:
    kind = _KIND.get(len(node.weight_shape), f"{len(node.weight_shape)}-d")
    if getattr(node, "expert_bank", False):
        return f"{kind} expert bank"
    return kind.replace("conv", "conv_transpose") if getattr(node, "transposed", False) else kind


@dataclass
class OpEntry:
    """One converted weight op."""

    name: str
    kind: str
    rule: str
    path: str  # "graph", "opaque module", "opaque function" or "eager"
    owner: str


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

    def __str__(self) -> str:
        lines = [f"{len(self.ops)} weight ops converted"]
        by_path: dict[str, int] = {}
        for op in self.ops:
            by_path[op.path] = by_path.get(op.path, 0) + 1
        lines[0] += " (" + ", ".join(f"{n} via {p}" for p, n in sorted(by_path.items())) + ")" if by_path else ""
        width = max((len(op.name) for op in self.ops), default=4)
        lines += [f"  {op.name:<{width}}  {op.kind:<7} {op.rule:<6} {op.path}  [{op.owner}]" for op in self.ops]
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
    """Describe a converted model: every converted op with its rule and how the pass
    reached it, ops kept on BP, ops that could not be converted, fallbacks, and every
    parameter of at least 2 dimensions left alone with the reason.

    >>> print(pfa_fx.report(pfa_fx.convert(model, "pfa")))  # doctest: +SKIP
    """
    rep = ConversionReport(
        kept_native=list(getattr(model, "pfa_kept_native", [])),
        not_converted=dict(getattr(model, "pfa_skipped", {})),
        fallbacks=dict(getattr(model, "pfa_fallbacks", {})),
    )
    weights = set()
    by_class: dict[type, list] = {}
    for name, node in feedback_modules(model):
        by_class.setdefault(type(node), []).append((name, node))
        rep.ops.append(
            OpEntry(
                name,
                _kind(node),
                node.rule,
                getattr(node, "conversion_path", "graph"),
                getattr(node, "op_owner", ""),
            )
        )
        weights.add(id(node._weight_ref[0]))
    for cls, nodes in by_class.items():
        rep.notes += cls.report_notes(model, nodes)
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in weights or name.startswith(NAMESPACE + "."):
            continue
        key = name[: -len(".weight")] if name.endswith(".weight") else name
        if key in rep.kept_native or key in rep.not_converted:  # listed with its reason already
            continue
        owner = modules.get(name.rpartition(".")[0])
        rep.left_alone.append(LeftAlone(name, tuple(p.shape), _why_left_alone(name, owner)))
    return rep
