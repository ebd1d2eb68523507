"""The Hugging Face coverage sweep's checks of one model: converted with each rule (the
model's own batch as ``example_inputs``), then

1. the eval- and train-mode forwards compared leaf by leaf with the native model's;
2. ``weights_on_backprop`` on the sum of the train-mode outputs' means (every ≥ 2-D
   parameter still trained through a standard matmul/conv backward);
3. one training step: task loss, backward, finite gradients, ``torch.optim.SGD`` step,
   and a second forward with the stepped weights (rule hooks run after the step);
4. under ``bp``: every gradient against the native model's on the same batch.

One CSV row per rule (``check_rule``, ``check_spec``); a failure records its stage, the
exception's first line and the frame it came from (``where``)."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import random
import re
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import pfa_fx
from pfa_fx.audit import STANDARD_WEIGHT_OPS

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_check import compare_outputs, summarize_report, tensor_leaves
    from _coverage_models import first_line
    from _coverage_rows import Status, revision
    from _hf_models import SPEC_BY_NAME, BuiltHF, SkipModel, Spec, build, call_options, task_loss
    from _shared import weights_on_backprop
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_check import compare_outputs, summarize_report, tensor_leaves
    from benchmarks._coverage_models import first_line
    from benchmarks._coverage_rows import Status, revision
    from benchmarks._hf_models import SPEC_BY_NAME, BuiltHF, SkipModel, Spec, build, call_options, task_loss
    from benchmarks._shared import weights_on_backprop

SOURCE = "hf"
#: bp's gradients count as equal to the native model's below this max abs difference,
#: relative to the largest native gradient entry (float32 rounding of reordered sums)
GRAD_RTOL = 1e-5
GRAD_MISMATCH = "grad_mismatch"  # a status of bp rows only
SKIPPED = "skipped"  # a model the sweep does not run (it needs inputs besides token ids): the reason says why
LR = 0.01

FIELDS = [
    "source",
    "model",
    "model_type",
    "head",
    "class",
    "rule",
    "capture",
    "status",
    "reason",
    "where",
    "params_k",
    "weights_2d",
    "ops_converted",
    "front_end",
    "capture_warning",
    "eval_equal",
    "train_equal",
    "left_on_bp",
    "left_params",
    "unlisted_on_bp",
    "loss",
    "grads_finite",
    "step_ok",
    "grad_max_diff",
    "grad_rel_diff",
    "build_s",
    "convert_s",
    "check_s",
    "report",
    "pfa_fx_rev",
    "timestamp",
]
#: a failing check's status, most severe first (a row gets the first that applies)
SEVERITY = (
    Status.CONVERSION_ERROR,
    Status.CHECK_ERROR,
    Status.FORWARD_CHANGED,
    Status.LEFT_ON_BP,
    Status.NONFINITE_GRAD,
    GRAD_MISMATCH,
)


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with revision and timestamp, in ``FIELDS`` (blank where it has none)."""
    row.setdefault("source", SOURCE)
    row.setdefault("pfa_fx_rev", revision())
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {k: row.get(k, "") for k in FIELDS}


