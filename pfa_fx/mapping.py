"""The rule mapping: which rule, with which options, each weight op gets.

``rule`` is a rule config (``pfa_fx.PFA(expansion=2)``) or name for every op, or a mapping
from op-name patterns (``fnmatch``) or module types to a config, a rule name,
``(name, options)`` or ``None`` (the op stays native); the first matching entry wins, as
``torch.ao.quantization``'s per-name and per-type configs do. Every form resolves to a
:class:`~pfa_fx.RuleConfig` per op.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from typing import Any, Union

from torch import nn

from .config import RuleConfig, check_store_feedback, unknown_option
from .errors import ConversionError, short_list
from .rules import canonical_rule, config_for, node_class_of, rule_class

RuleSpec = Union[RuleConfig, str, tuple[str, Mapping[str, Any]], None]

#: convert's own keywords: an unknown rule option close to one of them is pointed there
CONVERT_KEYWORDS = ("seed", "fallback", "strict", "capture", "example_inputs", "generator")


def _entry_matches(pattern: str | type, key: str, owner: nn.Module | None) -> bool:
    """Whether a rule-mapping key (an fnmatch pattern or a module type) matches an op."""
    if isinstance(pattern, type):
        return owner is not None and isinstance(owner, pattern)
    return fnmatch.fnmatchcase(key, pattern)


def _config(value: RuleConfig | str | tuple, options: Mapping[str, Any]) -> RuleConfig:
    """A mapping value (or the whole rule) as a config: ``options`` (convert's keyword
    options) apply to the names that accept them, under an entry's own options."""
    if isinstance(value, RuleConfig):
        return config_for(value)
    name, own = (value, {}) if isinstance(value, str) else value
    accepted = rule_class(name).config_type.option_names()
    return config_for(name, {**{k: v for k, v in options.items() if k in accepted}, **own})


def resolve_spec(
    spec: RuleConfig | str | Mapping[Any, RuleSpec], key: str, owner: nn.Module | None, options: Mapping[str, Any]
) -> RuleConfig | None:
    """The config for the op named ``key``; None keeps the op native."""
    if not isinstance(spec, Mapping):
        return _config(spec, options)
    for pattern, value in spec.items():
        if _entry_matches(pattern, key, owner):
            return None if value is None else _config(value, options)
    return None


def _entry_name(pattern: str | type) -> str:
    return repr(pattern) if isinstance(pattern, str) else f"{pattern.__module__}.{pattern.__qualname__}"


def _nearest_ops(pattern: str, ops: list[str]) -> list[str]:
    """Patterns close to ``pattern`` that do match ops: a module name given where its ops
    are meant (``"layer4"`` -> ``"layer4.*"``), or the nearest op names and ``"<module>.*"``
    patterns by spelling (case ignored)."""
    plain = not any(c in pattern for c in "*?[")
    if plain and any(k.startswith(pattern + ".") for k in ops):
        return [pattern + ".*"]
    candidates = set(ops)
    for k in ops:
        parts = k.split(".")
        candidates.update(".".join(parts[:i]) + ".*" for i in range(1, len(parts)))
    by_lower = {c.lower(): c for c in sorted(candidates)}
    if pattern.lower() in by_lower:  # only the case is wrong (op names are matched case-sensitively)
        return [by_lower[pattern.lower()]]
    close = difflib.get_close_matches(pattern.lower(), list(by_lower), n=3, cutoff=0.6)
    return [by_lower[c] for c in close]


