"""Coverage sweep: every torchvision and timm classification model converts.

For each model and rule, the model is built (``pretrained=False``, ``num_classes=10``) at
the smallest input it accepts from a short list of candidates, converted with
``pfa_fx.convert``, and checked:

* conversion succeeds (else the exception type and first message line are recorded);
* the forward is bit-identical (``torch.equal`` on every tensor leaf of tuple / dict /
  namedtuple outputs) in eval mode, and in train mode under the same RNG seed;
* after a train-mode forward, ``weights_on_backprop(loss, gm)`` is empty, with ``loss`` the
  sum of the means of all output tensor leaves, and every gradient is finite.

Each model runs in its own subprocess (``--one``) under a wall-clock ``--timeout``, so a
hang, a crash or an out-of-memory kill costs one model, not the sweep. Results are
appended to a CSV; a restart skips every (source, model, rule) row already there.
``--summary`` writes a markdown summary, which ``--no-run`` regenerates from the CSV alone.

Usage::

    # every torchvision classification model, rules fa and pfa, two workers
    python benchmarks/coverage.py --source tv --rules fa pfa --jobs 2 --summary
    # every 24th timm model, rule pfa, appended to the same CSV
    python benchmarks/coverage.py --source timm --every 24 --rules pfa --jobs 2 --summary
    # a few models by glob; all six rules
    python benchmarks/coverage.py --filter 'resnet*' --limit 5 --rules bp fa sf kp pfa pfa-o
    # one model in this process, rows printed as JSON (what each worker runs)
    python benchmarks/coverage.py --one tv:swin_t --rules pfa
    # regenerate benchmarks/COVERAGE.md from the CSV without rerunning anything
    python benchmarks/coverage.py --no-run --summary

Large models: above ``--big-params`` million parameters the PFA rules get
``--big-opts`` (default ``expansion=1``: PFA's ``R`` is ``expansion`` times the weight, drawn
in float64); above ``--solo-params`` million a model runs with no other worker beside it,
on all ``--jobs × --threads`` threads.
The options a model got are recorded in the CSV (``opts`` column).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import functools
import gc
import json
import math
import multiprocessing
import multiprocessing.context
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch
import torch.utils._pytree as pytree
import torchvision
from torch import Tensor, nn
from tqdm import tqdm

import pfa_fx
from pfa_fx.audit import weights_on_backprop
from pfa_fx.weights import WEIGHT_MODULES

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "coverage.csv"
DEFAULT_SUMMARY = HERE / "COVERAGE.md"
ALL_RULES = ("bp", "fa", "sf", "kp", "pfa", "pfa-o")
SOURCES = ("tv", "timm")
BATCH = 2
PFA_RULES = ("pfa", "pfa-o")

FIELDS = [
    "source",
    "model",
    "rule",
    "status",
    "reason",
    "input_size",
    "build_kwargs",
    "opts",
    "params_m",
    "weight_modules",
    "ops_converted",
    "conversion_path",
    "eval_equal",
    "train_equal",
    "left_on_bp",
    "grads_finite",
    "build_s",
    "convert_s",
    "check_s",
    "report",
    "pfa_fx_rev",
    "timestamp",
]

# statuses, in the order a failing row is classified (the first that applies wins)
PASS = "pass"
BUILD_ERROR = "build_error"  # the model itself cannot be built or run: not pfa_fx's fault
CONVERSION_ERROR = "conversion_error"
CHECK_ERROR = "check_error"  # the converted model raised in forward or backward
FORWARD_CHANGED = "forward_changed"
LEFT_ON_BP = "left_on_bp"
NONFINITE_GRAD = "nonfinite_grad"
TIMEOUT = "timeout"
CRASH = "crash"  # the worker died (e.g. killed for memory) before writing the row
STATUSES = (
    PASS,
    FORWARD_CHANGED,
    LEFT_ON_BP,
    CONVERSION_ERROR,
    TIMEOUT,
    CHECK_ERROR,
    NONFINITE_GRAD,
    BUILD_ERROR,
    CRASH,
)


# ------------------------------------------------------------------------ model lists
def list_model_names(
    source: str, pattern: str | None = None, every: int = 1, limit: int | None = None
) -> list[tuple[str, str]]:
    """``(source, name)`` pairs: torchvision's classification models and/or timm's models,
    filtered by an ``fnmatch`` glob, then every ``every``-th name, then the first ``limit``."""
    out: list[tuple[str, str]] = []
    for src in SOURCES if source == "both" else (source,):
        if src == "tv":
            names = sorted(torchvision.models.list_models(module=torchvision.models))
        else:
            names = sorted(timm.list_models())
        if pattern:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        out += [(src, n) for n in names[:: max(1, every)]]
    return out[:limit] if limit is not None else out


# --------------------------------------------------------------------------- building
@dataclass
class Candidate:
    """One way to build a model and the input size to feed it."""

    size: int
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Built:
    model: nn.Module
    size: int
    channels: int
    kwargs: dict[str, Any]
    build_s: float
    params: int
    dtype: torch.dtype = torch.float32


class BuildError(RuntimeError):
    """No candidate size builds and runs the (unconverted) model."""


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()


def tv_candidates(name: str) -> list[Candidate]:
    """Small inputs first. ViT and MaxViT fix their input size at construction
    (``image_size`` / ``input_size``); the others accept any size above a minimum
    (inception_v3's training-mode aux head needs its native 299)."""
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[-1])
        small = patch * math.ceil(64 / patch)
        return [Candidate(s, {"image_size": s}) for s in dict.fromkeys((small, 224))]
    if name.startswith("maxvit_"):
        return [Candidate(s, {"input_size": (s, s)}) for s in (64, 112, 224)]
    return [Candidate(s) for s in (64, 75, 96, 128, 160, 224, 299)]


