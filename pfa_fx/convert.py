"""``convert``: the public entry of the pass, short orchestration of its parts.

resolve the rule mapping (:mod:`.mapping`) → capture the weight ops (:mod:`.capture`:
torch.fx tracing, or the eager interception where no graph can be had) → rewrite the
captured graphs (:mod:`.rewrite`) → install feedback nodes, rule hooks and checkpoint
hooks (:mod:`.install`). The user's model is deep-copied first and never modified;
parameter names are unchanged, so checkpoints keep loading.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import eager, export, fx_trace, modules
from .draws import GENERATORS
from .errors import ConversionError, ConversionTypeError, TraceError, did_you_mean
from .graph_module import ConvertedModule
from .install import FeedbackInstaller, finish
from .mapping import RuleSpec, check_spec, mapping_problems
from .node import FeedbackNode
from .record import record_of
from .registry import NAMESPACE, feedback_modules
from .rewrite import Rewriter, matrix_products_left, weight_op_readers
from .weights import hidden_weights

#: the front ends ``convert(capture=...)`` accepts
CAPTURES = ("auto", "fx", "export", "eager", "modules")


def convert(
    model: nn.Module,
    rule: str | Mapping[Any, RuleSpec] = "pfa",
    *,
    seed: int = 0,
    fallback: bool = True,
    strict: bool = False,
    capture: str = "auto",
    example_inputs: Any = None,
    generator: str = "mt19937",
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
        strict: raise :class:`ConversionError` naming every parameter of two or more
            dimensions that would stay on BP as an operand of a matrix product or
            convolution (other than ops the rule mapping keeps native on purpose), or if an
            entry of the rule mapping decides no op. Without ``strict`` the same list is a
            warning.
        capture: how the weight ops are found. ``"auto"`` (default): torch.fx symbolic
            tracing, then torch.export where the model's own forward defeats it — or
            torch.export first where example inputs exist (``example_inputs``, or a Hugging
            Face model's own); where both fail, the eager interception (``fallback``). ``"fx"``, ``"export"``
            or ``"eager"`` asks for one front end (``"eager"``: the model's forward run with
            its weight ops intercepted, no graph). ``"modules"`` keeps the model's module
            tree: each module owning a converted weight runs its op feedback-aware in its
            own forward and holds the op's feedback node as its child
            (``<owner>.pfa_feedback``, fixed feedback as frozen parameters) — the front end
            for FSDP2's per-block ``fully_shard`` (docs/guide/sharding.md). :func:`report`
            names each op's front end.
        example_inputs: inputs for torch.export: a dict of keyword tensors, a tensor or a
            tuple of positional tensors. Their batch and sequence sizes are not baked in.
        generator: how fixed random feedback (FA's, SF's and KP/WM/PAL's initial ``B``, frSF's
            ``M``, PFA's ``B``) is drawn: ``"mt19937"`` (default: torch's CPU Mersenne Twister
            in float64, then cast) or ``"philox"`` (Philox-4x32-10, counter-based: each draw a
            pure function of ``(seed, op name, stream, position)``, computed on the op's own
            device, the same bits on every device, any slice drawable alone;
            :mod:`pfa_fx.counter_rng`). The two give different numbers for the same seed;
            checkpoints record which.
        **rule_options: options for the rules that accept them, e.g. ``expansion=10``,
            ``compact=True``, ``route="auto"`` (pfa, pfa-o), ``variant="frsf"`` (sf),
            ``sigma``, ``mirror_lr``, ``decay`` (wm), ``sigma``, ``feedback_lr``, ``decay`` (pal).
            ``store_feedback=False`` (fa, sf, dfa, pfa, pfa-o; default True) holds no fixed
            random feedback in memory: fa's ``B``, frSF's ``M`` and explicit pfa/pfa-o's ``B``
            are redrawn in every backward from the op's seeded generator, bit for bit the
            tensors a stored conversion with the same ``seed`` holds (cast as they would
            have been by ``.to()``/``.half()``), and dfa caches no projection. It saves
            ``|W|`` numbers per fa/frSF op (``expansion·n_out²/groups`` per pfa op) for a
            redraw per op and backward (each rule's docstring gives the cost); such ops run
            between torch.compile graphs, as dfa's do. compact pfa's ``G`` stays stored.
            kp, wm and pal learn their feedback and refuse ``False``. A checkpoint loads
            across ``store_feedback`` settings of the same seed.

    Returns:
        A :class:`ConvertedModule` (a ``torch.fx.GraphModule``) with the same forward,
        the same parameter names, and feedback state under ``pfa_feedback.<op name>``;
        or, through torch.export, the eager interception or ``capture="modules"``, a copy
        of the model of its own class (``generate`` and the rest kept) whose forward runs
        the rewritten graph, intercepts its weight ops, or runs each in its owner module
        (feedback state then under ``<owner>.pfa_feedback``). Its ``state_dict``
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
    _check_capture(capture)
    if generator not in GENERATORS:
        raise ConversionError(
            f"unknown generator {generator!r}; valid: {', '.join(map(repr, GENERATORS))}{did_you_mean(generator, GENERATORS)}"
        )
    converted, root, installer = _build(model, rule, rule_options, seed, fallback, capture, example_inputs, generator)
    _present_class_signature(converted, model)
    problems = mapping_problems(rule, installer.owners)
    if strict and problems:
        raise ConversionError(
            "strict=True: the rule mapping has entries that decide no op:\n  " + "\n  ".join(problems)
        )
    for problem in problems:
        warnings.warn(f"pfa_fx: {problem}.", UserWarning, stacklevel=2)
    _check_strict(root, converted, installer, strict, example_inputs)
    return converted


def op_names(
    model: nn.Module, *, fallback: bool = True, capture: str = "auto", example_inputs: Any = None
) -> list[str]:
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
    _check_capture(capture)
    # an empty mapping: every op stays native
    _, _, installer = _build(model, {}, {}, 0, fallback, capture, example_inputs)
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


def _check_capture(capture: Any) -> None:
    if capture not in CAPTURES:
        raise ConversionError(
            f"unknown capture {capture!r}; valid: {', '.join(map(repr, CAPTURES))}{did_you_mean(capture, CAPTURES)}"
        )


@dataclass
class _Conversion:
    """What every front end is handed with the model's copy: the request, the example
    inputs, and (once made) the installer its nodes go through. One signature for every
    front end: ``front_end(root, conversion) -> converted model``."""

    rule: Any
    options: dict[str, Any]
    seed: int
    fallback: bool
    kwargs: dict[str, Any] | None
    class_name: str
    training: bool
    generator: str = "mt19937"
    reason: str = ""  # why no graph: for the eager front end
    installer: FeedbackInstaller | None = None

    def install_into(self, model: nn.Module, in_owners: bool = False) -> FeedbackInstaller:
        self.installer = FeedbackInstaller(model, self.rule, self.options, self.seed, in_owners=in_owners)
        self.installer.generator = self.generator
        return self.installer


def _capture_fx(root: nn.Module, conv: _Conversion) -> nn.Module:
    """torch.fx: a :class:`ConvertedModule` of the traced graphs (one per train/eval mode)."""
    train_graph, eval_graph, leaf_paths = fx_trace.trace_modes(root, conv.fallback)
    for path, reason in leaf_paths.items():
        m = root.get_submodule(path)
        warnings.warn(
            f"pfa_fx: module '{path}' ({type(m).__qualname__}) cannot be traced by torch.fx ({reason}); "
            "it runs as one opaque call whose weight ops are intercepted at run time.",
            stacklevel=4,
        )
    gm = ConvertedModule(root, train_graph, eval_graph, conv.class_name)
    installer = conv.install_into(gm)
    rewriter = Rewriter(gm, root, installer)
    for graph in {id(g): g for g in (train_graph, eval_graph)}.values():
        rewriter.rewrite(graph)
    gm.train(conv.training)
    gm.recompile()
    rec = installer.record(gm, "fx graph", leaf_paths)
    rec.left_on_bp = matrix_products_left(gm, (train_graph, eval_graph), installer)
    rec.op_readers = weight_op_readers(gm, train_graph)
    finish(gm)
    return gm


def _capture_export(root: nn.Module, conv: _Conversion) -> nn.Module:
    """torch.export: ``root`` converted in place, keeping its class."""
    if conv.kwargs is None:
        raise TraceError("torch.export needs example inputs: pass example_inputs=")
    captured = export.export_modes(root, conv.kwargs)
    installer = conv.install_into(root)
    installer.path = "export graph"
    rewriter = Rewriter(root, root, installer)
    graphs = tuple(captured.graphs.values())
    for graph in graphs:
        rewriter.rewrite(graph)
    # calls the graph was not captured for (generate's KV cache, labels) run eagerly through the same nodes
    params = {id(p): name for name, p in root.named_parameters()}
    routes = tuple(
        (params[id(node._weight_ref[0])], key)
        for key, node in installer.made.items()
        if node is not None and id(node._weight_ref[0]) in params
    )
    rec = installer.record(root, "export graph", {}, routes=routes)
    rec.left_on_bp = matrix_products_left(root, graphs, installer)
    export.install_forwards(root, captured)
    rec.op_readers = weight_op_readers(root, captured.graphs[True])
    finish(root)
    return root


def _capture_eager(root: nn.Module, conv: _Conversion) -> nn.Module:
    """No graph: the model's own forward with its weight ops intercepted at run time."""
    return eager.convert_eagerly(root, conv.install_into(root), conv.reason or "capture='eager'", conv.kwargs)