def where(exc: BaseException, stage: str) -> str:
    """``stage: file:line function`` of the deepest frame of ``exc``'s traceback inside
    pfa_fx, else inside transformers, else the deepest frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    for marker in ("/pfa_fx/", "/transformers/"):
        inside = [f for f in frames if marker in f.filename]
        if inside:
            f = inside[-1]
            return f"{stage}: {marker.strip('/')}/{f.filename.split(marker, 1)[1]}:{f.lineno} {f.name}"
    if frames:
        f = frames[-1]
        return f"{stage}: {f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
    return stage


#: autograd nodes that multiply by an operand (matmul, grouped mm, convolution, einsum, custom ops);
#: not attention (scaled_dot_product_attention's mask operand is added, e.g. BEiT's position bias)
#: nor interpolation (``UpsampleBilinear2d``: BEiT resizes its position-bias table)
_PRODUCT = re.compile(r"(?i)^(?!upsample)(.*((?<!cu)mm|matmul|conv|linear|einsum)|GeneratedBackwardFor_)")
#: autograd nodes that only select, re-lay or cast a tensor: a parameter behind them is still the operand
_PASS = re.compile(
    r"^(T|Transpose|Permute|View|UnsafeView|ReshapeAlias|Expand|ToCopy|Clone|Slice|Split|SplitWithSizes|Unbind"
    r"|Select|Index|Alias|Unsqueeze|Squeeze|Contiguous)Backward\d*$"
)


def unlisted_products(output: Tensor, model: nn.Module, listed: Collection[str] = ()) -> list[str]:
    """``"param (node)"`` for every >= 2-D parameter (feedback state aside, and the ``listed``
    ones the audit already named) that is an operand of a matrix-product-like autograd node
    that ``weights_on_backprop`` does not list (a custom op's backward, ``grouped_mm``):
    weights on BP the audit cannot see."""
    params = {id(p): n for n, p in model.named_parameters() if p.dim() >= 2 and "pfa_feedback." not in n}
    found: dict[str, str] = {}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        name = type(fn).__name__
        if name not in STANDARD_WEIGHT_OPS and not name.startswith("_Feedback") and _PRODUCT.search(name):
            for nxt, _ in fn.next_functions:
                param = _param_behind(nxt, params)
                if param is not None:
                    found.setdefault(param, name)
        stack += [nxt for nxt, _ in fn.next_functions]
    return [f"{p} ({op})" for p, op in sorted(found.items()) if p not in listed]


def _param_behind(fn: Any, params: Mapping[int, str], depth: int = 8) -> str | None:
    for _ in range(depth):
        if fn is None:
            return None
        var = getattr(fn, "variable", None)
        if var is not None:
            return params.get(id(var))
        nexts = [n for n, _ in fn.next_functions if n is not None]
        if not _PASS.match(type(fn).__name__) or len(nexts) != 1:
            return None
        fn = nexts[0]
    return None


def _front_ends(gm: nn.Module) -> str:
    """Converted ops counted by front end: ``"9 export graph"``, ``"2 eager; 7 graph"``."""
    paths = Counter(getattr(node, "conversion_path", "graph") for _, node in pfa_fx.feedback_modules(gm))
    return "; ".join(f"{n} {p}" for p, n in sorted(paths.items()))


def _pfa_warning(caught: Sequence[warnings.WarningMessage]) -> str:
    """The first pfa_fx warning of the conversion on one line (why a front end was given up,
    what stays on BP), else empty."""
    for w in caught:
        text = str(w.message)
        if text.startswith("pfa_fx:"):
            return " ".join(text.split())[:300]
    return ""


def _forward(model: nn.Module, built: BuiltHF, train: bool, seed: int) -> Any:
    model.train(train)
    # the same dropout masks (and wav2vec2's numpy SpecAugment masks) for both models
    torch.manual_seed(seed + 2)
    np.random.seed(seed + 2)
    random.seed(seed + 2)
    return model(**built.inputs, **call_options(model))


def _grad_diff(native: nn.Module, gm: nn.Module) -> tuple[float, float, str]:
    """Max abs difference of every native gradient to the converted model's (same names),
    that over the largest native gradient entry, and the parameter where it is largest."""
    conv = dict(gm.named_parameters())
    worst, where_, scale = 0.0, "", 0.0
    for name, p in native.named_parameters():
        q = conv.get(name)
        if p.grad is None and (q is None or q.grad is None):
            continue
        if p.grad is None or q is None or q.grad is None:
            return math.inf, math.inf, f"{name}: gradient on one side only"
        scale = max(scale, p.grad.abs().max().item())
        d = (p.grad.double() - q.grad.double()).abs().max().item()
        if d > worst:
            worst, where_ = d, name
    return worst, worst / scale if scale else 0.0, where_


def check_rule(
    built: BuiltHF, rule: str, opts: Mapping[str, Any], seed: int = 0, capture: str = "auto"
) -> dict[str, Any]:
    """Convert ``built.model`` with ``rule`` (through ``capture``, pfa_fx's front-end choice)
    and run the checks; one row (minus the model's identity columns)."""
    model = built.model
    row: dict[str, Any] = {"rule": rule, "capture": capture}
    problems: list[tuple[str, str]] = []
    stage = "convert"
    t0 = time.perf_counter()
    gm = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = pfa_fx.convert(model, rule, seed=seed, capture=capture, example_inputs=built.inputs, **opts)
        row["convert_s"] = round(time.perf_counter() - t0, 2)
        row["capture_warning"] = _pfa_warning(caught)
        row["front_end"] = _front_ends(gm)
        row["ops_converted"] = len(list(pfa_fx.feedback_modules(gm)))
        why_left: dict[str, str] = {}
        with contextlib.suppress(Exception):
            rep = pfa_fx.report(gm)
            row["report"] = summarize_report(rep)
            why_left = {p.name: p.reason for p in rep.left_alone}
    except Exception as exc:
        row.update(status=Status.CONVERSION_ERROR, reason=first_line(exc), where=where(exc, stage))
        row["convert_s"] = round(time.perf_counter() - t0, 2)
        return row

    t1 = time.perf_counter()
    try:
        stage = "eval forward"
        diffs = {}
        for train in (False, True):  # train last: its graph feeds the audit and the step
            ref = _forward(model, built, train, seed)
            out = _forward(gm, built, train, seed)
            diffs[train] = compare_outputs(ref, out)
            stage = "train forward"
        row["eval_equal"], row["train_equal"] = diffs[False] is None, diffs[True] is None
        for train, name in ((False, "eval"), (True, "train")):
            if diffs[train] is not None:
                problems.append((Status.FORWARD_CHANGED, f"{name} forward changed: {diffs[train]}"))

        stage = "audit"
        leaves = [t for t in tensor_leaves(out) if t.is_floating_point() and t.requires_grad]
        scalar = sum(t.float().mean() for t in leaves)
        left = weights_on_backprop(scalar, gm)
        row["left_on_bp"], row["left_params"] = len(left), " ".join(left)
        if left:
            problems.append((Status.LEFT_ON_BP, f"{len(left)} weight(s) left on BP: {', '.join(left[:4])}"))
        unlisted = unlisted_products(scalar, gm, left)
        row["unlisted_on_bp"] = " ".join(unlisted)
        if unlisted:
            problems.append(
                (
                    Status.LEFT_ON_BP,
                    f"{len(unlisted)} weight(s) on BP through ops weights_on_backprop does not list: "
                    + ", ".join(unlisted[:2]),
                )
            )
        del scalar
        if left or unlisted:  # what pfa_fx.report says of the first one
            first = (left or unlisted)[0].split(" (")[0]
            row["where"] = f"report(): {first}: {why_left.get(first, 'not listed among the parameters left alone')}"

        stage = "backward"
        loss = task_loss(out, built.targets)
        row["loss"] = loss.item()
        loss.backward()
        bad = [n for n, p in gm.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        row["grads_finite"] = math.isfinite(loss.item()) and not bad
        if not row["grads_finite"]:
            problems.append((Status.NONFINITE_GRAD, f"loss {loss.item():.4g}; non-finite grad in {bad[:3]}"))
        if rule == "bp":
            stage = "native backward"
            model.zero_grad(set_to_none=True)
            task_loss(ref, built.targets).backward()
            diff, rel, at = _grad_diff(model, gm)
            row["grad_max_diff"], row["grad_rel_diff"] = diff, rel
            if not rel <= GRAD_RTOL:
                problems.append(
                    (GRAD_MISMATCH, f"bp gradients differ from native: max {diff:.3g} ({rel:.3g} rel) at {at}")
                )

        stage = "optimizer step"
        del out, ref, loss
        opt = torch.optim.SGD(gm.parameters(), lr=LR)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stage = "forward after step"
        again = task_loss(_forward(gm, built, True, seed), built.targets)
        stepped = all(torch.isfinite(p).all() for p in gm.parameters())
        row["step_ok"] = bool(stepped and math.isfinite(again.item()))
        if not row["step_ok"]:
            problems.append((Status.NONFINITE_GRAD, f"after one SGD step: loss {again.item():.4g}, finite={stepped}"))
    except Exception as exc:
        problems.insert(0, (Status.CHECK_ERROR, first_line(exc)))
        row["where"] = where(exc, stage)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        del gm
        gc.collect()
    row["check_s"] = round(time.perf_counter() - t1, 2)
    if problems:
        row["status"] = min((p[0] for p in problems), key=SEVERITY.index)
        row["reason"] = "; ".join(p[1] for p in problems)
    else:
        row["status"], row["reason"] = Status.PASS, ""
    return row


def rule_options(rule: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``opts`` that ``rule`` accepts."""
    accepted = set(pfa_fx.RULES[rule].options) if rule in pfa_fx.RULES else set()
    return {k: v for k, v in opts.items() if k in accepted}


def check_spec(
    spec: Spec | str,
    rules: Sequence[str],
    opts: Mapping[str, Any] | None = None,
    seed: int = 0,
    capture: str = "auto",
) -> Iterator[dict[str, Any]]:
    """Build one model and yield a complete CSV row per rule, as each finishes."""
    spec = SPEC_BY_NAME[spec] if isinstance(spec, str) else spec
    base = {"model": spec.name, "model_type": spec.model_type, "head": spec.head, "class": spec.cls or ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = build(spec, seed)
    except Exception as exc:
        status = SKIPPED if isinstance(exc, SkipModel) else Status.BUILD_ERROR
        for rule in rules:
            reason = str(exc) if status == SKIPPED else first_line(exc)
            at = "" if status == SKIPPED else where(exc, "build")
            yield finish_row({**base, "rule": rule, "status": status, "reason": reason, "where": at})
        return
    base.update(
        {
            "class": type(built.model).__name__,
            "params_k": round(built.params / 1e3, 1),
            "build_s": round(built.build_s, 2),
        }
    )
    base["weights_2d"] = sum(p.dim() >= 2 for p in built.model.parameters())
    for rule in rules:
        try:
            row = check_rule(built, rule, rule_options(rule, opts or {}), seed, capture)
        except Exception as exc:  # a bug in this script, not in the model: keep going
            row = {"rule": rule, "status": Status.CHECK_ERROR, "reason": f"harness: {first_line(exc)}"}
        yield finish_row({**base, **row})


def dumps(row: Mapping[str, Any]) -> str:
    """A row as one JSON line (non-finite floats as strings)."""
    return json.dumps({k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
