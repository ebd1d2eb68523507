"""The ablation's training and measurements: the recipe (SGD with momentum and weight
decay, warmup then cosine learning rate, ``decay_budget``), every rule of one architecture
trained on the same minibatches in round robin (``run_model``), held-out accuracy, and both
angles measured over training: feedback alignment (``pfa_fx.alignment``) and gradient
alignment to BP (``grad_angles``)."""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _ablation_data import Data, batch_order
    from _ablation_models import create_model, label
    from _shared import NAMESPACE
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._ablation_data import Data, batch_order
    from benchmarks._ablation_models import create_model, label
    from benchmarks._shared import NAMESPACE


def logits(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch: int = 250) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the held-out set, in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(data.y_eval), batch):
            out = logits(model(data.batch(data.x_eval[i : i + batch])))
            y = data.y_eval[i : i + batch]
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
    finally:
        model.train()
    return loss / len(data.y_eval), correct / len(data.y_eval)


def head_ops(model: nn.Module, ops: list[str]) -> set[str]:
    """Ops of the classifier (their error is the loss gradient itself): timm's
    ``get_classifier()`` module(s), else the last converted op."""
    heads: set[str] = set()
    try:
        clf = model.get_classifier()
    except (AttributeError, NotImplementedError):
        clf = None
    mods = clf if isinstance(clf, (tuple, list)) else [clf]
    ids = {id(m) for m in mods if isinstance(m, nn.Module)}
    prefixes = [name for name, m in model.named_modules() if id(m) in ids]
    for op in ops:
        if any(op == p or op.startswith(p + ".") for p in prefixes):
            heads.add(op)
    return heads or set(ops[-1:])


def grad_angles(gm: nn.Module, bp_ref: nn.Module, x: Tensor, y: Tensor, seed: int) -> dict[str, float]:
    """Per weight op: angle (deg) between the rule's weight gradient and BP's, same batch and weights.

    ``bp_ref`` gets ``gm``'s current parameters and buffers; ``gm``'s buffers (BN running
    statistics) are restored afterwards and its ``.grad`` cleared."""
    missing, unexpected = bp_ref.load_state_dict(gm.state_dict(), strict=False)
    stray = [k for k in unexpected if not k.startswith(NAMESPACE + ".")]
    if missing or stray:
        raise RuntimeError(f"bp copy does not match the converted model: missing {missing[:3]}, unexpected {stray[:3]}")
    saved = {k: b.clone() for k, b in gm.named_buffers()}
    # the probe must not change training: per-step counters (brSF's draw, WM/PAL's noise
    # step) and the feedback update PAL learns in the noisy pass of a training forward
    nodes = [node for _, node in pfa_fx.feedback_modules(gm)]
    extra = [node.get_extra_state() if type(node).get_extra_state is not nn.Module.get_extra_state else None for node in nodes]  # fmt: skip
    pending = [node.__dict__.get("_update") for node in nodes]
    grads: list[dict[str, Tensor]] = []
    for model in (gm, bp_ref):
        params = dict(model.named_parameters())
        weights = {op: params.get(op + ".weight") for op, _ in pfa_fx.feedback_modules(model)}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # same dropout / drop-path masks in both passes
        F.cross_entropy(logits(model(x)), y).backward()
        grads.append({op: w.grad.detach().clone() for op, w in weights.items() if w is not None and w.grad is not None})
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, b in gm.named_buffers():
            b.copy_(saved[k])
    for node, state, update in zip(nodes, extra, pending):
        if state is not None:
            node.set_extra_state(state)
        if "_update" in node.__dict__:
            node._update = update
    rule, bp = grads
    return {op: pfa_fx.angle_and_norm_ratio(bp[op], g)[0] for op, g in rule.items() if op in bp}


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Run:
    rule: str
    model: nn.Module
    opt: torch.optim.Optimizer
    convert_s: float
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    diverged_at: int | None = None
    measure_s: float = 0.0  # time spent measuring the angles (not in the step times)


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"expansion": args.expansion, "compact": True} if rule in ("pfa", "pfa-o") else {}
    if rule != "bp" and not (rule == "dfa" and args.scale == "weight"):  # always named: the library default may change
        opts["scale"] = args.scale
    return opts