def mapping_problems(spec: Any, ops: Mapping[str, nn.Module | None]) -> list[str]:
    """One line per rule-mapping entry that decides no op: it matches none (with the
    nearest op names), or every op it matches is taken by an earlier entry."""
    if not isinstance(spec, Mapping):
        return []
    entries = list(spec)
    first: dict[str, int] = {}
    matched: dict[int, list[str]] = {i: [] for i in range(len(entries))}
    for key, owner in ops.items():
        hits = [i for i, pattern in enumerate(entries) if _entry_matches(pattern, key, owner)]
        for i in hits:
            matched[i].append(key)
        if hits:
            first[key] = hits[0]
    won = set(first.values())
    problems = []
    for i, pattern in enumerate(entries):
        if i in won:
            continue
        name = _entry_name(pattern)
        if matched[i]:
            takers = ", ".join(sorted({_entry_name(entries[first[k]]) for k in matched[i]}))
            problems.append(
                f"rule mapping entry {name} decides no op: every op it matches ({short_list(matched[i])}) is "
                f"taken by the earlier entry {takers} (the first matching entry wins: put specific entries first)"
            )
            continue
        if isinstance(pattern, type):
            kinds = sorted({type(o).__qualname__ for o in ops.values() if o is not None})
            hint = f"; the ops' modules here are {', '.join(kinds)}" if kinds else ""
            problems.append(
                f"rule mapping entry {name} matches no op: no op's module is a {pattern.__qualname__}{hint}"
            )
            continue
        near = _nearest_ops(pattern, list(ops))
        hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
        problems.append(
            f"rule mapping entry {name} matches no op{hint} (op names here: {short_list(list(ops))}; "
            "pfa_fx.op_names(model) lists them all)"
        )
    return problems


def check_spec(spec: Any, options: Mapping[str, Any]) -> None:
    """Refuse a rule, mapping or option that names nothing valid, listing what is."""
    if isinstance(spec, RuleConfig):
        node_class_of(spec)
        if options:
            raise ConversionError(
                f"{type(spec).__name__} holds its rule's options: give them to it (e.g. "
                f"{type(spec).__name__}({next(iter(options))}=...); valid options: {', '.join(spec.option_names()) or 'none'}), "
                f"not to convert; got {', '.join(map(repr, options))}"
            )
        return
    if isinstance(spec, str):
        names = [canonical_rule(spec)]
    elif isinstance(spec, Mapping):
        names = []
        for pattern, value in spec.items():
            if not isinstance(pattern, (str, type)):
                raise ConversionError(f"rule mapping keys are name patterns or module types, got {pattern!r}")
            if value is None or isinstance(value, RuleConfig):
                if value is not None:
                    node_class_of(value)
                continue
            if isinstance(value, str):
                names.append(canonical_rule(value))
            elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
                names.append(canonical_rule(value[0]))
                _check_options(names[-1], value[1], [names[-1]])
            else:
                raise ConversionError(
                    f"rule for {pattern!r} must be a rule name, (name, options), a rule config or None; got {value!r}"
                )
    else:
        raise ConversionError(
            f"rule must be a rule name, a rule config (e.g. pfa_fx.PFA()) or a mapping of patterns to rules, got {spec!r}"
        )
    _check_options(None, options, names)


def _check_options(owner: str | None, options: Mapping[str, Any], names: list[str]) -> None:
    valid = {opt for n in names for opt in rule_class(n).options}
    if "store_feedback" in options:
        accepting = [n for n in dict.fromkeys(names) if "store_feedback" in rule_class(n).options]
        learned = [n for n in dict.fromkeys(names) if rule_class(n).learned_feedback]
        if accepting or learned:
            check_store_feedback(options["store_feedback"], owner or ", ".join(accepting + learned))
            # rules with learned feedback store it whatever the option says: True is what they
            # do (their config's from_options drops it), False is refused with the reason
            valid.add("store_feedback")
            for n in learned:
                check_store_feedback(options["store_feedback"], n, rule_class(n).learned_feedback)
    for opt in options:
        if opt not in valid:
            which = f"rule {owner!r}" if owner else f"rule(s) {', '.join(sorted(set(names)))}"
            keywords = () if owner else CONVERT_KEYWORDS  # a mapping entry's options are the rule's alone
            raise ConversionError(unknown_option(opt, which, sorted(valid), keywords))


__all__ = ["RuleSpec", "check_spec", "mapping_problems", "resolve_spec"]
