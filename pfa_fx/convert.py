"""The torch.fx pass: rewrite every weight op of a model into a feedback-aware op.

``convert(model, rule)`` traces a copy of ``model`` (once in train mode, once in eval
mode, because Python forwards may branch on ``self.training``), finds every weight op —
``nn.Linear`` / ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` calls, ``F.linear`` /
``F.conv{1,2,3}d`` / ``F.conv_transpose{1,2,3}d`` calls with
weights from parameters or computed by the model, and weight modules hidden inside
modules that tracing must keep opaque — and rewrites it to the op of :mod:`pfa_fx.ops`
with a :class:`~pfa_fx.rules.FeedbackNode` holding the rule's state under the
``pfa_feedback`` namespace. Parameter names are unchanged, so checkpoints keep loading.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import math
import operator
import re
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import intercept, ops
from .errors import ConversionError, ConversionTypeError, did_you_mean
from .rules import RULES, FeedbackNode, canonical_rule, rule_class, seeded_generator

NAMESPACE = "pfa_feedback"

_TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED_MODULES)
_PLAIN_FORWARDS = {m.forward for m in WEIGHT_MODULES}
_LINEAR_FNS = {F.linear}
_MATMUL_FNS = {operator.matmul, torch.matmul}
_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_T_FNS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_T_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

RuleSpec = Union[str, tuple[str, Mapping[str, Any]], None]


class TraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the module at fault."""


# ------------------------------------------------------------------------ the tracer
def _notrace_from_libraries() -> tuple[tuple[type, ...], tuple[Any, ...], tuple[Any, ...]]:
    """Leaf modules and opaque functions the model libraries register for FX themselves."""
    leaves: list[type] = []
    functions: list[Any] = []
    modules: list[Any] = [math]
    try:
        from timm.layers import _fx as timm_fx

        leaves += list(timm_fx.get_notrace_modules())
        functions += list(timm_fx.get_notrace_functions())
    except ImportError:  # timm is optional for users of plain torch models
        pass
    try:
        import torchvision.ops

        modules.append(torchvision.ops)
    except ImportError:
        pass
    return tuple(leaves), tuple(functions), tuple(modules)


def is_plain_weight_module(m: nn.Module) -> bool:
    """A Linear/Conv whose forward is torch's own (subclasses with their own forward,
    e.g. weight-standardized convs, are traced through instead)."""
    return isinstance(m, WEIGHT_MODULES) and type(m).forward in _PLAIN_FORWARDS


class FeedbackTracer(fx.Tracer):
    """``fx.Tracer`` that keeps timm's notrace modules opaque, autowraps its notrace
    functions, stamps each node with the module path it came from, and names the
    module at fault when tracing fails."""

    def __init__(self, leaf_paths: Iterable[str] = ()) -> None:
        leaves, functions, modules = _notrace_from_libraries()
        super().__init__(autowrap_modules=modules, autowrap_functions=functions)
        self.extra_leaves = leaves
        self.leaf_paths = set(leaf_paths)  # modules that failed to trace: kept opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.extra_leaves) or qualname in self.leaf_paths:
            return True
        if isinstance(m, WEIGHT_MODULES):
            return is_plain_weight_module(m)
        return super().is_leaf_module(m, qualname)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["pfa_scope"] = self.scope.module_path
        return node

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception as exc:
            path = self.path_of_module(m)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            err = TraceError(
                f"torch.fx cannot trace module '{path}' ({type(m).__module__}.{type(m).__qualname__}): "
                f"{reason}. Register it as a leaf (timm.layers.register_notrace_module), keep it on BP "
                "with a rule mapping, or let convert() fall back (fallback=True)."
            )
            err.path, err.reason = path, reason
            raise err from exc


def _constant_defaults(model: nn.Module) -> dict[str, Any] | None:
    """Forward arguments with constant defaults (``mask=None``, ``is_causal=False``, ...) are
    traced at their defaults: a proxy would make ``if mask is not None`` or ``if is_causal``
    take the wrong branch or fail. The converted forward keeps only the other arguments."""
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    found = {
        n: p.default
        for n, p in params.items()
        if n != "self" and p.kind in kinds and (p.default is None or isinstance(p.default, bool | int | float | str))
    }
    return found or None


def _trace(model: nn.Module, leaf_paths: dict[str, str], fallback: bool) -> fx.Graph:
    """Trace ``model``; with ``fallback``, a submodule that cannot be traced becomes an
    opaque leaf (recorded in ``leaf_paths`` with the reason) and tracing starts over."""
    while True:
        try:
            return FeedbackTracer(leaf_paths).trace(model, concrete_args=_constant_defaults(model))
        except TraceError as err:
            path = getattr(err, "path", "")
            if not fallback or not path or path in leaf_paths:
                raise
            leaf_paths[path] = err.reason
        except Exception as exc:
            err = TraceError(
                f"torch.fx cannot trace the forward of '{type(model).__qualname__}' (the root module): "
                f"{type(exc).__name__}: {exc}"
            )
            err.path, err.reason = "", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise err from exc