def timm_candidates(name: str) -> tuple[list[Candidate], int]:
    """Candidates for a timm model, and its input channels: ``img_size=...`` at small
    sizes (models with position embeddings or fixed windows take it), the same sizes
    without the kwarg unless the pretrained config says the input size is fixed, then
    the model's own default input size."""
    cfg = timm.get_pretrained_cfg(name)
    input_size = tuple(getattr(cfg, "input_size", None) or (3, 224, 224))
    fixed = bool(getattr(cfg, "fixed_input_size", False))
    channels, native = int(input_size[0]), int(input_size[-1])
    small = [s for s in (64, 96, 128) if s < native]
    cands = [Candidate(s, {"img_size": s}) for s in small]
    if not fixed:
        cands += [Candidate(s) for s in small]
    cands.append(Candidate(native))
    return cands, channels


def model_factory(source: str, name: str) -> Callable[..., nn.Module]:
    if source == "tv":
        return lambda **kw: torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
    return lambda **kw: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _probe(model: nn.Module, x: Tensor) -> None:
    """Run the unconverted model in eval and train mode (no autograd): the size works."""
    with torch.no_grad():
        model.eval()
        model(x)
        model.train()
        model(x)


def build_model(source: str, name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Built:
    """The model at the first candidate (kwargs, size) that builds and runs in both modes,
    with parameters in ``dtype`` (bfloat16 lets the largest models fit this machine)."""
    t0 = time.perf_counter()
    if source == "tv":
        cands, channels = tv_candidates(name), 3
    else:
        cands, channels = timm_candidates(name)
    factory = model_factory(source, name)
    errors: list[str] = []
    model: nn.Module | None = None
    model_key: str | None = None
    kw_unsupported = False
    for cand in cands:
        key = json.dumps(cand.kwargs, sort_keys=True)
        if cand.kwargs and kw_unsupported:
            continue
        if key != model_key:
            model = None
            gc.collect()
            try:
                torch.manual_seed(seed)
                torch.set_default_dtype(dtype)
                try:
                    model = factory(**cand.kwargs)
                finally:
                    torch.set_default_dtype(torch.float32)
                model_key = key
            except Exception as exc:
                model_key = None
                errors.append(f"build {cand.kwargs or 'default'}: {_first_line(exc)}")
                if isinstance(exc, TypeError) and "unexpected keyword" in str(exc):
                    kw_unsupported = True
                continue
        assert model is not None
        x = torch.randn(BATCH, channels, cand.size, cand.size, generator=torch.Generator().manual_seed(seed))
        try:
            _probe(model, x.to(dtype))
        except Exception as exc:
            errors.append(f"{cand.size}px {cand.kwargs or ''}: {_first_line(exc)}".replace("  ", " "))
            continue
        params = sum(p.numel() for p in model.parameters())
        return Built(model, cand.size, channels, cand.kwargs, time.perf_counter() - t0, params, dtype)
    raise BuildError("; ".join(errors[-3:]) or "no candidate input size")


def estimate_params(source: str, name: str) -> int | None:
    """Parameter count from a build on the meta device (no memory, no init), or None."""
    factory = model_factory(source, name)
    kw = tv_candidates(name)[0].kwargs if source == "tv" else {}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = factory(**kw)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


# ---------------------------------------------------------------------------- checks
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


def pfa_fx_revision() -> str:
    """The git revision of the pfa_fx source checked (``+dirty`` with uncommitted changes)."""
    root = Path(pfa_fx.__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return getattr(pfa_fx, "__version__", "")
    return rev + ("+dirty" if dirty else "")


def _one_line(obj: Any, limit: int = 300) -> str:
    if isinstance(obj, Mapping):
        text = json.dumps(obj, default=str)
    else:
        text = str(obj)
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_opts(items: Sequence[str]) -> dict[str, Any]:
    """``["expansion=1", "compact=true"]`` -> ``{"expansion": 1, "compact": True}``."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option {item!r} is not key=value")
        try:
            opts[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


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
        row.update(status=CONVERSION_ERROR, reason=_first_line(exc), convert_s=round(time.perf_counter() - t0, 2))
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
            row["report"] = f"report() raised {_first_line(exc)}"

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
                problems.append((FORWARD_CHANGED, f"{name} forward changed: {diffs[mode]}"))
        leaves = [t for t in tensor_leaves(out) if t.is_floating_point() and t.requires_grad]
        if not leaves:
            raise RuntimeError("no output of the converted model requires grad")
        loss = sum(t.float().mean() for t in leaves)
        left = weights_on_backprop(loss, gm)
        row["left_on_bp"] = len(left)
        if left:
            names = ", ".join(left[:4]) + (f" (+{len(left) - 4} more)" if len(left) > 4 else "")
            problems.append((LEFT_ON_BP, f"{len(left)} weight(s) left on BP: {names}"))
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
            problems.append((NONFINITE_GRAD, f"non-finite grad in {len(bad)} param(s): {', '.join(bad[:3])}"))
    except Exception as exc:
        problems.insert(0, (CHECK_ERROR, _first_line(exc)))
    finally:
        if model is not None:
            model.zero_grad(set_to_none=True)
        del gm
        gc.collect()
    row["check_s"] = round(time.perf_counter() - t1, 2)
    if problems:
        order = {s: i for i, s in enumerate((CHECK_ERROR, FORWARD_CHANGED, LEFT_ON_BP, NONFINITE_GRAD))}
        row["status"] = min((p[0] for p in problems), key=order.__getitem__)
        row["reason"] = "; ".join(p[1] for p in problems)
    else:
        row["status"], row["reason"] = PASS, ""
    return row


_REV: list[str] = []  # pfa_fx_revision(), once per process


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
    if not _REV:
        _REV.append(pfa_fx_revision())
    base = {"source": source, "model": name}
    lean = lean_params is not None and (estimate_params(source, name) or 0) > lean_params * 1e6
    try:
        built = build_model(source, name, seed, torch.bfloat16 if lean else torch.float32)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, BuildError) else _first_line(exc)
        for rule in rules:
            yield _finish({**base, "rule": rule, "status": BUILD_ERROR, "reason": reason})
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
            row = {"rule": rule, "status": CHECK_ERROR, "reason": f"harness: {_first_line(exc)}"}
        yield _finish({**base, **row})


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    row.setdefault("pfa_fx_rev", _REV[0] if _REV else "")
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {k: row.get(k, "") for k in FIELDS}


# ------------------------------------------------------------------------ the worker
def _check_to_file(
    source: str,
    name: str,
    rules: Sequence[str],
    out: str,
    opts: Mapping[str, Any],
    big_params: float,
    big_opts: Mapping[str, Any],
    seed: int,
    lean_params: float | None = None,
) -> None:
    """Append one JSON row per rule to ``out``, flushed as each finishes (a timeout then
    keeps the rules already done)."""
    with open(out, "a") as f:
        for row in check_model(source, name, rules, opts, big_params, big_opts, seed, lean_params):
            f.write(json.dumps(row) + "\n")
            f.flush()


def _worker(source: str, name: str, rules: list[str], out: str, err: str, args: dict[str, Any]) -> None:
    """Entry point of a worker process: output to ``err``, rows to ``out``."""
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(args["threads"])
    _REV[:] = [args["rev"]]
    _check_to_file(
        source, name, rules, out, args["opts"], args["big_params"], args["big_opts"], args["seed"], args["lean_params"]
    )


def run_one(args: argparse.Namespace) -> int:
    """``--one SOURCE:NAME``: check one model in this process; JSON rows to ``--out`` or stdout."""
    torch.set_num_threads(args.threads)
    source, _, name = args.one.partition(":")
    if not name:
        tv_names = torchvision.models.list_models(module=torchvision.models)
        source, name = ("tv" if source in tv_names else "timm"), source
    opts, big_opts = parse_opts(args.opt), parse_opts(args.big_opts)
    if args.out:
        _check_to_file(source, name, args.rules, args.out, opts, args.big_params, big_opts, args.seed, args.lean_params)
    else:
        rows = check_model(source, name, args.rules, opts, args.big_params, big_opts, args.seed, args.lean_params)
        for row in rows:
            print(json.dumps(row), flush=True)
    return 0


# ---------------------------------------------------------------------- the CSV store
def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def latest_rows(rows: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """One row per (source, model, rule): the last one written (a retry replaces a timeout)."""
    last: dict[tuple[str, str, str], Mapping[str, str]] = {}
    for row in rows:
        last[(row["source"], row["model"], row["rule"])] = row
    return list(last.values())


def append_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:  # written by an older version of this script: rewrite with today's columns
            old = read_rows(path)
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore", restval="")
                writer.writeheader()
                writer.writerows(old)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------- the sweep
@dataclass
class Job:
    source: str
    name: str
    rules: list[str]
    est: int | None = None  # parameter count estimated on the meta device (0: unknown)
    solo: bool = False
    proc: Any = None  # a multiprocessing Process
    out: Path | None = None
    err: Path | None = None
    started: float = 0.0


def _collect(job: Job, timed_out: bool, elapsed: float) -> list[dict[str, Any]]:
    """The rows the worker wrote, plus a timeout/crash row for each rule it did not reach."""
    assert job.out is not None and job.err is not None
    rows = []
    if job.out.exists():
        for line in job.out.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by the kill
                rows.append(json.loads(line))
    done = {r["rule"] for r in rows}
    missing = [r for r in job.rules if r not in done]
    if missing:
        if timed_out:
            status, reason = TIMEOUT, f"no result within {elapsed:.0f} s"
        else:
            rc = job.proc.exitcode if job.proc is not None else None
            text = job.err.read_text(errors="replace") if job.err.exists() else ""
            tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
            if rc == -signal.SIGKILL:
                why += " (not by the timeout: likely out of memory)"
            status, reason = CRASH, f"worker {why}" + (f": {tail[-1][:200]}" if tail else "")
        rows += [
            _finish({"source": job.source, "model": job.name, "rule": r, "status": status, "reason": reason})
            for r in missing
        ]
    return rows


def _context() -> multiprocessing.context.BaseContext:
    """Workers fork from a server that has imported torch, torchvision, timm and pfa_fx
    once (seconds saved per model), yet each model gets a fresh process."""
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torchvision", "timm", "pfa_fx", "pfa_fx.audit"])
    except ValueError:  # no forkserver on this platform
        ctx = multiprocessing.get_context("spawn")
    return ctx


def sweep(args: argparse.Namespace) -> None:
    csv_path = Path(args.csv)
    latest = latest_rows(read_rows(csv_path))
    done = {(r["source"], r["model"], r["rule"]) for r in latest if r["status"] not in args.retry}
    names = list_model_names(args.source, args.filter, args.every, args.limit)
    if args.no_new:  # a retry pass only: models not in the CSV yet are left for the sweep
        seen = {(r["source"], r["model"]) for r in latest}
        names = [n for n in names if tuple(n) in seen]
    jobs = [Job(src, name, [r for r in args.rules if (src, name, r) not in done]) for src, name in names]
    jobs = [j for j in jobs if j.rules]
    if len(names) > len(jobs):
        print(f"resuming: {len(names) - len(jobs)} of {len(names)} model(s) already in {csv_path}", file=sys.stderr)
    if not jobs:
        return
    if not _REV:
        _REV.append(pfa_fx_revision())
    ctx = _context()
    worker_args = {
        "threads": args.threads,
        "opts": parse_opts(args.opt),
        "big_params": args.big_params,
        "big_opts": parse_opts(args.big_opts),
        "seed": args.seed,
        "lean_params": args.lean_params,
        # read once, here: workers fork from a server that imported pfa_fx when the sweep
        # began, so HEAD at the time a worker checks may be a later commit than the code
        "rev": _REV[0],
    }
    tmp = Path(tempfile.mkdtemp(prefix="pfa_coverage_"))
    counts: Counter[str] = Counter()
    running: list[Job] = []
    pending = list(jobs)
    bar = tqdm(total=len(jobs), unit="model", dynamic_ncols=True)
    try:
        while pending or running:
            # launch; a solo job waits for an empty machine and keeps it to itself
            while pending and len(running) < args.jobs and not any(j.solo for j in running):
                job = pending[0]
                if args.jobs > 1 and job.est is None:
                    job.est = estimate_params(job.source, job.name) or 0
                    job.solo = job.est > args.solo_params * 1e6
                if job.solo and running:
                    break
                pending.pop(0)
                job.out, job.err = tmp / f"{job.source}_{job.name}.jsonl", tmp / f"{job.source}_{job.name}.log"
                # a solo job has the machine to itself: it gets every worker's threads
                job_args = {**worker_args, "threads": args.threads * args.jobs} if job.solo else worker_args
                job.proc = ctx.Process(
                    target=_worker,
                    args=(job.source, job.name, job.rules, str(job.out), str(job.err), job_args),
                    daemon=True,
                )
                job.proc.start()
                job.started = time.monotonic()
                running.append(job)
                bar.set_postfix_str(" ".join(j.name for j in running)[:60])
            time.sleep(0.2)
            for job in list(running):
                elapsed = time.monotonic() - job.started
                timed_out = job.proc.is_alive() and elapsed > args.timeout
                if timed_out:
                    job.proc.kill()
                    job.proc.join()
                if job.proc.is_alive():
                    continue
                job.proc.join()
                rows = _collect(job, timed_out, elapsed)
                append_rows(csv_path, rows)
                counts.update(r["status"] for r in rows)
                running.remove(job)
                bar.update(1)
                bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
                for row in rows:
                    if row["status"] != PASS:
                        tqdm.write(f"{job.source}:{job.name} [{row['rule']}] {row['status']}: {row['reason'][:150]}")
    finally:
        for job in running:
            job.proc.kill()
            job.proc.join()
        bar.close()


# ------------------------------------------------------------------------ the summary
COLUMNS = [
    (PASS, "pass"),
    (FORWARD_CHANGED, "forward changed"),
    (LEFT_ON_BP, "left on BP"),
    (CONVERSION_ERROR, "conversion error"),
    (TIMEOUT, "timeout"),
    ("memory", "out of memory here"),
    ("other", "other"),
]
_OOM = ("can't allocate memory", "out of memory", "cannot allocate memory", "memoryerror")


def summary_status(row: Mapping[str, str]) -> str:
    """The summary's column for a row: failures caused by this machine's memory (the
    allocator refusing, or the worker killed) are counted apart from conversion failures."""
    status, reason = row["status"], row.get("reason", "").lower()
    if status != PASS and (status == CRASH or any(k in reason for k in _OOM)):
        return "memory"
    return status if status in dict(COLUMNS) else "other"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_summary(csv_path: Path, out_path: Path) -> str:
    """Markdown counts per source and rule, then every failing row with its reason."""
    rows = latest_rows(read_rows(csv_path))
    by: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    paths: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in rows:
        by[(r["source"], r["rule"])][summary_status(r)] += 1
        if r.get("conversion_path"):
            paths[(r["source"], r["rule"])][r["conversion_path"]] += 1
    lines = [
        "# Conversion coverage",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{_rel(csv_path)}` by "
        "`benchmarks/coverage.py` (regenerate: `python benchmarks/coverage.py --no-run --summary`). "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"{platform.machine()} CPU.",
        "",
        "Each (model, rule): built with `pretrained=False, num_classes=10` at a small input "
        f"(batch {BATCH}), converted, and passes when the eval- and train-mode forwards are "
        "bit-identical (`torch.equal` on every output tensor), `weights_on_backprop` is empty "
        "after a train-mode forward, and all gradients are finite.",
        "",
        "| source | rule | models | " + " | ".join(label for _, label in COLUMNS) + " | traced / fallback / eager |",
        "|---|---|---:|" + "---:|" * len(COLUMNS) + "---|",
    ]
    for (source, rule), c in sorted(by.items()):
        p = paths[(source, rule)]
        cells = " | ".join(str(c.get(key, 0)) for key, _ in COLUMNS)
        lines.append(
            f"| {source} | {rule} | {sum(c.values())} | {cells} | "
            f"{p.get('traced', 0)} / {p.get('fallback', 0)} / {p.get('eager', 0)} |"
        )
    lines.append("")
    for (source, rule), c in sorted(by.items()):
        n = sum(c.values())
        fit = n - c.get("memory", 0) - c.get(BUILD_ERROR, 0)
        lines.append(
            f"- {source} / {rule}: {c.get(PASS, 0)} of {n} pass ({100 * c.get(PASS, 0) / n:.1f} %); "
            f"of the {fit} that build and fit this machine's memory, {100 * c.get(PASS, 0) / max(fit, 1):.1f} %."
        )
    revs = Counter(r.get("pfa_fx_rev") or "not recorded" for r in rows)
    lines += ["", "pfa_fx revision per row: " + ", ".join(f"`{k}` {v}" for k, v in sorted(revs.items())) + "."]
    failures = sorted((r for r in rows if r["status"] != PASS), key=lambda r: (r["source"], r["model"], r["rule"]))
    lines += ["", f"## Failures ({len(failures)})", ""]
    if failures:
        lines += ["| source | model | rule | status | reason |", "|---|---|---|---|---|"]
        for r in failures:
            lines.append(f"| {r['source']} | {r['model']} | {r['rule']} | {r['status']} | {_cell(r['reason'][:300])} |")
    else:
        lines.append("None.")
    times = [float(r[k]) for r in rows for k in ("convert_s", "check_s") if r.get(k)]
    lines += [
        "",
        "## All rows",
        "",
        f"{len(rows)} rows; conversion + check time {sum(times) / 60:.1f} min in all "
        "(build and worker start-up not counted).",
        "",
        "<details><summary>input size, options, ops converted and times per model</summary>",
        "",
        "| source | model | rule | status | input | build kwargs | opts | params (M) | weight modules | ops "
        "converted | path | convert s | check s | pfa_fx |",
        "|---|---|---|---|---:|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["source"], r["model"], r["rule"])):
        lines.append(
            "| "
            + " | ".join(
                _cell(str(r.get(k, "")))
                for k in (
                    "source",
                    "model",
                    "rule",
                    "status",
                    "input_size",
                    "build_kwargs",
                    "opts",
                    "params_m",
                    "weight_modules",
                    "ops_converted",
                    "conversion_path",
                    "convert_s",
                    "check_s",
                    "pfa_fx_rev",
                )
            )
            + " |"
        )
    lines += ["", "</details>", ""]
    text = "\n".join(lines)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return text


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------- the CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", choices=("tv", "timm", "both"), default="both")
    p.add_argument("--filter", help="fnmatch glob on model names, e.g. 'resnet*'")
    p.add_argument("--every", type=int, default=1, help="keep every N-th name (after --filter)")
    p.add_argument("--limit", type=int, help="at most this many models")
    p.add_argument("--rules", nargs="+", choices=ALL_RULES, default=["fa", "pfa"])
    p.add_argument("--opt", nargs="*", default=[], help="rule options key=value, passed to the rules that take them")
    p.add_argument("--big-params", type=float, default=60.0, help="millions of parameters above which --big-opts apply")
    p.add_argument("--big-opts", nargs="*", default=["expansion=1"], help="PFA options for models above --big-params")
    p.add_argument(
        "--solo-params", type=float, default=150.0, help="millions of parameters above which a model runs alone"
    )
    p.add_argument(
        "--lean-params",
        type=float,
        default=300.0,
        help="millions of parameters above which a model is checked lean (bfloat16, one copy fewer)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model (all its rules)")
    p.add_argument("--jobs", type=int, default=1, help="models checked at once, one worker process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument(
        "--retry", nargs="*", default=[], metavar="STATUS", help="rerun rows with these statuses (e.g. timeout crash)"
    )
    p.add_argument(
        "--no-new", action="store_true", help="check only models already in the CSV (with --retry: a retry pass)"
    )
    p.add_argument(
        "--summary",
        nargs="?",
        const=str(DEFAULT_SUMMARY),
        help=f"write a markdown summary (default {_rel(DEFAULT_SUMMARY)})",
    )
    p.add_argument("--no-run", action="store_true", help="only (re)write the summary from the CSV")
    p.add_argument("--one", metavar="SOURCE:MODEL", help="check one model in this process (what each worker runs)")
    p.add_argument("--out", help="with --one: append JSON rows to this file instead of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        return run_one(args)
    if not args.no_run:
        t0 = time.perf_counter()
        sweep(args)
        print(f"sweep took {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    if args.summary:
        write_summary(Path(args.csv), Path(args.summary))
        print(f"wrote {args.summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
