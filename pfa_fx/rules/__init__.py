"""The learning rules: each a short file defining one :class:`FeedbackNode` subclass."""

from __future__ import annotations

from .base import FeedbackNode, seeded_generator, xavier_std
from .bp import BPNode
from .dfa import DFANode
from .fa import FANode
from .kp import KPNode
from .pal import PALNode
from .pfa import PFANode, PFAONode
from .sf import SFNode
from .wm import WMNode, mirror, step_feedback

#: rule name -> node class, in the order of the paper's Table 1
RULES: dict[str, type[FeedbackNode]] = {
    cls.rule: cls for cls in (BPNode, FANode, DFANode, SFNode, KPNode, WMNode, PALNode, PFANode, PFAONode)
}


def rule_class(name: str) -> type[FeedbackNode]:
    """The node class of a rule name, or a ValueError listing the valid names."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown rule {name!r}; valid rules: {', '.join(RULES)}") from None


__all__ = ["RULES", "FeedbackNode", "mirror", "rule_class", "seeded_generator", "step_feedback", "xavier_std"]