# ------------------------------------------------------------------- the graph module
class ConvertedModule(fx.GraphModule):
    """A ``GraphModule`` with one graph per mode: ``train()``/``eval()`` switch between
    the graph traced in training mode and the one traced in eval mode, so forwards that
    branch on ``self.training`` behave as before conversion."""

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str):
        super().__init__(root, train_graph if root.training else eval_graph, class_name)
        self._pfa_graphs = {True: train_graph, False: eval_graph}
        for graph in (train_graph, eval_graph):
            graph.owning_module = self
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module") and not _has_attr(self, node.target):
                    fx.graph_module._copy_attr(root, self, node.target)
        _keep_every_tensor(root, self)

    def train(self, mode: bool = True) -> ConvertedModule:
        super().train(mode)
        graphs = self.__dict__.get("_pfa_graphs")
        if graphs is not None and graphs[bool(mode)] is not self.graph:
            self.graph = graphs[bool(mode)]  # recompiles forward
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ConvertedModule:
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        res.__dict__.update(copy.deepcopy(self.__dict__, memo))
        for graph in res._pfa_graphs.values():
            graph.owning_module = res
        res.recompile()
        return res

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.load_state_dict``; a checkpoint saved from another conversion (rule,
        options, or the seed of rules that keep drawing from it) is refused with a
        :class:`ConversionError` naming both configurations."""
        from .checkpoint import _load_state_dict  # checkpoint checks import this module

        return _load_state_dict(self, super().load_state_dict, state_dict, *args, **kwargs)

    def __reduce__(self):
        raise TypeError(
            "a converted model is saved with its state_dict (torch.save(model.state_dict())) and "
            "rebuilt with pfa_fx.convert; pickling the module itself is not supported"
        )


def _has_attr(mod: nn.Module, target: str) -> bool:
    for item in target.split("."):
        if not hasattr(mod, item):
            return False
        mod = getattr(mod, item)
    return True


def _keep_every_tensor(root: nn.Module, gm: nn.Module) -> None:
    """GraphModule copies only what the graph touches; keep every parameter and buffer
    (unused heads included) under its own name, persistent or not as it was, so
    ``state_dict`` keys match the original model's and checkpoints keep loading."""
    for path, _ in list(root.named_parameters(remove_duplicate=False)) + list(
        root.named_buffers(remove_duplicate=False)
    ):
        if not _has_attr(gm, path):
            fx.graph_module._copy_attr(root, gm, path)
    for path, mod in root.named_modules(remove_duplicate=False):
        if not mod._non_persistent_buffers_set:
            continue
        try:
            target = gm.get_submodule(path)
        except AttributeError:
            continue
        if target is not mod:
            target._non_persistent_buffers_set |= mod._non_persistent_buffers_set & set(target._buffers)


# ------------------------------------------------------------------------ rule specs
def _entry_matches(pattern: str | type, key: str, owner: nn.Module | None) -> bool:
    """Whether a rule-mapping key (an fnmatch pattern or a module type) matches an op."""
    if isinstance(pattern, type):
        return owner is not None and isinstance(owner, pattern)
    return fnmatch.fnmatchcase(key, pattern)


def _resolve_spec(
    spec: str | Mapping[Any, RuleSpec], key: str, owner: nn.Module | None
) -> tuple[str, dict[str, Any]] | None:
    """The (rule, options) for the op named ``key``; None keeps the op native."""
    if isinstance(spec, str):
        return canonical_rule(spec), {}
    for pattern, value in spec.items():
        if _entry_matches(pattern, key, owner):
            if value is None:
                return None
            if isinstance(value, str):
                return canonical_rule(value), {}
            name, opts = value
            return canonical_rule(name), dict(opts)
    return None


def _entry_name(pattern: str | type) -> str:
    return repr(pattern) if isinstance(pattern, str) else f"{pattern.__module__}.{pattern.__qualname__}"


def _short_list(names: list[str], n: int = 6) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names)} in all)" if len(names) > n else "")


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


def _mapping_problems(spec: Any, ops: Mapping[str, nn.Module | None]) -> list[str]:
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
                f"rule mapping entry {name} decides no op: every op it matches ({_short_list(matched[i])}) is "
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
            f"rule mapping entry {name} matches no op{hint} (op names here: {_short_list(list(ops))}; "
            "pfa_fx.op_names(model) lists them all)"
        )
    return problems