def _capture_modules(root: nn.Module, conv: _Conversion) -> nn.Module:
    """The module tree kept: each owner of a converted weight runs its op feedback-aware."""
    return modules.convert_in_modules(root, conv.install_into(root, in_owners=True), conv.kwargs)


#: capture name -> front end, all of one signature
FRONT_ENDS = {"fx": _capture_fx, "export": _capture_export, "eager": _capture_eager, "modules": _capture_modules}


def _build(
    model: nn.Module,
    rule: Any,
    rule_options: Mapping[str, Any],
    seed: int,
    fallback: bool,
    capture: str = "auto",
    example_inputs: Any = None,
    generator: str = "mt19937",
) -> tuple[nn.Module, nn.Module, FeedbackInstaller]:
    """The conversion itself: ``(converted model, traced copy, installer)``. Warnings are
    attributed to the caller of ``convert`` / ``op_names`` (stacklevel 3)."""
    root = copy.deepcopy(model)
    failures: list[str] = []
    try:
        kwargs = export.example_kwargs(root, example_inputs)
    except TraceError as err:
        kwargs, failures = None, [str(err)]
    conv = _Conversion(
        rule, dict(rule_options), seed, fallback, kwargs, type(model).__name__, model.training, generator
    )
    # with example inputs (given, or a Hugging Face model's own) torch.export goes first:
    # torch.fx would bake a forward's None defaults in, and HF models' main inputs default to None
    graphs = ("export", "fx") if kwargs is not None else ("fx", "export")
    order = {"auto": graphs, "eager": (), "modules": ()}.get(capture, (capture,))
    for front_end in order:
        try:
            converted = FRONT_ENDS[front_end](root, conv)
            return converted, root, conv.installer
        except TraceError as err:
            if front_end == "fx" and capture == "fx" and not fallback:
                raise
            failures.append(str(err).rstrip(". "))
    if capture == "modules":
        return _capture_modules(root, conv), root, conv.installer
    if capture != "eager":
        if not fallback:
            raise TraceError("; ".join(failures))
        # the trace errors end without a full stop (they quote the exception): add one
        warnings.warn(
            f"pfa_fx: {'; '.join(failures)}. The whole forward runs eagerly instead, with every "
            "Linear/Conv/attention weight op intercepted at run time (no graph).",
            stacklevel=3,
        )
    conv.reason = failures[0] if failures else ""
    return _capture_eager(root, conv), root, conv.installer


