"""The errors pfa_fx raises for what it cannot accept, and the helpers that word them. The
bottom of the package: every other module may import it, it imports none of them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConversionError(ValueError):
    """A model, rule, option or checkpoint that a conversion cannot accept.

    A subclass of ``ValueError``: ``except ValueError`` keeps catching what it caught
    before rules and options raised this class."""


class ConversionTypeError(ConversionError, TypeError):
    """An option of the wrong type (``expansion="10"``, ``seed=1.5``): caught by
    ``except ConversionError`` and, as before, by ``except TypeError``."""


class TraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the module at fault."""


def did_you_mean(word: object, choices: Iterable[str], n: int = 1) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``word``, or ``""``."""
    if not isinstance(word, str):
        return ""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(lowered[c]) for c in close) + "?"


def short_list(names: list[str], n: int = 6) -> str:
    """The first ``n`` names, then how many there are in all: lists in messages stay short."""
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names)} in all)" if len(names) > n else "")


__all__ = ["ConversionError", "ConversionTypeError", "TraceError", "did_you_mean", "short_list"]