def _check_spec(spec: Any, options: Mapping[str, Any]) -> None:
    if isinstance(spec, str):
        names = [canonical_rule(spec)]
    elif isinstance(spec, Mapping):
        names = []
        for pattern, value in spec.items():
            if not isinstance(pattern, (str, type)):
                raise ConversionError(f"rule mapping keys are name patterns or module types, got {pattern!r}")
            if value is None:
                continue
            if isinstance(value, str):
                names.append(canonical_rule(value))
            elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
                names.append(canonical_rule(value[0]))
                _check_options(names[-1], value[1], [names[-1]])
            else:
                raise ConversionError(
                    f"rule for {pattern!r} must be a rule name, (name, options) or None; got {value!r}"
                )
    else:
        raise ConversionError(f"rule must be a rule name or a mapping of patterns to rules, got {spec!r}")
    _check_options(None, options, names)


def _check_options(owner: str | None, options: Mapping[str, Any], names: list[str]) -> None:
    valid = {opt for n in names for opt in rule_class(n).options}
    for opt in options:
        if opt not in valid:
            which = f"rule {owner!r}" if owner else f"rule(s) {', '.join(sorted(set(names)))}"
            listed = ", ".join(sorted(valid)) or "none"
            raise ConversionError(
                f"unknown option {opt!r} for {which}; valid options: {listed}{did_you_mean(opt, sorted(valid))}"
            )


def _make_node(
    rule: str, opts: dict[str, Any], weight: torch.Tensor, groups: int, seed: int, key: str, transposed: bool = False
) -> FeedbackNode:
    cls = rule_class(rule)
    accepted = {k: v for k, v in opts.items() if k in cls.options}
    node = cls(weight, groups=groups, generator=seeded_generator(seed, key), transposed=transposed, **accepted)
    node.seed = seed  # what the node's draws came from: saved with checkpoints, checked on load
    return node


