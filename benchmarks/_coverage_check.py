"""The coverage sweep's checks of one model: converted with each rule, its forward compared
leaf by leaf with the original's in eval and train mode, ``weights_on_backprop`` empty and
every gradient finite; one CSV row per rule (``check_model``, ``check_rule``)."""

from __future__ import annotations

import functools
import gc
import json
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_models import BATCH, BuildError, Built, build_model, estimate_params, first_line
    from _coverage_rows import Status, finish_row
    from _shared import WEIGHT_MODULES, weights_on_backprop
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_models import BATCH, BuildError, Built, build_model, estimate_params, first_line
    from benchmarks._coverage_rows import Status, finish_row
    from benchmarks._shared import WEIGHT_MODULES, weights_on_backprop

PFA_RULES = ("pfa", "pfa-o")


def tensor_leaves(obj: Any) -> list[Tensor]:
    """Every tensor in a (nested) tuple / list / namedtuple / dict / dataclass-like output."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for k in obj for t in tensor_leaves(obj[k])]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensor_leaves(v)]
    if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        return [t for v in vars(obj).values() for t in tensor_leaves(v)]
    return []


def structure(obj: Any) -> Any:
    """The container shape of an output (types and keys), without the tensors."""
    if isinstance(obj, Tensor):
        return "T"
    if isinstance(obj, Mapping):
        return (type(obj).__name__, tuple((k, structure(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(structure(v) for v in obj))
    return type(obj).__name__


def compare_outputs(ref: Any, out: Any) -> str | None:
    """None when every tensor leaf is ``torch.equal``; else what differs."""
    if structure(ref) != structure(out):
        return f"output structure {structure(out)} != {structure(ref)}"
    a, b = tensor_leaves(ref), tensor_leaves(out)
    for i, (r, o) in enumerate(zip(a, b)):
        if r.shape != o.shape or r.dtype != o.dtype:
            return f"leaf {i}: {tuple(o.shape)} {o.dtype} != {tuple(r.shape)} {r.dtype}"
        if not torch.equal(r, o):
            diff = (r.double() - o.double()).abs().max().item() if r.is_floating_point() else float("nan")
            return f"leaf {i} of {len(a)} differs (max abs diff {diff:.3g})"
    return None


def conversion_path(gm: nn.Module) -> str:
    """``traced`` (one graph), ``fallback`` (some submodules run opaque, their ops
    intercepted) or ``eager`` (the whole forward intercepted, no graph), from what the
    converted module exposes; ``traced`` for a pfa_fx that exposes nothing."""
    explicit = getattr(gm, "conversion_path", None)
    if isinstance(explicit, str):
        return explicit
    fallbacks = getattr(gm, "pfa_fallbacks", None) or {}
    if "" in fallbacks:
        return "eager"
    return "fallback" if fallbacks else "traced"


def summarize_report(rep: Any, limit: int = 300) -> str:
    """One line from ``pfa_fx.report(gm)``: op counts by path, what was not converted,
    fallbacks, and the >= 2-D parameters left alone (a ``ConversionReport``); else its
    text on one line."""
    ops = getattr(rep, "ops", None)
    if not isinstance(ops, list):
        return _one_line(rep, limit)
    paths = Counter(str(getattr(op, "path", "?")) for op in ops)
    parts = [f"{len(ops)} ops (" + ", ".join(f"{n} {p}" for p, n in sorted(paths.items())) + ")"]
    for label, attr in (("not converted", "not_converted"), ("fallbacks", "fallbacks")):
        items = getattr(rep, attr, None) or {}
        if items:
            parts.append(f"{label}: " + ", ".join(f"{k or '<root>'}" for k in items))
    left = getattr(rep, "left_alone", None) or []
    if left:
        names = [str(getattr(p, "name", p)) for p in left]
        parts.append(f"left alone: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return _one_line("; ".join(parts), limit)


def _one_line(obj: Any, limit: int = 300) -> str:
    if isinstance(obj, Mapping):
        text = json.dumps(obj, default=str)
    else:
        text = str(obj)
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rule_options(rule: str, params: int, opts: Mapping[str, Any], big_params: float, big_opts: Mapping[str, Any]):
    """The options ``rule`` gets: those it accepts from ``opts``, plus ``big_opts`` for the
    PFA rules above ``big_params`` million parameters."""
    accepted = set(pfa_fx.RULES[rule].options) if rule in pfa_fx.RULES else set()
    chosen = {k: v for k, v in opts.items() if k in accepted}
    if rule in PFA_RULES and params > big_params * 1e6:
        chosen.update({k: v for k, v in big_opts.items() if k in accepted})
    return chosen


def _check_grad(name: str, bad: list[str], p: Tensor) -> None:
    if not torch.isfinite(p.grad).all():
        bad.append(name)
    p.grad = None


def check_rule(
    built: Built, rule: str, opts: Mapping[str, Any], seed: int = 0, release_model: bool = False
) -> dict[str, Any]:
    """Convert ``built.model`` with ``rule`` and run every check; one CSV row (minus the
    model identity columns). ``release_model``: the reference outputs are computed first
    and the original model is dropped once converted (one copy fewer in memory; for the
    last rule of a model too large for this machine otherwise)."""
    model = built.model
    row: dict[str, Any] = {"rule": rule, "opts": json.dumps(dict(opts), sort_keys=True) if opts else ""}
    x = torch.randn(BATCH, built.channels, built.size, built.size, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(built.dtype)
    refs: dict[bool, Any] = {}
    if release_model:
        # train-mode forwards update running statistics: put them back before converting
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        # with autograd on, as the converted model runs: some kernels (e.g. CPU attention)
        # take another, numerically different path under no_grad
        for mode in (False, True):
            model.train(mode)
            torch.manual_seed(seed + 2)
            # detached at once: two autograd graphs of a 400 M-parameter model at 546 px
            # do not fit beside it
            refs[mode] = pytree.tree_map_only(Tensor, Tensor.detach, model(x))
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        del buffers
    t0 = time.perf_counter()
    try:
        gm = pfa_fx.convert(model, rule, seed=seed, **opts)
    except Exception as exc:
        row.update(status=Status.CONVERSION_ERROR, reason=first_line(exc), convert_s=round(time.perf_counter() - t0, 2))
        return row
    if release_model:
        built.model = model = None
        gc.collect()
    row["convert_s"] = round(time.perf_counter() - t0, 2)
    row["conversion_path"] = conversion_path(gm)
    row["ops_converted"] = len(list(pfa_fx.feedback_modules(gm)))
    report = getattr(pfa_fx, "report", None)
    if callable(report):
        try:
            row["report"] = summarize_report(report(gm))
        except Exception as exc:
            row["report"] = f"report() raised {first_line(exc)}"

    t1 = time.perf_counter()
    problems: list[tuple[str, str]] = []
    try:
        diffs = {}
        out: Any = None
        for mode in (False, True):  # train last: its graph feeds the audit and backward
            gm.train(mode)
            if release_model:
                ref = refs.pop(mode)
            else:
                model.train(mode)
                torch.manual_seed(seed + 2)
                ref = model(x)
            torch.manual_seed(seed + 2)
            out = gm(x)
            diffs[mode] = compare_outputs(ref, out)
            del ref
            if not mode:
                out = None  # the eval graph goes before the train forward builds its own
        row["eval_equal"], row["train_equal"] = diffs[False] is None, diffs[True] is None
        for mode, name in ((False, "eval"), (True, "train")):
            if diffs[mode] is not None:
                problems.append((Status.FORWARD_CHANGED, f"{name} forward changed: {diffs[mode]}"))
        leaves = [t for t in tensor_leaves(out) if t.is_floating_point() and t.requires_grad]
        if not leaves:
            raise RuntimeError("no output of the converted model requires grad")
        loss = sum(t.float().mean() for t in leaves)
        left = weights_on_backprop(loss, gm)
        row["left_on_bp"] = len(left)
        if left:
            names = ", ".join(left[:4]) + (f" (+{len(left) - 4} more)" if len(left) > 4 else "")
            problems.append((Status.LEFT_ON_BP, f"{len(left)} weight(s) left on BP: {names}"))
        # each gradient is checked as it is accumulated, then dropped: the largest models
        # never hold all their gradients at once
        bad: list[str] = []
        hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(_check_grad, n, bad))
            for n, p in gm.named_parameters()
            if p.requires_grad
        ]
        try:
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
        row["grads_finite"] = not bad
        if bad:
            problems.append((Status.NONFINITE_GRAD, f"non-finite grad in {len(bad)} param(s): {', '.join(bad[:3])}"))
    except Exception as exc:
        problems.insert(0, (Status.CHECK_ERROR, first_line(exc)))
    finally:
        if model is not None:
            model.zero_grad(set_to_none=True)
        del gm
        gc.collect()
    row["check_s"] = round(time.perf_counter() - t1, 2)
    if problems:
        order = {
            s: i
            for i, s in enumerate(
                (Status.CHECK_ERROR, Status.FORWARD_CHANGED, Status.LEFT_ON_BP, Status.NONFINITE_GRAD)
            )
        }
        row["status"] = min((p[0] for p in problems), key=order.__getitem__)
        row["reason"] = "; ".join(p[1] for p in problems)
    else:
        row["status"], row["reason"] = Status.PASS, ""
    return row


def check_model(
    source: str,
    name: str,
    rules: Sequence[str],
    opts: Mapping[str, Any] | None = None,
    big_params: float = 60.0,
    big_opts: Mapping[str, Any] | None = None,
    seed: int = 0,
    lean_params: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Build one model and yield a complete CSV row per rule (as each finishes). Models
    over ``lean_params`` million parameters are checked lean: built in bfloat16, reference
    outputs computed first, the original dropped after the last rule's conversion."""
    opts = dict(opts or {})
    big_opts = {"expansion": 1} if big_opts is None else dict(big_opts)
    base = {"source": source, "model": name}
    lean = lean_params is not None and (estimate_params(source, name) or 0) > lean_params * 1e6
    try:
        built = build_model(source, name, seed, torch.bfloat16 if lean else torch.float32)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, BuildError) else first_line(exc)
        for rule in rules:
            yield finish_row({**base, "rule": rule, "status": Status.BUILD_ERROR, "reason": reason})
        return
    build_kwargs = {**built.kwargs, "dtype": "bfloat16"} if lean else built.kwargs
    base.update(
        input_size=built.size,
        build_kwargs=json.dumps(build_kwargs) if build_kwargs else "",
        params_m=round(built.params / 1e6, 2),
        weight_modules=sum(isinstance(m, WEIGHT_MODULES) for m in built.model.modules()),
        build_s=round(built.build_s, 2),
    )
    for i, rule in enumerate(rules):
        chosen = rule_options(rule, built.params, opts, big_params, big_opts)
        try:
            row = check_rule(built, rule, chosen, seed, release_model=lean and i == len(rules) - 1)
        except Exception as exc:  # a bug in this script, not in the model: keep going
            row = {"rule": rule, "status": Status.CHECK_ERROR, "reason": f"harness: {first_line(exc)}"}
        yield finish_row({**base, **row})
