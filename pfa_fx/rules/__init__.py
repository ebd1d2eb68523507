"""The learning rules: each a short file defining one :class:`FeedbackNode` subclass."""

from __future__ import annotations

from ..errors import ConversionError, did_you_mean
from ..node import FeedbackNode, seeded_generator, xavier_std
from .align import mirror
from .bp import BPNode
from .dfa import DFANode
from .fa import FANode
from .kp import KPNode
from .pal import PALNode
from .pfa import PFANode, PFAONode
from .sf import SFNode
from .wm import WMNode, step_feedback

#: rule name -> node class, in the order of the paper's Table 1
RULES: dict[str, type[FeedbackNode]] = {
    cls.rule: cls for cls in (BPNode, FANode, DFANode, SFNode, KPNode, WMNode, PALNode, PFANode, PFAONode)
}


def canonical_rule(name: object) -> str:
    """The registered spelling of a rule name: case and surrounding blanks do not matter
    (``"PFA"`` is ``"pfa"``); anything else raises :class:`~pfa_fx.ConversionError` listing
    the valid names, with the closest one."""
    if isinstance(name, str) and name.strip().lower() in RULES:
        return name.strip().lower()
    raise ConversionError(f"unknown rule {name!r}; valid rules: {', '.join(RULES)}{did_you_mean(name, RULES)}")


def rule_class(name: str) -> type[FeedbackNode]:
    """The node class of a rule name (any case), or a :class:`~pfa_fx.ConversionError`
    (a ``ValueError``) listing the valid names."""
    return RULES[canonical_rule(name)]


__all__ = [
    "RULES",
    "FeedbackNode",
    "canonical_rule",
    "mirror",
    "rule_class",
    "seeded_generator",
    "step_feedback",
    "xavier_std",
]
