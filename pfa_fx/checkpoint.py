"""Checkpoints that know their conversion: each op's rule, options and seed ride in the
state dict's metadata, and a load pre-hook refuses a checkpoint of another conversion with
an error naming both configurations."""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .draws import GENERATOR_RECORD
from .errors import ConversionError, short_list
from .node import FeedbackNode
from .registry import NAMESPACE, feedback_modules, node_path, op_of_state_key

#: where a converted model's state_dict records its conversion (PyTorch's per-module metadata)
CHECKPOINT_KEY = "pfa_fx"


def _op_config(node: FeedbackNode) -> dict[str, Any]:
    return {"rule": node.rule, "options": dict(node.config), "seed": node.seed}


def conversion_config(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{op name: {"rule", "options", "seed"}}`` of a converted model: what its checkpoints
    record (with each rule config's ``VERSION``), and what ``load_state_dict`` compares them with."""
    return {name: _op_config(node) for name, node in feedback_modules(model)}


def watch_checkpoints(model: nn.Module) -> None:
    """Make ``model``'s ``state_dict`` record its conversion and ``load_state_dict`` check it."""
    # The configuration travels in the state_dict's metadata (where PyTorch keeps module
    # versions) rather than as extra state: state_dict values stay tensors plus the
    # counters some rules already kept, so tensor-only tooling (safetensors, EMA helpers,
    # elementwise comparisons) sees what it saw before.
    model.register_state_dict_post_hook(_save_conversion)
    # first, so that the check sees this model's layout
    model.register_load_state_dict_pre_hook(_to_this_layout)
    model.register_load_state_dict_pre_hook(_check_checkpoint)
    # the check needs the caller's strict (load_state_dict_checked): a converted graph's class
    # passes it on; a model that keeps its own class gets the same on the instance
    if not getattr(type(model), "passes_load_strict", False):
        model.load_state_dict = types.MethodType(eager_load_state_dict, model)


def _layouts(model: nn.Module) -> dict[str, str]:
    """``{path in the other layout: path here}`` of every node whose owner is known: the
    root namespace (``pfa_feedback.<op>``) and the owner's child (``<owner>.pfa_feedback``)."""
    moves = {}
    for path, node in model.named_modules():
        if not isinstance(node, FeedbackNode) or not node.op_name:
            continue
        flat = f"{NAMESPACE}.{node.op_name}"
        owned = node_path(node.op_name, node.owner_path) if node.owner_path is not None else None
        other = owned if path == flat else flat
        if other is not None and other != path:
            moves[other] = path
    return moves


def _to_this_layout(module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: rename feedback entries saved in the other placement
    of nodes (root namespace or owner module, :mod:`pfa_fx.registry`) to this model's, so a
    checkpoint of a graph conversion resumes in ``capture="modules"`` and back."""
    moves = _layouts(module)
    if not moves:
        return
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        head, _, leaf = key[len(prefix) :].rpartition(".")
        here = moves.get(head)
        if here is not None and f"{prefix}{here}.{leaf}" not in state_dict:
            state_dict[f"{prefix}{here}.{leaf}"] = state_dict.pop(key)


def load_state_dict_checked(
    module: nn.Module, load: Any, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any
) -> Any:
    """Run ``load`` with the caller's ``strict`` visible to :func:`_check_checkpoint`: PyTorch
    hands its hooks ``strict=True`` whatever the caller asked for."""
    strict = kwargs.get("strict", args[0] if args else True)
    before = module.__dict__.get("_pfa_load_strict")
    module.__dict__["_pfa_load_strict"] = bool(strict)
    try:
        return load(state_dict, *args, **kwargs)
    finally:
        module.__dict__["_pfa_load_strict"] = before


def eager_load_state_dict(self: nn.Module, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    """``load_state_dict`` of a model converted without a graph (bound to the instance)."""
    # the class's own load_state_dict (the model's override, if it has one), not this instance's
    load = types.MethodType(type(self).load_state_dict, self)
    return load_state_dict_checked(self, load, state_dict, *args, **kwargs)


def _save_conversion(module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict[str, Any]) -> None:
    nodes = dict(feedback_modules(module))
    versions = {node.rule: node.config_type.VERSION for node in nodes.values()}
    ops = {name: _op_config(node) for name, node in nodes.items()}  # conversion_config, from the same walk
    record = {"format": 1, "ops": ops, "versions": versions}
    generators = {node.generator for node in nodes.values()}
    if generators - {"mt19937"}:  # recorded where it is not the default, as checkpoints always were
        record["generator"] = GENERATOR_RECORD[generators.pop()] if len(generators) == 1 else "mixed"
    local_metadata[CHECKPOINT_KEY] = record


def _recorded_ops(saved: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A checkpoint's ``{op: config}``, each with the ``version`` of its rule's config when
    saved (1 for checkpoints that predate versions)."""
    versions = saved.get("versions", {})
    generator = saved.get("generator", GENERATOR_RECORD["mt19937"])
    return {
        op: {**cfg, "version": versions.get(cfg.get("rule"), 1), "generator": generator}
        for op, cfg in saved.get("ops", {}).items()
    }


def _state_leaves(node: FeedbackNode) -> set[str]:
    """The state_dict names of a node's own entries (``R``, ``B``, ``_extra_state``...)."""
    leaves = {n for n, p in node._parameters.items() if p is not None}
    leaves |= {n for n, b in node._buffers.items() if b is not None and n not in node._non_persistent_buffers_set}
    if type(node).get_extra_state is not nn.Module.get_extra_state:
        leaves.add("_extra_state")
    return leaves


def _same_config(theirs: Mapping[str, Any] | None, node: FeedbackNode | None) -> bool:
    if theirs is None or node is None:
        return theirs is None and node is None
    if theirs.get("rule") != node.rule:
        return False
    # options recorded under an older config VERSION, in this version's terms (a checkpoint
    # that predates versions recorded version 1)
    options = node.config_type.upgrade(dict(theirs.get("options", {})), int(theirs.get("version", 1)))
    for k, v in node.config.items():
        # options a checkpoint predates are not compared; PFA's route only chooses how the
        # same numbers are computed, so a checkpoint may resume under another one
        if k in options and k not in node.compute_only_options and options[k] != v:
            return False
    # rules that keep drawing from seeded streams after conversion continue another run
    # under another seed; the others carry every draw in their saved tensors, except where
    # the checkpoint's conversion redrew them (store_feedback=False): its seed defines them
    redrawn = node.draws_from_seed or (bool(node.fixed_draws) and _unstored(theirs))
    generator = theirs.get("generator", GENERATOR_RECORD["mt19937"])
    return not (
        redrawn and (theirs.get("seed", node.seed) != node.seed or generator != GENERATOR_RECORD[node.generator])
    )


def _unstored(config: Mapping[str, Any] | None) -> bool:
    """Whether a recorded op was converted with ``store_feedback=False``."""
    return config is not None and config.get("options", {}).get("store_feedback") is False


def _reconcile_fixed_draws(
    state_dict: Any, prefix: str, module: nn.Module, nodes: Mapping[str, FeedbackNode], theirs: Mapping[str, Any] | None
) -> None:
    """Fixed random tensors held on one side only (``store_feedback`` differs between the
    checkpoint's conversion and this one, with the same seed): a node that redraws its ``B``
    takes the checkpoint's ``B`` out of the load after checking that it is the redraw (the
    values a stored buffer would have taken); a node that stores it gets its own value where
    the checkpoint (recorded as redrawing it) has none. Ops whose recorded configuration
    differs are left to the caller's checks (``theirs`` None: the checkpoint records none)."""
    paths = {id(m): name for name, m in module.named_modules() if isinstance(m, FeedbackNode)}
    for op, node in nodes.items():
        mine = node.fixed_draws
        if not mine:
            continue
        cfg = None if theirs is None else theirs.get(op)
        if theirs is not None and not _same_config(cfg, node):
            continue
        for name in mine:
            key = f"{prefix}{paths[id(node)]}.{name}"  # in this model's layout (after _to_this_layout)
            if not node.store_feedback and key in state_dict:
                held = state_dict.pop(key)
                redrawn = node.redraw(name)
                if not (held.shape == redrawn.shape and torch.equal(held.to(redrawn), redrawn)):
                    raise ConversionError(
                        f"op '{op}' ({node.rule}, store_feedback=False) redraws its fixed feedback {name} from "
                        f"seed={node.seed!r}, but the checkpoint holds a different {name} (another seed or op, a "
                        f"draw saved at another precision, or a tensor set by hand): convert with "
                        f"store_feedback=True to load it as it is"
                    )
            elif node.store_feedback and key not in state_dict and _unstored(cfg):
                state_dict[key] = node.held(name)  # the draw of this seed, which it redrew


def _render(config: Mapping[str, Any] | None) -> str:
    if config is None:
        return "not converted (native, or no such op)"
    opts = ", ".join(f"{k}={format_option(v)}" for k, v in config.get("options", {}).items())
    return f"{config.get('rule')}({opts}), seed={config.get('seed')!r}"


def format_option(value: Any) -> str:
    """An option value for people: floats to 6 significant digits (``0.2``, not the
    ``0.19999999999999996`` a resolved default may be), everything else as ``repr``."""
    return repr(float(f"{value:.6g}")) if isinstance(value, float) and math.isfinite(value) else repr(value)


def _by_config(configs: Mapping[str, Mapping[str, Any] | None], ops: list[str]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for op in ops:
        groups.setdefault(_render(configs.get(op)), []).append(op)
    return [f"{desc} for {len(names)} op(s): {short_list(names, 4)}" for desc, names in groups.items()]


def _incoming(state_dict: Mapping[str, Any], prefix: str) -> dict[str, set[str]]:
    """``{op: its leaves}`` of the feedback entries under ``prefix``, in either node layout."""
    incoming: dict[str, set[str]] = {}
    for key in state_dict:
        found = op_of_state_key(key[len(prefix) :]) if key.startswith(prefix) else None
        if found is not None:
            incoming.setdefault(found[0], set()).add(found[1])
    return incoming


def _check_checkpoint(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Mapping[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook of a converted model: refuse a checkpoint saved from
    another conversion (rule, options, or the seed of rules that keep drawing from it)
    before PyTorch lists missing and unexpected keys. Under ``strict=False``, and where
    the model is loaded as part of a larger module (whose ``strict`` PyTorch does not
    pass on), only a checkpoint that would load feedback tensors into a differently
    configured op is refused; unconverted checkpoints (pretrained weights) are never checked."""
    strict = module.__dict__.get("_pfa_load_strict") is True
    incoming = _incoming(state_dict, prefix)
    saved = local_metadata.get(CHECKPOINT_KEY)
    if saved is None and not incoming:
        return
    nodes = dict(feedback_modules(module))
    own = {op: _state_leaves(node) for op, node in nodes.items()}
    mine = conversion_config(module)
    if saved is not None:
        theirs = _recorded_ops(saved)
        differ = [op for op in dict.fromkeys([*theirs, *mine]) if not _same_config(theirs.get(op), nodes.get(op))]
        if not strict:  # only what would load feedback tensors into a differently configured op
            differ = [op for op in differ if op in theirs and op in own and incoming.get(op, set()) & own[op]]
        if not differ:
            _reconcile_fixed_draws(state_dict, prefix, module, nodes, theirs)
            return
        lines = [
            f"this checkpoint was saved from another conversion ({len(differ)} op(s) differ in rule, options or seed):",
            "  checkpoint: " + "\n              ".join(_by_config(theirs, differ)),
            "  this model: " + "\n              ".join(_by_config(mine, differ)),
        ]
        seeds_only = all(
            op in theirs
            and op in mine
            and (theirs[op].get("rule"), theirs[op].get("options")) == (mine[op]["rule"], mine[op]["options"])
            for op in differ
        )
        if seeds_only:
            seeds = ", ".join(sorted({repr(theirs[op].get("seed")) for op in differ}))
            lines.append(
                "only the seed differs, but these ops keep drawing noise, projections or feedback from it after "
                "conversion (DFA, WM, PAL, brSF, and fixed feedback converted with store_feedback=False): the run "
                f"continues only under the checkpoint's seed={seeds}"
            )
        hint = _convert_call(theirs)
        lines.append(
            "To resume the checkpoint, convert the model the way it was converted"
            + (f", e.g. {hint}" if hint else "")
            + f"; to take only the model's own weights from it, drop its feedback keys (a '{NAMESPACE}' component in the name) and load with "
            "strict=False."
        )
        raise ConversionError("\n".join(lines))
    _reconcile_fixed_draws(state_dict, prefix, module, nodes, None)  # a stored B into a node that redraws it: checked
    if not strict:
        return
    incoming = _incoming(state_dict, prefix)  # again: the reconciliation took redrawn tensors out
    differ = [op for op in dict.fromkeys([*incoming, *own]) if incoming.get(op, set()) != own.get(op, set())]
    if differ:
        lines = [
            "this checkpoint's feedback state does not fit this conversion, and the checkpoint records no pfa_fx "
            "configuration to compare (saved by an older pfa_fx, or its dict was rebuilt without _metadata):"
        ]
        for op in differ[:6]:
            held = ", ".join(sorted(incoming.get(op, set()))) or "nothing"
            here = f"{_render(mine.get(op))} holding {', '.join(sorted(own.get(op, set()))) or 'nothing'}"
            lines.append(f"  {op}: checkpoint holds {held}; this model: {here}")
        if len(differ) > 6:
            lines.append(f"  … and {len(differ) - 6} more op(s)")
        lines.append(
            f"Convert with the checkpoint's rule and options, or drop its feedback keys (a '{NAMESPACE}' component in the name) and load with "
            "strict=False to take only the model's own weights."
        )
        raise ConversionError("\n".join(lines))


def _convert_call(theirs: Mapping[str, Mapping[str, Any]]) -> str:
    """``pfa_fx.convert(model, 'pfa', expansion=10, ..., seed=0)`` when every op of the
    checkpoint was converted alike (a mapping's conversion has no one-line call)."""
    configs = {_render(cfg) for cfg in theirs.values()}
    if len(configs) != 1:
        return ""
    cfg = next(iter(theirs.values()))
    args = [f"{cfg.get('rule')!r}", *(f"{k}={v!r}" for k, v in cfg.get("options", {}).items())]
    if cfg.get("seed") is not None:
        args.append(f"seed={cfg['seed']!r}")
    return f"pfa_fx.convert(model, {', '.join(args)})"


__all__ = ["CHECKPOINT_KEY", "conversion_config", "format_option"]
