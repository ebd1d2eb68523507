"""One record per converted model: what the conversion found and did, held in one place.

Every front end fills a :class:`ConversionRecord`; :func:`pfa_fx.report`, ``strict``,
checkpoints and the rules that need the graph's structure (PAL) read it back with
:func:`record_of`. Per-op facts (rule, options, seed, front end, owner) live on each op's
feedback node, which :func:`pfa_fx.feedback_modules` lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

#: the plain (unregistered) attribute of a converted model that holds its record
RECORD_ATTR = "pfa_record"


@dataclass
class ConversionRecord:
    """What :func:`pfa_fx.convert` found and did for one model.

    Attributes:
        front_end: how the model was captured: ``"fx graph"``, ``"export graph"``,
            ``"eager"`` or ``"modules"`` (an op reached otherwise, e.g. inside an opaque
            submodule, says so on its node: ``node.conversion_path``).
        ops: every weight op the pass reached, converted or not, in the order reached.
        fallbacks: ``{module path: why}`` of code no graph could capture, run eagerly with
            its weight ops intercepted (``""``: the whole forward).
        kept_native: ops the rule mapping leaves on BP on purpose.
        skipped: ``{op: why}`` of weight ops the pass could not convert.
        left_on_bp: ``{parameter: why}`` of matrix-product operands left on BP, as found in
            the captured graphs; None where there is no graph (``strict`` then probes).
        routes: ``(parameter path, op)`` pairs through which calls outside a captured graph
            (the eager interception, torch.export's uncaptured calls) find each op's node.
        op_readers: ``{op: [ops reading its output]}`` in the training graph.
    """

    front_end: str
    ops: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)
    kept_native: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    left_on_bp: dict[str, str] | None = None
    routes: tuple[tuple[str, str], ...] = ()
    op_readers: dict[str, list[str]] = field(default_factory=dict)


def set_record(model: nn.Module, record: ConversionRecord) -> None:
    """Hold ``record`` on ``model`` (a plain attribute: not a module, not in ``state_dict``).
    The older attribute names (``pfa_fallbacks``, ``pfa_kept_native``, ``pfa_skipped``,
    ``pfa_routes``) name the same objects, for code written against them."""
    model.__dict__[RECORD_ATTR] = record
    model.__dict__.update(
        pfa_fallbacks=record.fallbacks,
        pfa_kept_native=record.kept_native,
        pfa_skipped=record.skipped,
        pfa_routes=record.routes,
    )


def record_of(model: nn.Module) -> ConversionRecord:
    """The :class:`ConversionRecord` of a model :func:`pfa_fx.convert` returned; an empty one
    (front end ``"none"``) for any other module."""
    record = model.__dict__.get(RECORD_ATTR)
    return record if isinstance(record, ConversionRecord) else ConversionRecord("none")


__all__ = ["RECORD_ATTR", "ConversionRecord", "record_of", "set_record"]