# -------------------------------------------------------------------------- the pass
class _Rewriter:
    """Holds what one conversion shares between its two graphs: one node per weight."""

    def __init__(self, gm: ConvertedModule, root: nn.Module, spec, options: dict[str, Any], seed: int):
        # root: the traced copy, whose module types the GraphModule's copied paths may lack
        self.gm, self.root, self.spec, self.options, self.seed = gm, root, spec, options, seed
        self.namespace = nn.Module()
        gm.add_module(NAMESPACE, self.namespace)
        self.made: dict[str, FeedbackNode | None] = {}
        self.owners: dict[str, nn.Module | None] = {}  # every op the pass reached, with its module
        self.kept_native: set[str] = set()  # ops the rule mapping leaves on BP on purpose
        self.skipped: dict[str, str] = {}  # weight ops the pass could not convert, with why
        self.flat_names: dict[str, str] = {}  # op name -> the graph's flat attribute for its node

    def node_for(
        self,
        key: str,
        weight: torch.Tensor,
        groups: int,
        owner: nn.Module | None,
        path: str = "graph",
        transposed: bool = False,
    ) -> FeedbackNode | None:
        if key in self.made:
            node = self.made[key]
            if node is not None and tuple(weight.shape) != node.weight_shape:
                raise ConversionError(f"weight '{key}' is used with two shapes; cannot share its feedback")
            if node is not None and node.transposed != transposed:
                raise ConversionError(
                    f"weight '{key}' is used by a convolution and by a transposed convolution; "
                    "their feedback has different output axes and cannot be shared"
                )
            return node
        self.owners[key] = owner
        resolved = _resolve_spec(self.spec, key, owner)
        node = None
        if resolved is not None:
            rule, opts = resolved
            node = _make_node(rule, {**self.options, **opts}, weight, groups, self.seed, key, transposed)
            node.op_name = key
            node.conversion_path = path
            node.op_owner = f"{type(owner).__module__}.{type(owner).__qualname__}" if owner is not None else ""
            _set_path(self.namespace, key, node)
        else:
            self.kept_native.add(key)
        self.made[key] = node
        return node

    # -- one graph ---------------------------------------------------------------------
    def rewrite(self, graph: fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op == "call_module":
                m = self.gm.get_submodule(node.target)
                if is_plain_weight_module(m):
                    self._rewrite_module_call(graph, node, m)
                    continue
                hidden = _hidden_weights(m, node.target)
                self._note_unroutable(m, node.target, hidden)
                if hidden:
                    self._rewrite_opaque_call(graph, node, hidden)
            elif node.op == "call_function" and (
                node.target in _LINEAR_FNS or node.target in _CONV_FNS or node.target in _CONV_T_FNS
            ):
                self._rewrite_function_call(graph, node)
            elif node.op == "call_function" and node.target in _MATMUL_FNS:
                self._rewrite_matmul_with_parameter(graph, node)
            elif (
                node.op == "call_function"
                and inspect.isfunction(node.target)
                and (hidden := _weights_passed_to(self.root, node))
            ):
                self._rewrite_opaque_call(graph, node, hidden)
        graph.lint()  # no dead-code elimination: the model's own side effects stay

    def node_for_hidden(self, h: _Hidden, path: str) -> FeedbackNode | None:
        node = self.node_for(h.key, h.weight, h.groups, h.owner, path, h.transposed)
        if node is not None and h.bank is not None:
            node._weight_ref = [h.bank]  # the parameter itself: follows .to() and loads
            node.expert_bank = True
        return node

    def _note_unroutable(self, m: nn.Module, path: str, hidden: list[_Hidden]) -> None:
        """Weight-like parameters (>= 2-D, named ``*weight``) that an opaque module uses in
        code the pass cannot route (e.g. timm's CondConv2d mixes a kernel per sample):
        recorded, so the report names them and ``strict=True`` refuses."""
        routed = {id(h.weight if h.bank is None else h.bank) for h in hidden}
        for rel, sub in m.named_modules():
            if isinstance(sub, (*WEIGHT_MODULES, nn.Embedding, nn.EmbeddingBag)):
                continue
            for name, p in sub.named_parameters(recurse=False):
                if p.dim() >= 2 and name.endswith("weight") and id(p) not in routed:
                    full = ".".join(x for x in (path, rel, name) if x)
                    key = full[: -len(".weight")] if full.endswith(".weight") else full
                    self.skipped[key] = (
                        f"used inside opaque module '{path}' ({type(m).__qualname__}) by code the pass "
                        "cannot route (not a Linear/Conv weight): stays on BP"
                    )

    def _feedback_attr(self, graph: fx.Graph, key: str) -> fx.Node:
        """The op's node, read by the graph as one flat attribute of the converted model.

        The node lives (and saves) under ``pfa_feedback.<op name>``; the graph reads it from
        a plain instance attribute that refers to the same object, because a nested
        ``self.pfa_feedback.layer1...`` chain costs one ``nn.Module.__getattr__`` per level on
        every call. The object is never replaced (loading copies into its tensors), so the
        flat reference cannot go stale; it is not a registered child, so ``state_dict`` and
        ``named_modules`` list the node once."""
        name = self.flat_names.get(key)
        if name is None:
            base = "pfa_fb_" + re.sub(r"\W", "_", key)
            name, i = base, 1
            while hasattr(self.gm, name):
                name, i = f"{base}_{i}", i + 1
            self.gm.__dict__[name] = self.made[key]
            self.flat_names[key] = name
        return graph.get_attr(name)

    def _rewrite_module_call(self, graph: fx.Graph, node: fx.Node, m: nn.Module) -> None:
        groups = getattr(m, "groups", 1)
        transposed = isinstance(m, _TRANSPOSED_MODULES)
        fb = self.node_for(node.target, m.weight, groups, m, transposed=transposed)
        if fb is None:
            return
        x = node.args[0] if node.args else node.kwargs["input"]
        with graph.inserting_before(node):
            # the module once, then its weight and bias: one attribute chain per op, not three
            # (each level of a chain is an nn.Module.__getattr__ on every call)
            mod = graph.get_attr(node.target)
            w = graph.call_function(getattr, (mod, "weight"))
            b = graph.call_function(getattr, (mod, "bias")) if m.bias is not None else None
            f = self._feedback_attr(graph, node.target)
            if isinstance(m, nn.Linear):
                new = graph.call_function(ops.feedback_linear, (x, w, b, f))
            elif transposed:
                # output_padding as nn.ConvTranspose*d computes it (from output_size if given)
                size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
                out_pad = m.output_padding
                if size is not None:
                    out_pad = graph.call_function(_transposed_output_padding, (mod, x, size))
                args = (x, w, b, f, m.stride, m.padding, out_pad, m.groups, m.dilation)
                new = graph.call_function(ops.feedback_conv_transpose, args)
            else:
                padding = m.padding
                if m.padding_mode != "zeros":
                    # nn.Conv*d pads explicitly for these modes, then convolves unpadded
                    x = graph.call_function(F.pad, (x, m._reversed_padding_repeated_twice), {"mode": m.padding_mode})
                    padding = 0
                new = graph.call_function(ops.feedback_conv, (x, w, b, f, m.stride, padding, m.dilation, m.groups))
        _replace_call(graph, node, new, fb)

    def _rewrite_function_call(self, graph: fx.Graph, node: fx.Node) -> None:
        is_linear = node.target in _LINEAR_FNS
        transposed = node.target in _CONV_T_FNS
        names = ("input", "weight", "bias") if is_linear else _CONV_T_ARGS if transposed else _CONV_ARGS
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        if not is_linear:
            for k, v in (_CONV_T_DEFAULTS if transposed else _CONV_DEFAULTS).items():
                bound.setdefault(k, v)
        bound.setdefault("bias", None)
        w_node = bound["weight"]
        param_path = _source_parameter(self.gm, w_node)
        scope = node.meta.get("pfa_scope", "")
        owner = _get_module(self.root, scope)
        if param_path is None:
            # weight not derived from a parameter (e.g. computed from the input): its shape
            # is unknown before a forward, so it stays on BP and the report says so.
            self.skipped[f"{scope}:{node.name}"] = "weight is not computed from a parameter"
            return
        weight = self.gm.get_parameter(param_path) if _is_param(self.gm, param_path) else self.gm.get_buffer(param_path)
        key = param_path[: -len(".weight")] if param_path.endswith(".weight") else param_path
        groups = bound.get("groups", 1)
        if not isinstance(groups, int):
            # e.g. CondConv: one kernel per sample, mixed from experts by input-dependent
            # routing; its feedback would have to be mixed the same way
            self.skipped[key] = "groups is computed at run time (a per-sample kernel, e.g. CondConv)"
            return
        fb = self.node_for(key, weight, groups, owner, transposed=transposed)
        if fb is None:
            return
        if not fb._weight_fn and (fn := _weight_function(self.gm, w_node, fb.weight_shape)) is not None:
            fb._weight_fn = [fn]
        with graph.inserting_before(node):
            f = self._feedback_attr(graph, key)
            if is_linear:
                new = graph.call_function(ops.feedback_linear, (bound["input"], w_node, bound["bias"], f))
            elif transposed:
                rest = tuple(bound[k] for k in _CONV_T_ARGS[3:])
                new = graph.call_function(
                    ops.feedback_conv_transpose, (bound["input"], w_node, bound["bias"], f, *rest)
                )
            else:
                new = graph.call_function(
                    ops.feedback_conv,
                    (
                        bound["input"],
                        w_node,
                        bound["bias"],
                        f,
                        bound["stride"],
                        bound["padding"],
                        bound["dilation"],
                        groups,
                    ),
                )
        _replace_call(graph, node, new, fb)

    def _rewrite_matmul_with_parameter(self, graph: fx.Graph, node: fx.Node) -> None:
        """``x @ Pᵀ`` with a 2-D parameter ``P`` (the relative-position tables of
        BoTNet/HaloNet attention) is ``F.linear(x, P)``, and ``x @ P`` (SwiftFormer's
        ``q @ w_g``) is ``F.linear(x, Pᵀ)``: the error to ``x`` runs through ``P``, so it
        gets feedback like any weight, held as ``(out, in)`` as nn.Linear holds its own."""
        if len(node.args) != 2 or node.kwargs:
            return
        x, operand = node.args
        if not isinstance(operand, fx.Node):
            return
        src, pt = operand, None
        if operand.op == "call_method" and len(operand.users) == 1:
            is_t = operand.target == "t" and len(operand.args) == 1
            is_transpose = (
                operand.target == "transpose"
                and len(operand.args) == 3
                and {operand.args[1], operand.args[2]} in ({-1, -2}, {0, 1})
            )
            if not (is_t or is_transpose):
                return
            src, pt = operand.args[0], operand
        if not (isinstance(src, fx.Node) and src.op == "get_attr"):
            return
        param = _attr(self.gm, src.target)
        if not isinstance(param, nn.Parameter) or param.dim() != 2:
            return
        key = src.target[: -len(".weight")] if src.target.endswith(".weight") else src.target
        made = self.made.get(key)
        if made is not None and made.param_transposed != (pt is None):
            # a square P would pass the shape check and get the other orientation's feedback
            raise ConversionError(
                f"parameter '{src.target}' is used both as x @ P and as x @ P.T (or as a Linear weight); "
                "one feedback state cannot serve both orientations"
            )
        weight = param if pt is not None else param.t()
        fb = self.node_for(key, weight, 1, _get_module(self.root, src.target.rpartition(".")[0]))
        if fb is None:
            return
        if pt is None:
            fb._weight_ref = [param]  # the parameter itself: follows .to() and loads
            fb.param_transposed = True
        with graph.inserting_before(node):
            w = src if pt is not None else graph.call_method("t", (src,))
            new = graph.call_function(ops.feedback_linear, (x, w, None, self._feedback_attr(graph, key)))
        _replace_call(graph, node, new, fb)
        if pt is not None:
            graph.erase_node(pt)

    def _rewrite_opaque_call(self, graph: fx.Graph, node: fx.Node, hidden: list[_Hidden]) -> None:
        """Weights used inside code tracing keeps opaque: route their ops at run time."""
        path = "opaque module" if node.op == "call_module" else "opaque function"
        routes = [(h.param_path, h.key) for h in hidden if self.node_for_hidden(h, path)]
        if not routes:
            return
        with graph.inserting_before(node):
            pairs = tuple((graph.get_attr(path), key) for path, key in routes)
            ns = graph.get_attr(NAMESPACE)
            if node.op == "call_module":
                args = (graph.get_attr(node.target), ns, pairs, *node.args)
                new = graph.call_function(intercept.call_with_feedback, args, dict(node.kwargs))
            else:
                new = graph.call_function(intercept.routed(node.target), (ns, pairs, *node.args), dict(node.kwargs))
        _replace_call(graph, node, new)


class _Hidden(NamedTuple):
    param_path: str
    key: str
    weight: torch.Tensor
    groups: int
    owner: nn.Module
    transposed: bool = False
    bank: torch.Tensor | None = None  # an expert bank's parameter (``weight`` is its kernel view)


def _replace_call(graph: fx.Graph, old: fx.Node, new: fx.Node, fb: FeedbackNode | None = None) -> None:
    """``new`` takes ``old``'s place (uses and metadata). A feedback op whose node's backward
    cannot be traced ahead of time (``FeedbackNode.traceable_backward``: DFA) calls the op's
    version that torch.compile leaves out of its graphs."""
    if fb is not None and not fb.traceable_backward:
        new.target = ops.BETWEEN_GRAPHS[new.target]
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)


