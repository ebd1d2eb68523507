"""The learning rules as the figure scripts show and train them: display order, colours,
and each rule's learning rate (``--lr-rule``) and ``pfa_fx.convert`` options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from typing import Any

import pfa_fx

#: display and default order of the rules; any rule pfa_fx registers that is not listed
#: here follows in registry order, so a new rule is trainable without editing this file
RULE_ORDER = ("bp", "fa", "dfa", "sf", "kp", "wm", "pal", "pfa", "pfa-o")
RULES: tuple[str, ...] = tuple(r for r in RULE_ORDER if r in pfa_fx.RULES) + tuple(
    r for r in pfa_fx.RULES if r not in RULE_ORDER
)
_PALETTE = {
    "bp": "black",
    "fa": "tab:red",
    "dfa": "tab:pink",
    "sf": "tab:orange",
    "kp": "tab:green",
    "wm": "tab:olive",
    "pal": "tab:cyan",
    "pfa": "tab:blue",
    "pfa-o": "tab:purple",
}
_SPARE = ("tab:brown", "tab:gray", "gold", "navy", "teal", "maroon")
COLORS: dict[str, str] = _PALETTE | {
    rule: _SPARE[i % len(_SPARE)] for i, rule in enumerate(r for r in RULES if r not in _PALETTE)
}


def parse_lr_rules(p: argparse.ArgumentParser, items: list[str], rules: Iterable[str]) -> dict[str, float]:
    """``["pfa=0.05", "fa=0.01"]`` -> ``{"pfa": 0.05, "fa": 0.01}``; ``p.error`` on a bad item."""
    out: dict[str, float] = {}
    for item in items:
        rule, sep, value = item.partition("=")
        rule = rule.strip()
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not sep or rule not in rules or not (math.isfinite(lr) and lr > 0):
            p.error(f"--lr-rule {item!r}: expected RULE=LR with RULE one of {', '.join(rules)} and LR > 0")
        out[rule] = lr
    return out


def rule_lr(rule: str, args: argparse.Namespace) -> float:
    """The rule's learning rate: ``--lr-rule RULE=LR`` if given, else ``--lr``."""
    return args.lr_rule.get(rule, args.lr)


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    """The paper's recipe: feedback drawn at Xavier's std (pfa_fx draws at W's own by default)."""
    paper = {} if rule == "bp" else {"scale": "xavier"}
    if rule in ("pfa", "pfa-o"):
        return paper | {"expansion": args.expansion, "compact": not args.explicit_r}
    if rule == "sf":
        return paper | {"variant": args.sf_variant}
    return paper
