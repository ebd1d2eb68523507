"""The learning rules and their registry.

A rule is a :class:`~pfa_fx.RuleConfig` (its options, a frozen dataclass) and a
:class:`~pfa_fx.FeedbackNode` subclass (its state and backward), each built-in rule in a
short file of this package. :func:`register_rule` adds a rule from outside the package: it
then converts, trains, saves and loads like the built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import RuleConfig
from ..errors import ConversionError, did_you_mean
from ..node import FeedbackNode, seeded_generator, xavier_std
from .align import mirror
from .bp import BP, BPNode
from .dfa import DFA, DFANode
from .fa import FA, FANode
from .kp import KP, KPNode
from .pal import PAL, PALNode
from .pfa import PFA, PFAO, PFANode, PFAONode
from .sf import SF, SFNode
from .wm import WM, WMNode, step_feedback

#: rule name -> node class, in the order of the paper's Table 1, then registered rules
RULES: dict[str, type[FeedbackNode]] = {
    cls.rule: cls for cls in (BPNode, FANode, DFANode, SFNode, KPNode, WMNode, PALNode, PFANode, PFAONode)
}
_BUILT_IN = frozenset(RULES)

#: named configurations beyond each rule's defaults (the variants benchmarks and papers use)
PRESETS: dict[str, RuleConfig] = {
    "kp-implicit": KP(implicit=True),
    "pfa-compact": PFA(compact=True),
    "pfa-compact-implicit": PFA(compact=True, implicit=True),
}


def register_rule(
    name: str, config_type: type[RuleConfig], node_type: type[FeedbackNode], *, replace: bool = False
) -> None:
    """Make a rule of your own available to :func:`pfa_fx.convert` under ``name``.

    Args:
        name: the rule's name (lower case; what rule strings, mappings, reports and
            checkpoints call it).
        config_type: its options, a frozen dataclass subclassing :class:`~pfa_fx.RuleConfig`
            whose defaults are valid (``config_type()`` must construct).
        node_type: its :class:`~pfa_fx.FeedbackNode` subclass, built with
            ``(weight, groups=, generator=, transposed=, config=)``; it defines at least
            ``feedback_from(weight, state)`` and, for learned feedback, ``state()``.
        replace: allow replacing a rule registered earlier under ``name`` (never a built-in).

    Both classes get ``rule = name``, and ``node_type.config_type = config_type``.

    Raises:
        ConversionError: a name taken (built-in, or registered without ``replace``), a
            name that is not a lower-case string, or classes of the wrong kind.
    """
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise ConversionError(f"a rule name is a non-empty lower-case string, got {name!r}")
    if not (isinstance(config_type, type) and issubclass(config_type, RuleConfig)):
        raise ConversionError(f"config_type must be a subclass of pfa_fx.RuleConfig, got {config_type!r}")
    if not (isinstance(node_type, type) and issubclass(node_type, FeedbackNode)):
        raise ConversionError(f"node_type must be a subclass of pfa_fx.FeedbackNode, got {node_type!r}")
    if name in _BUILT_IN or (name in RULES and not replace):
        which = "a built-in rule" if name in _BUILT_IN else "registered already (pass replace=True)"
        raise ConversionError(f"rule name {name!r} is {which}; registered rules: {', '.join(RULES)}")
    config_type.rule = name
    try:
        config_type()
    except (ConversionError, TypeError) as err:
        raise ConversionError(
            f"rule {name!r}: {config_type.__name__}() must construct with its defaults: {err}"
        ) from err
    node_type.rule = name
    node_type.config_type = config_type
    node_type.take_config()
    RULES[name] = node_type


def canonical_rule(name: object) -> str:
    """The registered spelling of a rule name: case and surrounding blanks do not matter
    (``"PFA"`` is ``"pfa"``); anything else raises :class:`~pfa_fx.ConversionError` listing
    the valid names, with the closest one."""
    if isinstance(name, str) and name.strip().lower() in RULES:
        return name.strip().lower()
    hint = ""
    if isinstance(name, str) and name.strip().lower() in PRESETS:
        hint = f"; {name!r} is a preset: pass pfa_fx.PRESETS[{name.strip().lower()!r}]"
    raise ConversionError(f"unknown rule {name!r}; valid rules: {', '.join(RULES)}{hint or did_you_mean(name, RULES)}")


def rule_class(name: str) -> type[FeedbackNode]:
    """The node class of a rule name (any case), or a :class:`~pfa_fx.ConversionError`
    (a ``ValueError``) listing the valid names."""
    return RULES[canonical_rule(name)]


def node_class_of(config: RuleConfig) -> type[FeedbackNode]:
    """The node class registered for ``config``'s type."""
    node = RULES.get(type(config).rule)
    if node is None or node.config_type is not type(config):
        raise ConversionError(
            f"{type(config).__qualname__} is not a registered rule's config (pfa_fx.register_rule); "
            f"registered rules: {', '.join(RULES)}"
        )
    return node


def config_for(rule: str | RuleConfig, options: Mapping[str, Any] | None = None) -> RuleConfig:
    """The config of a rule name and options, or ``rule`` itself where it is one."""
    if isinstance(rule, RuleConfig):
        node_class_of(rule)
        return rule
    return rule_class(rule).config_type.from_options(options)


__all__ = [
    "BP",
    "DFA",
    "FA",
    "KP",
    "PAL",
    "PFA",
    "PFAO",
    "PRESETS",
    "RULES",
    "SF",
    "WM",
    "FeedbackNode",
    "canonical_rule",
    "config_for",
    "mirror",
    "node_class_of",
    "register_rule",
    "rule_class",
    "seeded_generator",
    "step_feedback",
    "xavier_std",
]