def _hidden_weights(m: nn.Module, path: str) -> list[_Hidden]:
    """Weight-op weights inside a module that stays opaque: Linear/Conv weights and
    ``nn.MultiheadAttention``'s input projections."""
    found = []
    for rel, sub in m.named_modules():
        base = ".".join(p for p in (path, rel) if p)
        prefix = f"{base}." if base else ""
        if (bank := _expert_bank_shape(sub)) is not None:
            # a bank of expert kernels (timm's CondConv2d), held as kernels: one feedback
            # state per expert, block-diagonal over experts (and groups) like a grouped conv
            kernels = sub.weight.detach().reshape(bank)
            groups = sub.num_experts * getattr(sub, "groups", 1)
            found.append(_Hidden(f"{prefix}weight", base or "weight", kernels, groups, sub, False, sub.weight))
        elif isinstance(sub, WEIGHT_MODULES) and isinstance(sub.weight, torch.Tensor):
            groups, transposed = getattr(sub, "groups", 1), isinstance(sub, _TRANSPOSED_MODULES)
            found.append(_Hidden(f"{prefix}weight", base or "weight", sub.weight, groups, sub, transposed))
        if isinstance(sub, nn.MultiheadAttention):
            for name in _MHA_WEIGHTS:
                p = getattr(sub, name, None)
                if isinstance(p, torch.Tensor):
                    found.append(_Hidden(f"{prefix}{name}", f"{prefix}{name}", p, 1, sub))
    return found