def sgd(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def lr_at(step: int, args: argparse.Namespace) -> float:
    warm = max(1, round(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))


@dataclass
class DecayBudget:
    """How far the recipe's weight decay takes KP's ``W_b − W`` (W and B get the same
    gradient, so their difference only decays: by the same factor in every entry)."""

    lr_wd: float  # Σ_t lr_t·wd: the lr·wd·steps, summed over the schedule
    plain: float  # Π_t (1 − lr_t·wd): the factor under SGD without momentum
    factor: float  # the factor under this recipe's SGD (heavy-ball recurrence of the decay term)
    momentum: float

    def line(self) -> str:
        return (
            f"Σ_t lr_t·wd = {self.lr_wd:.3g} (lr·wd·steps over the schedule); KP's W_b − W shrinks "
            f"×{self.factor:.2g} with momentum {self.momentum:g} (≈ exp(−Σ lr_t·wd/(1−μ)) = "
            f"{math.exp(-self.lr_wd / max(1e-12, 1 - self.momentum)):.2g}), ×{self.plain:.2g} without"
        )


def decay_budget(args: argparse.Namespace) -> DecayBudget:
    """:class:`DecayBudget` of the recipe's ``args.steps`` steps, exactly as
    ``torch.optim.SGD`` (dampening 0, no Nesterov) updates the difference ``D = W − B``: its
    gradient is ``wd·D``, its momentum buffer starts at the first gradient."""
    total, plain, d, buf = 0.0, 1.0, 1.0, None
    for t in range(args.steps):
        lr = lr_at(t, args)
        total += lr * args.weight_decay
        plain *= 1.0 - lr * args.weight_decay
        g = args.weight_decay * d
        buf = g if buf is None else args.momentum * buf + g
        d -= lr * buf
    return DecayBudget(total, plain, abs(d), args.momentum)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = F.cross_entropy(logits(model(x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = loss.detach().item()
    return value, time.perf_counter() - t0


def curve_steps(steps: int, every: int) -> list[int]:
    """Steps (updates done) at which both angles are measured: 0, every ``every``, the last."""
    return sorted({0, steps, *range(every, steps, every)})


def run_model(
    name: str, kwargs: dict[str, Any], data: Data, args: argparse.Namespace, bar: tqdm
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train every rule on one architecture; (summary rows, per-op rows, curve rows)."""
    tag = label(name, kwargs)
    torch.manual_seed(args.seed)
    base = create_model(name, kwargs, args.size).train()
    n_params = sum(p.numel() for p in base.parameters())
    runs: list[Run] = []
    for rule in args.rules:
        bar.set_postfix_str(f"{tag} convert {rule}")
        t0 = time.perf_counter()
        gm = pfa_fx.convert(base, rule, seed=args.seed, **rule_options(rule, args)).train()
        if rule == "wm" and args.mirror_steps:
            pfa_fx.mirror(gm, steps=args.mirror_steps)  # the authors' initial mirror pass (no data)
        runs.append(Run(rule, gm, sgd(gm, args), time.perf_counter() - t0))
    bp_ref = pfa_fx.convert(base, "bp", seed=args.seed).train()
    native = copy.deepcopy(base)
    native_opt = sgd(native, args)
    native_times: list[float] = []
    ops = [op for op, _ in pfa_fx.feedback_modules(runs[0].model)]
    heads = head_ops(base, ops)

    batches = batch_order(len(data.y_train), args.batch, args.steps, args.seed)
    probe = batches[0]  # the fixed batch every gradient-alignment measurement uses
    xp, yp = data.batch(data.x_train[probe]), data.y_train[probe]
    log_at = set(curve_steps(args.steps, args.log_every))
    lr_wd = [0.0]  # Σ lr_t·wd after each step
    curves: list[dict[str, Any]] = []
    last: dict[str, tuple[dict[str, tuple[float, float]], dict[str, float]]] = {}  # rule -> latest measurement
    init: dict[str, tuple[dict[str, tuple[float, float]], dict[str, float]]] = {}
    logged = {run.rule: 0 for run in runs}  # losses recorded at the previous measurement

    def measure(step: int) -> None:
        for run in runs:
            if run.diverged_at is not None:
                continue
            t0 = time.perf_counter()
            align = pfa_fx.alignment(run.model)
            grads = grad_angles(run.model, bp_ref, xp, yp, args.seed)
            run.measure_s += time.perf_counter() - t0
            last[run.rule] = align, grads
            init.setdefault(run.rule, (align, grads))
            window = run.losses[logged[run.rule] :]
            logged[run.rule] = len(run.losses)
            curves.append(
                {
                    "model": tag,
                    "rule": run.rule,
                    "step": step,
                    "lr": lr_at(step - 1, args) if step else 0.0,
                    "lr_wd_sum": lr_wd[step],
                    "path_angle": _mean([a for a, _ in align.values()]),
                    "norm_ratio": _median([r for _, r in align.values()]),
                    "grad_angle": _mean([g for op, g in grads.items() if op not in heads]),
                    "head_grad_angle": max((grads[op] for op in heads if op in grads), default=float("nan")),
                    "train_loss": _mean(window),
                }
            )

    measure(0)
    bar.set_postfix_str(tag)
    for step, idx in enumerate(batches):
        x, y = data.batch(data.x_train[idx]), data.y_train[idx]
        lr = lr_at(step, args)
        lr_wd.append(lr_wd[-1] + lr * args.weight_decay)
        shift = step % len(runs)
        for run in runs[shift:] + runs[:shift]:
            if run.diverged_at is not None:
                continue
            for group in run.opt.param_groups:
                group["lr"] = lr
            loss, dt = train_step(run.model, run.opt, x, y)
            run.losses.append(loss)
            run.times.append(dt)
            if not math.isfinite(loss):
                run.diverged_at = step
        if args.native_every and step % args.native_every == 0:
            for group in native_opt.param_groups:
                group["lr"] = lr
            native_times.append(train_step(native, native_opt, x, y)[1])
        if step + 1 in log_at:
            bar.set_postfix_str(f"{tag} measure")
            measure(step + 1)
            bar.set_postfix_str(tag)
        bar.update(1)

    skip = 2 if args.steps > 4 else 0  # first steps allocate
    t_bp = _median(next(r for r in runs if r.rule == "bp").times[skip:])
    t_native = _median(native_times[1:] if len(native_times) > 2 else native_times)
    rows, layer_rows = [], []
    for run in runs:
        bar.set_postfix_str(f"{tag} eval {run.rule}")
        heldout_loss, acc = evaluate(run.model, data)
        align, grads = last[run.rule]  # at the last step, or where the run diverged
        align0, grads0 = init[run.rule]
        tail = run.losses[-max(1, len(run.losses) // 10) :]
        step_s = _median(run.times[skip:])
        body = [op for op in grads if op not in heads]
        rows.append(
            {
                "model": tag,
                "rule": run.rule,
                "params_m": n_params / 1e6,
                "n_ops": len(ops),
                "steps": len(run.losses),
                "train_loss": _mean(tail) if run.diverged_at is None else float("nan"),
                "acc": acc,
                "heldout_loss": heldout_loss,
                "path_angle_init": _mean([a for a, _ in align0.values()]),
                "path_angle": _mean([a for a, _ in align.values()]),
                "norm_ratio_init": _median([r for _, r in align0.values()]),
                "norm_ratio": _median([r for _, r in align.values()]),
                "grad_angle_init": _mean([grads0[op] for op in body if op in grads0]),
                "grad_angle": _mean([grads[op] for op in body]),
                "head_grad_angle": max((grads[op] for op in heads if op in grads), default=float("nan")),
                "n_grad_layers": len(body),
                "step_ms": 1e3 * step_s,
                "time_x_bp": step_s / t_bp,
                "bp_x_native": t_bp / t_native,
                "convert_s": run.convert_s,
                "measure_s": run.measure_s,
                "diverged_at": "" if run.diverged_at is None else run.diverged_at,
            }
        )
        for op in ops:
            angle, ratio = align.get(op, (float("nan"), float("nan")))
            layer_rows.append(
                {
                    "model": tag,
                    "rule": run.rule,
                    "op": op,
                    "head": op in heads,
                    "path_angle": angle,
                    "norm_ratio": ratio,
                    "grad_angle_init": grads0.get(op, float("nan")),
                    "grad_angle": grads.get(op, float("nan")),
                }
            )
    return rows, layer_rows, curves