def _present_class_signature(converted: nn.Module, model: nn.Module) -> None:
    """A forward the conversion set on the instance (torch.export's dispatcher, the eager
    interception, a root that owns a weight under ``capture="modules"``) takes
    ``(*args, **kwargs)`` and hands them to the class's forward or to a graph captured from
    it; callers that read ``inspect.signature(model.forward)`` (Hugging Face ``Trainer``
    drops every dataset column it does not name) must see the class forward's parameters.
    The forward is wrapped in a function of this model alone that presents them; calls go
    through unchanged. No ``__wrapped__``: accelerate's mixed-precision unwrapping follows
    that chain and would end on the class's unconverted forward."""
    forward = converted.__dict__.get("forward")
    if not isinstance(forward, types.MethodType) or forward.__self__ is not converted:
        return
    own = model.__dict__.get("forward")  # a forward the user set on the instance, copied as is
    if getattr(own, "__func__", own) is forward.__func__:
        return
    try:
        signature = inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        return
    impl = forward.__func__

    def signed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return impl(self, *args, **kwargs)

    signed_forward.__signature__ = signature  # type: ignore[attr-defined]
    signed_forward.__doc__ = impl.__doc__
    signed_forward.__name__ = "forward"
    signed_forward.__qualname__ = f"{type(model).__qualname__}.forward"
    converted.forward = types.MethodType(signed_forward, converted)


def _check_strict(
    root: nn.Module, converted: nn.Module, installer: FeedbackInstaller, strict: bool, example_inputs: Any
) -> None:
    """Every parameter of two or more dimensions that stays on BP as an operand of a matrix
    product or convolution: an error with ``strict``, else a warning. ``strict`` also
    refuses weight-op modules no converted op reaches."""
    rec = record_of(converted)
    left = rec.left_on_bp
    if left is None:  # converted without a graph: see what one forward leaves on BP
        kwargs = export.example_kwargs(converted, example_inputs)
        left = eager.left_on_backprop(converted, kwargs, installer.kept_native) if kwargs is not None else {}
    on_bp = [f"{p}: {why}" for p, why in left.items()]
    others = [f"{k}: {why}" for k, why in rec.skipped.items()]
    made = {name for name, _ in feedback_modules(converted)} | set(rec.kept_native)
    for h in hidden_weights(root, ""):
        if h.key not in made and not h.key.startswith(NAMESPACE) and h.param_path not in left:
            others.append(f"{h.param_path}: never reached by a converted op")
    if strict:
        problems = others + on_bp
        if problems:
            raise ConversionError("strict=True: these weight ops would stay on BP:\n  " + "\n  ".join(problems))
        return
    # without strict, everything strict would refuse is said, never silently left on BP
    if on_bp:
        warnings.warn(
            "pfa_fx: these parameters stay on BP as operands of a matrix product (map their ops to None "
            "to keep them native on purpose; strict=True makes this an error):\n  " + "\n  ".join(on_bp),
            UserWarning,
            stacklevel=3,
        )
    if others:
        warnings.warn(
            "pfa_fx: these weight ops stay on BP (map them to None to keep them native on purpose; "
            "strict=True makes this an error):\n  " + "\n  ".join(others),
            UserWarning,
            stacklevel=3,
        )


__all__ = ["convert", "op_names"]