def _expert_bank_shape(m: nn.Module) -> tuple[int, ...] | None:
    """``(experts·out, in/g, *k)`` for a module holding a bank of flattened expert kernels
    ``(experts, out·in/g·k…)`` mixed per sample (timm's CondConv2d), else None."""
    shape, experts, w = getattr(m, "weight_shape", None), getattr(m, "num_experts", None), getattr(m, "weight", None)
    if not (isinstance(shape, tuple) and isinstance(experts, int) and isinstance(w, nn.Parameter)):
        return None
    if w.dim() != 2 or tuple(w.shape) != (experts, math.prod(shape)):
        return None
    return (experts * shape[0], *shape[1:])


def _weights_passed_to(gm: nn.Module, node: fx.Node) -> list[_Hidden]:
    """Weight-op weights handed as arguments to an opaque (FX-wrapped) function."""
    found: list[_Hidden] = []
    for arg in node.all_input_nodes:
        if arg.op != "get_attr":
            continue
        mod_path, _, name = arg.target.rpartition(".")
        owner = _get_module(gm, mod_path)
        if owner is None:
            continue
        if (isinstance(owner, WEIGHT_MODULES) and name == "weight") or (
            isinstance(owner, nn.MultiheadAttention) and name in _MHA_WEIGHTS
        ):
            key = mod_path if name == "weight" else arg.target
            transposed = isinstance(owner, _TRANSPOSED_MODULES)
            found.append(
                _Hidden(arg.target, key, _attr(gm, arg.target), getattr(owner, "groups", 1), owner, transposed)
            )
    return found


def _transposed_output_padding(m: nn.Module, x: torch.Tensor, output_size: Any) -> list[int]:
    """``output_padding`` of ``m(x, output_size)``, computed as ``nn.ConvTranspose*d`` does."""
    n = m.weight.dim() - 2
    return m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, n, m.dilation)


def _is_param(gm: nn.Module, path: str) -> bool:
    mod_path, _, name = path.rpartition(".")
    return name in _get_module(gm, mod_path)._parameters


