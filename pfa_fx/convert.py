"""``convert``: the public entry of the pass, short orchestration of its parts.

resolve the rule mapping (:mod:`.mapping`) → capture the weight ops (:mod:`.capture`:
torch.fx tracing, or the eager interception where no graph can be had) → rewrite the
captured graphs (:mod:`.rewrite`) → install feedback nodes, rule hooks and checkpoint
hooks (:mod:`.install`). The user's model is deep-copied first and never modified;
parameter names are unchanged, so checkpoints keep loading.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .capture import eager, fx_trace
from .errors import ConversionError, ConversionTypeError, TraceError
from .graph_module import ConvertedModule
from .install import FeedbackInstaller, finish
from .mapping import RuleSpec, check_spec, mapping_problems
from .node import FeedbackNode
from .registry import NAMESPACE, feedback_modules, set_op_readers
from .rewrite import Rewriter, weight_op_readers
from .weights import hidden_weights


def convert(
    model: nn.Module,
    rule: str | Mapping[Any, RuleSpec] = "pfa",
    *,
    seed: int = 0,
    fallback: bool = True,
    strict: bool = False,
    **rule_options: Any,
) -> nn.Module:
    """Return a copy of ``model`` whose weight ops send errors through feedback weights.

    Args:
        model: any ``nn.Module`` (torchvision, timm, or your own). It is not modified.
        rule: a rule name (``"bp"``, ``"fa"``, ``"dfa"``, ``"sf"``, ``"kp"``, ``"wm"``, ``"pal"``,
            ``"pfa"``, ``"pfa-o"``; any case),
            or a mapping from op-name patterns (``fnmatch``, e.g. ``"layer1.*"``) or
            module types to a rule name, ``(name, options)`` or ``None`` (op stays native).
            The first matching entry wins; ops no entry matches stay native. An entry that
            decides no op (it matches none, or only ops an earlier entry takes) is warned
            about, with the nearest op names; :func:`op_names` lists the names beforehand.
        seed: feedback state is drawn from a generator seeded by ``(seed, op name)``:
            reproducible and identical in every process without communication.
        fallback: where torch.fx cannot trace a submodule (data-dependent control flow),
            keep that submodule opaque and intercept its weight ops at run time, with a
            warning; where even the model's own forward cannot be traced, return the
            model's own class with its forward run under interception. ``False`` raises
            :class:`TraceError` naming the module at fault instead.
        strict: raise :class:`ConversionError` if any Linear/Conv/attention weight would
            stay on BP (other than ops the rule mapping keeps native on purpose), or if an
            entry of the rule mapping decides no op.
        **rule_options: options for the rules that accept them, e.g. ``expansion=10``,
            ``compact=True``, ``route="auto"`` (pfa, pfa-o), ``variant="frsf"`` (sf),
            ``sigma``, ``mirror_lr``, ``decay`` (wm), ``sigma``, ``feedback_lr``, ``decay`` (pal).

    Returns:
        A :class:`ConvertedModule` (a ``torch.fx.GraphModule``) with the same forward,
        the same parameter names, and feedback state under ``pfa_feedback.<op name>``;
        or, for a model whose forward cannot be traced at all (``fallback=True``), a copy
        of the model itself whose forward intercepts its weight ops. Its ``state_dict``
        records each op's rule, options and seed, and ``load_state_dict`` refuses a
        checkpoint of another configuration with a :class:`ConversionError` naming both.

    Raises:
        ConversionError: (a ``ValueError``) for a rule, option, mapping or model that
            cannot be converted, with the closest valid name where one was misspelt.

    Example::

        >>> import torchvision, pfa_fx
        >>> model = pfa_fx.convert(torchvision.models.resnet18(), rule="pfa", expansion=10)
        >>> dict(pfa_fx.feedback_modules(model))["fc"].rule
        'pfa'
    """
    _check_convertible(model)
    check_spec(rule, rule_options)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConversionTypeError(f"seed must be an int, got {seed!r}")
    converted, root, installer = _build(model, rule, rule_options, seed, fallback)
    problems = mapping_problems(rule, installer.owners)
    if strict and problems:
        raise ConversionError(
            "strict=True: the rule mapping has entries that decide no op:\n  " + "\n  ".join(problems)
        )
    for problem in problems:
        warnings.warn(f"pfa_fx: {problem}.", UserWarning, stacklevel=2)
    _check_strict(root, converted, strict)
    return converted


def op_names(model: nn.Module, *, fallback: bool = True) -> list[str]:
    """The op names :func:`convert` gives ``model``'s weight ops, in graph order, without
    converting it: the names a rule mapping's patterns are matched against
    (``"layer1.0.conv1"``, ``"fc"``, ``"blocks.0.attn.qkv"``; for
    ``nn.MultiheadAttention``, ``"<module>.in_proj_weight"``).

    The model is traced exactly as ``convert`` traces it (same fallback, so the same
    names), but no feedback state is drawn. ``model`` is not modified.

    >>> pfa_fx.op_names(torchvision.models.resnet18())[:3]  # doctest: +SKIP
    ['conv1', 'layer1.0.conv1', 'layer1.0.conv2']
    """
    _check_convertible(model)
    _, _, installer = _build(model, {}, {}, 0, fallback)  # an empty mapping: every op stays native
    return list(installer.owners)


def _check_convertible(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__qualname__}")
    if any(isinstance(m, FeedbackNode) for m in model.modules()):
        raise ConversionError(
            "this model is already converted (it holds pfa_fx feedback state); convert the "
            "original model instead of converting twice"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise ConversionError("TorchScript modules cannot be traced by torch.fx; convert the Python model")
    if any(name == NAMESPACE for name, _ in model.named_children()):
        raise ConversionError(f"the model already has a child named {NAMESPACE!r}, the feedback namespace")


def _build(
    model: nn.Module, rule: Any, rule_options: Mapping[str, Any], seed: int, fallback: bool
) -> tuple[nn.Module, nn.Module, FeedbackInstaller]:
    """The conversion itself: ``(converted model, traced copy, installer)``. Warnings are
    attributed to the caller of ``convert`` / ``op_names`` (stacklevel 3)."""
    root = copy.deepcopy(model)
    try:
        train_graph, eval_graph, leaf_paths = fx_trace.trace_modes(root, fallback)
    except TraceError as err:
        if not fallback:
            raise
        # the trace error ends without a full stop (it quotes the exception): add one
        warnings.warn(
            f"pfa_fx: {str(err).rstrip('. ')}. The whole forward runs eagerly instead, with every "
            "Linear/Conv/attention weight op intercepted at run time (no GraphModule).",
            stacklevel=3,
        )
        installer = FeedbackInstaller(root, rule, dict(rule_options), seed)
        return eager.convert_eagerly(root, installer, err.reason), root, installer
    for path, reason in leaf_paths.items():
        m = root.get_submodule(path)
        warnings.warn(
            f"pfa_fx: module '{path}' ({type(m).__qualname__}) cannot be traced by torch.fx ({reason}); "
            "it runs as one opaque call whose weight ops are intercepted at run time.",
            stacklevel=3,
        )
    gm = ConvertedModule(root, train_graph, eval_graph, type(model).__name__)
    installer = FeedbackInstaller(gm, rule, dict(rule_options), seed)
    rewriter = Rewriter(gm, root, installer)
    for graph in {id(g): g for g in (train_graph, eval_graph)}.values():
        rewriter.rewrite(graph)
    gm.train(model.training)
    gm.recompile()
    installer.record(gm, leaf_paths)
    set_op_readers(gm, weight_op_readers(gm, train_graph))
    finish(gm)
    return gm, root, installer


def _check_strict(root: nn.Module, converted: nn.Module, strict: bool) -> None:
    """With ``strict``, every weight-op weight must have feedback or be kept on BP on purpose."""
    if not strict:
        return
    problems = [f"{k}: {why}" for k, why in getattr(converted, "pfa_skipped", {}).items()]
    made = {name for name, _ in feedback_modules(converted)} | set(converted.pfa_kept_native)
    for h in hidden_weights(root, ""):
        if h.key not in made and not h.key.startswith(NAMESPACE):
            problems.append(f"{h.param_path}: never reached by a converted op")
    if problems:
        raise ConversionError("strict=True: these weight ops would stay on BP:\n  " + "\n  ".join(problems))


__all__ = ["convert", "op_names"]
