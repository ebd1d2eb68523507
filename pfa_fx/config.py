"""Typed rule configurations: one frozen dataclass per rule, the one source of its options.

``pfa_fx.PFA(expansion=10, compact=True)`` names a rule and its options together and is
checked when it is built: an unknown option, a value of the wrong type or an invalid
combination raises :class:`~pfa_fx.ConversionError` there, naming the valid values. A rule
name (``"pfa"``) or ``(name, options)`` is shorthand for the same object
(:meth:`RuleConfig.from_options`). Frozen, like FSDP2's ``MixedPrecisionPolicy``: a config
can be shared between conversions and used as a dictionary key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from .draws import SCALES
from .errors import ConversionError, ConversionTypeError, did_you_mean

C = TypeVar("C", bound="RuleConfig")


@dataclasses.dataclass(frozen=True)
class RuleConfig:
    """Base class of every rule's options (a frozen dataclass; subclasses declare fields).

    Class attributes a rule author may set:
        rule: the rule's registered name (set by :func:`pfa_fx.register_rule`).
        VERSION: bumped when the options' meaning changes; checkpoints record it, and
            :meth:`upgrade` maps an older checkpoint's options to this version's.
        compute_only: options that only choose how the same numbers are computed (held or
            redrawn feedback, PFA's ``route``): a checkpoint loads across them.
        learned_feedback: for rules whose feedback is learned, why (``store_feedback=False``
            is then refused with this reason); empty for rules with fixed feedback.

    Subclasses validate their values in :meth:`validate`, which runs at construction.
    """

    rule: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    compute_only: ClassVar[frozenset[str]] = frozenset({"store_feedback"})
    learned_feedback: ClassVar[str] = ""

    def __new__(cls: type[C], *args: Any, **kwargs: Any) -> C:
        # before the dataclass's __init__, whose TypeError would not name the valid options
        if args:
            raise ConversionTypeError(
                f"{cls.__name__} takes options by keyword only, e.g. {cls.__name__}({_example(cls)}); got {args!r}"
            )
        names = cls.option_names()
        for key in kwargs:
            if key not in names:
                raise ConversionError(_unknown(cls, key))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~pfa_fx.ConversionError` for a value or combination this rule refuses."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options this rule accepts, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{option: default}``."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def options(self) -> dict[str, Any]:
        """``{option: value}`` of this config."""
        return {name: getattr(self, name) for name in self.option_names()}

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated like a new config)."""
        return type(self)(**{**self.options(), **changes})

    @classmethod
    def from_options(cls: type[C], options: Mapping[str, Any] | None = None) -> C:
        """The config of ``options`` (a mapping, e.g. ``convert``'s keyword options): an unknown
        key raises :class:`~pfa_fx.ConversionError` listing the valid ones. A rule whose
        feedback is learned takes ``store_feedback=True`` (what it does anyway) and refuses
        ``False`` with the reason."""
        opts = dict(options or {})
        if "store_feedback" in opts and "store_feedback" not in cls.option_names() and cls.learned_feedback:
            check_store_feedback(opts.pop("store_feedback"), cls.rule, cls.learned_feedback)
        return cls(**opts)

    @classmethod
    def upgrade(cls, options: dict[str, Any], version: int) -> dict[str, Any]:
        """A checkpoint's recorded options, saved under config ``version``, in this
        version's terms. The default: unchanged."""
        return options

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _example(cls: type[RuleConfig]) -> str:
    names = cls.option_names()
    return f"{names[0]}=..." if names else ""


def _unknown(cls: type[RuleConfig], key: str) -> str:
    return unknown_option(key, f"rule {cls.rule or cls.__name__!r}", cls.option_names())


def unknown_option(key: str, which: str, valid: Sequence[str], keywords: Sequence[str] = ()) -> str:
    """The refusal of an unknown option ``key`` for ``which`` (``"rule 'pfa'"``), listing the
    ``valid`` ones with the closest; else pointing at ``keywords`` close to it (convert's own)."""
    hint = did_you_mean(key, valid)
    if not hint and keywords:
        close = did_you_mean(key, keywords)
        if close:
            hint = f"{close[:-1]} (a keyword of pfa_fx.convert itself, not a rule option)?"
    return f"unknown option {key!r} for {which}; valid options: {', '.join(valid) or 'none'}{hint}"


# -- checks the rules' configs share ----------------------------------------------------
def check_store_feedback(value: Any, rule: str, learned: str = "") -> bool:
    """``store_feedback`` as a bool, or :class:`~pfa_fx.ConversionError` (a ``ValueError``):
    a value that is not ``True``/``False``, or ``False`` for a rule whose feedback is
    learned (``learned``: why, e.g. KP's ``B`` is updated like ``W``), which must be stored."""
    if not isinstance(value, bool):
        raise ConversionTypeError(
            f"{rule}: store_feedback must be True (hold fixed random feedback in memory, the default) or False "
            f"(redraw it from the seed in every backward), got {value!r}"
        )
    if not value and learned:
        raise ConversionError(
            f"{rule}: store_feedback=False is refused: {learned}, so it is state that must be stored. Only "
            "fixed random feedback can be redrawn instead of stored (fa's B, sf's M with variant='frsf', dfa's "
            "projections, pfa/pfa-o's B). In a rule mapping, give store_feedback=False to the fixed-feedback "
            f"entries only, e.g. {{'fc': {rule!r}, '*': ('fa', {{'store_feedback': False}})}}"
        )
    return value


def check_scale(value: Any, rule: str, names: tuple[str, ...] = SCALES) -> None:
    """A scale is one of ``names`` or a positive number."""
    if isinstance(value, str):
        if value not in names:
            raise ConversionError(
                f"{rule}: unknown scale {value!r}; valid scales: {', '.join(names)} or a positive number"
                + did_you_mean(value, names)
            )
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(f"{rule}: scale must be one of {', '.join(names)} or a positive number, got {value!r}")


def check_choice(value: Any, choices: tuple[str, ...], what: str, rule: str, why: str = "") -> None:
    """``value`` is one of ``choices``; else an error listing them (``why``: what they mean)."""
    if value not in choices:
        raise ConversionError(
            f"{rule}: unknown {what} {value!r}; valid {what}s: {', '.join(choices)}{why}{did_you_mean(value, choices)}"
        )


def check_bool(value: Any, what: str, rule: str) -> None:
    if not isinstance(value, bool):
        raise ConversionTypeError(f"{rule}: {what} must be True or False, got {value!r}")


def check_positive(value: Any, what: str, rule: str, optional: bool = False) -> None:
    """A positive number (or None where ``optional``: the rule's default rate)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(
            f"{rule}: {what} must be a positive number{' or None' if optional else ''}, got {value!r}"
        )


__all__ = [
    "RuleConfig",
    "check_bool",
    "check_choice",
    "check_positive",
    "check_scale",
    "check_store_feedback",
    "unknown_option",
]