def _get_module(gm: nn.Module, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path) if path else gm
    except AttributeError:
        return None


def _source_parameter(gm: nn.Module, w_node: Any, max_depth: int = 12) -> str | None:
    """The parameter a (possibly computed) weight comes from: the ≥2-D tensor attribute
    upstream of it, preferring one named like a weight (e.g. StdConv2d's ``weight``
    over ScaledStdConv2d's ``gain``)."""
    if not isinstance(w_node, fx.Node):
        return None
    found: list[str] = []
    frontier, seen = [w_node], set()
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                t = _attr(gm, n.target)
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    found.append(n.target)
                continue
            if n.op == "placeholder":
                continue
            nxt += [a for a in n.all_input_nodes]
        frontier = nxt
        if not frontier:
            break
    if not found:
        return None
    found = list(dict.fromkeys(found))
    named = [p for p in found if p.rsplit(".", 1)[-1].endswith("weight")]
    pool = named or found
    return max(pool, key=lambda p: _attr(gm, p).numel())


def _weight_function(gm: nn.Module, w_node: Any, shape: tuple[int, ...]) -> fx.GraphModule | None:
    """A computed weight (e.g. StdConv2d's standardized kernel) as a function of the model's
    tensors alone: the graph's nodes upstream of ``w_node``, copied into a small
    GraphModule that reads the same parameter objects. ``node.weight`` evaluates it, so
    :func:`pfa_fx.alignment` sees the weight the next forward will use, also before any
    forward (after loading a checkpoint) and after an optimizer step. None for a plain
    parameter, and where the weight depends on the input or on a module call."""
    if not isinstance(w_node, fx.Node) or w_node.op == "get_attr":
        return None
    upstream, stack = set(), [w_node]
    while stack:
        n = stack.pop()
        if n in upstream:
            continue
        if n.op not in ("get_attr", "call_function", "call_method"):
            return None  # the input, or a module with state of its own
        if n.op == "get_attr" and not isinstance(_attr(gm, n.target), nn.Parameter):
            return None  # a buffer: .to() replaces it, so a copy of its reference would go stale
        upstream.add(n)
        stack += n.all_input_nodes
    graph, env = fx.Graph(), {}
    holder = nn.Module()
    for n in w_node.graph.nodes:  # graph order is a topological order
        if n in upstream:
            env[n] = graph.node_copy(n, env.__getitem__)
            if n.op == "get_attr":
                fx.graph_module._copy_attr(gm, holder, n.target)
    graph.output(env[w_node])
    fn = fx.GraphModule(holder, graph, "ComputedWeight")
    try:
        with torch.no_grad():
            out = fn()
    except Exception:  # any failure: the op's last forward weight serves instead
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape):
        return None
    return fn


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for item in target.split("."):
        obj = getattr(obj, item)
    return obj


def _set_path(root: nn.Module, key: str, node: nn.Module) -> None:
    *parents, leaf = key.split(".")
    mod = root
    for p in parents:
        child = getattr(mod, p, None)
        if child is None:
            child = nn.Module()
            mod.add_module(p, child)
        mod = child
    existing = mod._modules.get(leaf)
    if existing is not None:
        # a container made earlier for a nested key: keep its children under the node
        for name, child in existing.named_children():
            node.add_module(name, child)
    mod.add_module(leaf, node)


# ------------------------------------------------------------------------ public API
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
    _check_spec(rule, rule_options)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConversionTypeError(f"seed must be an int, got {seed!r}")
    converted, root, rewriter = _build(model, rule, rule_options, seed, fallback)
    problems = _mapping_problems(rule, rewriter.owners)
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
    _, _, rewriter = _build(model, {}, {}, 0, fallback)  # an empty mapping: every op stays native
    return list(rewriter.owners)


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
) -> tuple[nn.Module, nn.Module, _Rewriter]:
    """The conversion itself: ``(converted model, traced copy, rewriter)``. Warnings are
    attributed to the caller of ``convert`` / ``op_names`` (stacklevel 3)."""
    was_training = model.training
    root = copy.deepcopy(model)
    leaf_paths: dict[str, str] = {}
    try:
        root.train(True)
        train_graph = _trace(root, leaf_paths, fallback)
        root.train(False)
        eval_graph = _trace(root, leaf_paths, fallback)
        if leaf_paths:  # a leaf found in eval mode must be a leaf in train mode too
            root.train(True)
            train_graph = _trace(root, leaf_paths, fallback)
    except TraceError as err:
        if not fallback:
            raise
        # the trace error ends without a full stop (it quotes the exception): add one
        warnings.warn(
            f"pfa_fx: {str(err).rstrip('. ')}. The whole forward runs eagerly instead, with every "
            "Linear/Conv/attention weight op intercepted at run time (no GraphModule).",
            stacklevel=3,
        )
        root.train(was_training)
        converted, rewriter = _convert_eagerly(root, rule, rule_options, seed, err.reason)
        return converted, root, rewriter
    root.train(was_training)
    for path, reason in leaf_paths.items():
        m = root.get_submodule(path)
        warnings.warn(
            f"pfa_fx: module '{path}' ({type(m).__qualname__}) cannot be traced by torch.fx ({reason}); "
            "it runs as one opaque call whose weight ops are intercepted at run time.",
            stacklevel=3,
        )
    if _same_code(train_graph, eval_graph):
        eval_graph = train_graph

    gm = ConvertedModule(root, train_graph, eval_graph, type(model).__name__)
    rewriter = _Rewriter(gm, root, rule, dict(rule_options), seed)
    for graph in {id(g): g for g in (train_graph, eval_graph)}.values():
        rewriter.rewrite(graph)
    gm.train(was_training)
    gm.recompile()
    gm.pfa_fallbacks = dict(leaf_paths)
    gm.pfa_kept_native = sorted(rewriter.kept_native)
    gm.pfa_skipped = dict(rewriter.skipped)
    _attach_rules(gm)
    from .checkpoint import _watch_checkpoints

    _watch_checkpoints(gm)
    return gm, root, rewriter


def _attach_rules(model: nn.Module) -> None:
    """The pass's one hook for rules: each rule class present gets the model and its nodes
    once (``FeedbackNode.attach``), for what a rule needs beyond its ops."""
    by_class: dict[type[FeedbackNode], list[tuple[str, FeedbackNode]]] = {}
    for name, node in feedback_modules(model):
        by_class.setdefault(type(node), []).append((name, node))
    for cls, nodes in by_class.items():
        cls.attach(model, nodes)


def _eager_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Forward of a model converted without a graph: the class's own forward, with every
    routed weight op made feedback-aware at run time."""
    namespace = getattr(self, NAMESPACE)
    routes = tuple((self.get_parameter(path), key) for path, key in self.pfa_routes)
    return intercept.call_with_feedback(
        lambda *a, **k: type(self).forward(self, *a, **k), namespace, routes, *args, **kwargs
    )


def _convert_eagerly(
    root: nn.Module, spec: Any, options: Mapping[str, Any], seed: int, reason: str
) -> tuple[nn.Module, _Rewriter]:
    """Fallback for a model whose own forward cannot be traced: keep its class, add the
    feedback namespace, and run its forward under weight-op interception."""
    rewriter = _Rewriter(root, root, spec, dict(options), seed)
    routes = []
    for h in _hidden_weights(root, ""):
        if rewriter.node_for_hidden(h, "eager") is not None:
            routes.append((h.param_path, h.key))
    root.pfa_routes = tuple(routes)
    root.pfa_fallbacks = {"": reason}
    root.pfa_kept_native = sorted(rewriter.kept_native)
    root.pfa_skipped = {}
    from .checkpoint import _eager_load_state_dict, _watch_checkpoints

    root.forward = types.MethodType(_eager_forward, root)
    root.load_state_dict = types.MethodType(_eager_load_state_dict, root)
    _attach_rules(root)
    _watch_checkpoints(root)
    return root, rewriter


def _check_strict(root: nn.Module, converted: nn.Module, strict: bool) -> None:
    """With ``strict``, every weight-op weight must have feedback or be kept on BP on purpose."""
    if not strict:
        return
    problems = [f"{k}: {why}" for k, why in getattr(converted, "pfa_skipped", {}).items()]
    made = {name for name, _ in feedback_modules(converted)} | set(converted.pfa_kept_native)
    for h in _hidden_weights(root, ""):
        if h.key not in made and not h.key.startswith(NAMESPACE):
            problems.append(f"{h.param_path}: never reached by a converted op")
    if problems:
        raise ConversionError("strict=True: these weight ops would stay on BP:\n  " + "\n  ".join(problems))


def _same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return a.python_code("self").src == b.python_code("self").src


def feedback_modules(model: nn.Module) -> Iterator[tuple[str, FeedbackNode]]:
    """Yield ``(op name, node)`` for every converted weight op of ``model``.

    ``node.rule`` is the rule name, ``node.config`` the options it was converted with,
    ``node.weight`` the forward weight and ``node.feedback_weight()`` the ``W_b`` the
    backward uses now.
    """
    marker = NAMESPACE + "."
    for name, m in model.named_modules():
        if isinstance(m, FeedbackNode):
            i = name.find(marker)
            yield (name[i + len(marker) :] if i >= 0 else name), m


__all__ = [
    "RULES",
    "ConversionError",
    "ConvertedModule",
    "TraceError",
    "convert",
    "feedback_modules",
    "op_names",
]
