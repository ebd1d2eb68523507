"""Shared by ``cifar10_fig4.py`` and ``imagenet_fig5.py``: flags, (distributed) training
loop, per-epoch metrics, CSV, figure and summary.

One run trains every requested rule in turn from the same initial network (one model
built from ``--seed``, converted per rule with ``pfa_fx.convert``), with the same batch
order, and records per epoch:

- ``test_acc``, ``test_acc5``, ``test_loss`` on the whole test/val set (sharded over
  ranks and summed), ``train_loss`` (mean minibatch loss of the epoch, over all ranks),
  ``lr``, ``weight_decay``, ``epoch_time_s``;
- per converted op (``layer`` = op name, ``depth`` = its position in the network, 1 =
  the stem conv): ``angle_deg`` and ``norm_ratio`` between ``W`` and the feedback ``W_b``
  (``pfa_fx.alignment``; path alignment ``B·R`` vs ``W`` for PFA/PFA-o), and
  ``grad_angle_deg``, the angle between the rule's weight update and BP's on one fixed
  batch of test images (``pfa_fx.gradient_alignment``, run in eval mode so BatchNorm
  uses its running statistics and the two passes see the same function).

Epoch 0 is the initial model (no ``train_loss``). Distributed: ``torchrun`` sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the process group is initialised from them (gloo
on CPU, nccl on CUDA), ``--batch-size`` is the *global* batch (divided over ranks), data
is sharded with ``DistributedSampler``, BatchNorm running statistics are averaged over
ranks before each evaluation, and only rank 0 records alignments and writes files (the
gradient-alignment probe runs on every rank: it advances brSF's per-batch draws).
Feedback state is drawn from ``(seed, op name)``, so it is identical on every rank
without communication; DDP is built without per-forward buffer broadcasts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib.util
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

import pfa_fx
from pfa_fx.theory import predicted_path_angle

RULES = ("bp", "fa", "sf", "kp", "pfa", "pfa-o")
COLORS = {
    "bp": "black",
    "fa": "tab:red",
    "sf": "tab:orange",
    "kp": "tab:green",
    "pfa": "tab:blue",
    "pfa-o": "tab:purple",
}
CSV_HEADER = ("seed", "rule", "epoch", "metric", "layer", "depth", "value")
Row = tuple[int, str, int, str, str, str, float]


# ----------------------------------------------------------------------------- arguments
@dataclass
class Defaults:
    """Per-script defaults for the shared flags (the paper's recipe for that figure)."""

    out: str
    epochs: int
    lr: float
    batch_size: int
    milestones: list[int]
    workers: int
    align_batch: int = 128


def add_common_args(p: argparse.ArgumentParser, d: Defaults) -> None:
    p.add_argument("--rules", nargs="+", choices=RULES, default=None, help="rules to train (default: all six; smoke: bp pfa)")  # fmt: skip
    p.add_argument("--data", type=Path, default=None, help="dataset root")
    p.add_argument("--out", type=Path, default=Path(d.out), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="initial weights, feedback state, batch order")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--schedule", choices=("step", "cosine", "constant"), default="step", help="lr schedule (per epoch)")
    p.add_argument("--milestones", type=int, nargs="*", default=d.milestones, help="step schedule: epochs where lr *= --gamma")  # fmt: skip
    p.add_argument("--gamma", type=float, default=0.1, help="step schedule factor")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (divided over ranks)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.01, help="weight decay during the first --wd-epochs")
    p.add_argument("--wd-factor", type=float, default=0.01, help="weight decay is multiplied by this afterwards")
    p.add_argument("--wd-epochs", type=int, default=1, help="epochs at the initial weight decay")
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument("--explicit-r", action="store_true", help="PFA keeps the explicit R (n̄ x n_in) instead of the compact S (exact under SGD)")  # fmt: skip
    p.add_argument("--sf-variant", choices=("usf", "frsf", "brsf"), default="usf", help="sign-concordant variant")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per process")
    p.add_argument("--align-batch", type=int, default=d.align_batch, help="test images in the fixed gradient-alignment batch")  # fmt: skip
    p.add_argument("--limit-steps", type=int, default=None, help="cap on training steps per epoch (quick trials)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast the training forward to bf16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the training model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (CUDA only), applied before convert")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: torch's; smoke: 1)"
    )
    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        help="TensorBoard dir (needs tensorboard); also writes --out/alignment_<rule>.csv via pfa_fx.AlignmentLogger",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--smoke", action="store_true", help="seconds-long run on generated data (CI)")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.rules is None:
        args.rules = ["bp", "pfa"] if args.smoke else list(RULES)
    if args.threads is None and args.smoke:
        args.threads = 1  # small convs on a shared CPU: more threads only oversubscribe it
    args.rules = list(dict.fromkeys(args.rules))
    for flag in ("epochs", "batch_size", "align_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        print("note: tensorboard is not installed; --tensorboard writes only the alignment_<rule>.csv files")
    if args.wd_epochs < 0 or args.workers < 0:
        p.error("--wd-epochs and --workers must be >= 0")
    if args.limit_steps is not None and args.limit_steps < 1:
        p.error("--limit-steps must be >= 1")
    return args


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    if rule in ("pfa", "pfa-o"):
        return {"expansion": args.expansion, "compact": not args.explicit_r}
    if rule == "sf":
        return {"variant": args.sf_variant}
    return {}


def xavier_init_(model: nn.Module) -> nn.Module:
    """The paper's recipe: Xavier-uniform weights and zero biases for every conv and linear."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: str) -> Dist:
    """Process group from torchrun's environment variables when WORLD_SIZE is set."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def main_first(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 first (e.g. a download or writing generated data), then on the others."""
    if d.main:
        out = fn()
    d.barrier()
    if not d.main:
        out = fn()
    return out


def _ddp(model: nn.Module, d: Dist) -> nn.Module:
    kwargs: dict[str, Any] = {"device_ids": [d.local_rank]} if d.device.type == "cuda" else {}
    # feedback buffers (B, G, ...) are equal on every rank by construction: no per-forward broadcast
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DDP(model, **kwargs)


@torch.no_grad()
def average_bn_stats(model: nn.Module, d: Dist) -> None:
    """Average BatchNorm running statistics over ranks so every rank evaluates the same model."""
    if not d.distributed:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf /= d.world


# ----------------------------------------------------------------------------- task
@dataclass
class Task:
    """What a figure script provides: datasets, model builder, labels."""

    name: str  # file stem of the figure, e.g. "cifar10_fig4"
    title: str  # figure title prefix
    train_set: Dataset
    test_set: Dataset
    build_model: Callable[[], nn.Module]  # called after torch.manual_seed(seed)
    data_source: str
    reference_error: dict[str, float] = field(default_factory=dict)  # published top-1 error (%) per rule
    reference_source: str = ""


# ----------------------------------------------------------------------------- training
def _to(x: Tensor, d: Dist, channels_last: bool) -> Tensor:
    x = x.to(d.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _autocast(args: argparse.Namespace, d: Dist) -> contextlib.AbstractContextManager:
    if args.amp == "bf16":
        return torch.autocast(d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(args: argparse.Namespace, epoch: int) -> float:
    """Multiplier of --lr during (0-based) epoch ``epoch``."""
    if args.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.schedule == "step":
        return args.gamma ** sum(epoch >= m for m in args.milestones)
    return 1.0


@torch.no_grad()
def evaluate(gm: nn.Module, loader: DataLoader, args: argparse.Namespace, d: Dist) -> tuple[float, float, float]:
    """(mean cross-entropy, top-1, top-5 accuracy) over the whole test set, all ranks together."""
    gm.eval()
    loss, top1, top5, n = 0.0, 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = _to(x, d, args.channels_last), y.to(d.device, non_blocking=True)
        with _autocast(args, d):
            out = gm(x)
        out = out.float()
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        top1 += float((top[:, 0] == y).sum())
        top5 += float((top == y[:, None]).any(1).sum())
        n += len(y)
    loss, top1, top5, n = d.all_sum([loss, top1, top5, n])
    return loss / max(n, 1), top1 / max(n, 1), top5 / max(n, 1)


@dataclass
class Layer:
    name: str
    depth: int
    shape: tuple[int, ...]


def layer_table(gm: nn.Module) -> list[Layer]:
    """Converted ops in network order (depth 1 = first op)."""
    return [Layer(n, i, tuple(node.weight.shape)) for i, (n, node) in enumerate(pfa_fx.feedback_modules(gm), start=1)]


class Recorder:
    """Collects rows; writes the CSV (rank 0 only)."""

    def __init__(self, seed: int, path: Path | None):
        self.seed, self.path, self.rows = seed, path, []

    def scalar(self, rule: str, epoch: int, **metrics: float) -> None:
        for metric, value in metrics.items():
            self.rows.append((self.seed, rule, epoch, metric, "", "", float(value)))

    def layers(self, rule: str, epoch: int, metric: str, values: dict[str, float], layers: list[Layer]) -> None:
        for lay in layers:
            if lay.name in values:
                self.rows.append((self.seed, rule, epoch, metric, lay.name, str(lay.depth), float(values[lay.name])))

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_HEADER)
            w.writerows(self.rows)
        tmp.replace(self.path)


def fixed_batch(dataset: Dataset, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` test images (deterministic transform): the gradient-alignment batch."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def gradient_angles(gm: nn.Module, batch: tuple[Tensor, Tensor], args: argparse.Namespace, d: Dist) -> dict[str, float]:
    """Angle per op between the rule's weight update and BP's on the fixed batch (fp32, eval mode).

    Run on every rank, not only the one that records it: each of its two forwards draws a
    fresh brSF magnitude (the rule's per-batch counter advances), and the counters must
    stay equal on all ranks.
    """
    x, y = _to(batch[0], d, args.channels_last), batch[1].to(d.device)
    gm.eval()
    return pfa_fx.gradient_alignment(gm, lambda: F.cross_entropy(gm(x), y))


def _mean(values: Any) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def train_rule(
    init: nn.Module, rule: str, task: Task, args: argparse.Namespace, d: Dist, rec: Recorder
) -> dict[str, Any]:
    """Convert a copy of ``init`` to ``rule``, train it and record its curves; returns timing info."""
    torch.manual_seed(args.seed + d.rank)  # augmentation RNG (workers=0): same for every rule
    gm = pfa_fx.convert(copy.deepcopy(init), rule, seed=args.seed, **rule_options(rule, args))
    gm.to(d.device)
    if args.channels_last:
        gm.to(memory_format=torch.channels_last)
    layers = layer_table(gm)
    model = _ddp(gm, d) if d.distributed else gm
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(gm.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(args, e))

    per_rank = max(1, args.batch_size // d.world)
    sampler = DistributedSampler(
        task.train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    cuda = d.device.type == "cuda"
    loader = DataLoader(
        task.train_set,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=cuda,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed * 1000 + d.rank),
    )
    test_loader = DataLoader(
        Subset(task.test_set, range(d.rank, len(task.test_set), d.world)),
        batch_size=per_rank * 2,
        num_workers=args.workers,
        pin_memory=cuda,
    )
    steps = len(loader) if args.limit_steps is None else min(len(loader), args.limit_steps)
    if steps == 0:
        raise SystemExit(f"{len(task.train_set)} training images < one global batch of {args.batch_size}")
    align_batch = fixed_batch(task.test_set, args.align_batch)
    tb = None
    if args.tensorboard is not None and d.main:
        tb = pfa_fx.AlignmentLogger(args.out / f"alignment_{rule}.csv", tensorboard_dir=args.tensorboard / rule)

    def log_epoch(epoch: int, **scalars: float) -> dict[str, Any]:
        test_loss, acc, acc5 = evaluate(gm, test_loader, args, d)
        info: dict[str, Any] = {"test_acc": acc, "test_loss": test_loss}
        grad = gradient_angles(gm, align_batch, args, d)
        if d.main:
            align = pfa_fx.alignment(gm)
            rec.scalar(rule, epoch, test_acc=acc, test_acc5=acc5, test_loss=test_loss, **scalars)
            rec.layers(rule, epoch, "angle_deg", {k: a for k, (a, _) in align.items()}, layers)
            rec.layers(rule, epoch, "norm_ratio", {k: r for k, (_, r) in align.items()}, layers)
            rec.layers(rule, epoch, "grad_angle_deg", grad, layers)
            info |= {"angle": _mean(a for a, _ in align.values()), "grad": _mean(grad.values())}
            if tb is not None:
                tb.log(epoch, gm, extra={"test_acc": acc, "test_loss": test_loss, **scalars}, gradient_angles=grad)
            rec.write()
        return info

    start = time.perf_counter()
    log_epoch(0, lr=args.lr, weight_decay=args.weight_decay)
    bar = tqdm(
        total=args.epochs * steps, desc=f"{task.name} {rule}", unit="step", disable=args.no_progress or not d.main
    )
    train_s, diverged = 0.0, False
    for epoch in range(1, args.epochs + 1):
        if epoch == args.wd_epochs + 1:
            for group in opt.param_groups:
                group["weight_decay"] *= args.wd_factor
        lr, wd = opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
        sampler.set_epoch(epoch)
        gm.train()
        t0 = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=d.device)
        seen = 0
        for i, (x, y) in enumerate(loader):
            if i == steps:
                break
            x, y = _to(x, d, args.channels_last), y.to(d.device, non_blocking=True)
            with _autocast(args, d):
                loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(y)
            seen += len(y)
            bar.update()
            if i % 20 == 0 and not args.no_progress and d.main:
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3g}", refresh=False)
        sched.step()
        loss_sum, n = d.all_sum([float(total), float(seen)])
        train_loss = loss_sum / max(n, 1)
        epoch_s = time.perf_counter() - t0
        train_s += epoch_s
        average_bn_stats(gm, d)
        info = log_epoch(epoch, train_loss=train_loss, lr=lr, weight_decay=wd, epoch_time_s=epoch_s)
        bar.set_postfix(epoch=epoch, loss=f"{train_loss:.3g}", acc=f"{info['test_acc']:.3f}", refresh=True)
        if not math.isfinite(train_loss):
            diverged = True
            if d.main:
                tqdm.write(f"warning: {rule} diverged at epoch {epoch} (train loss {train_loss}); stopping this rule")
            break
    bar.close()
    if tb is not None:
        tb.close()
    if d.main:
        extra = f", mean W-W_b angle {info['angle']:.1f}°, mean grad angle {info['grad']:.1f}°"
        tqdm.write(f"{rule}: test acc {100 * info['test_acc']:.2f}%{extra} ({train_s:.1f} s training)")
    return {"train_s": train_s, "total_s": time.perf_counter() - start, "diverged": diverged, "layers": layers}


# ----------------------------------------------------------------------------- outputs
def curve(rows: list[Row], rule: str, metric: str, layer: str = "") -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r[2], r[6]) for r in rows if r[1] == rule and r[3] == metric and r[4] == layer)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def per_layer(rows: list[Row], rule: str, metric: str, epoch: int) -> dict[str, float]:
    return {r[4]: r[6] for r in rows if r[1] == rule and r[3] == metric and r[2] == epoch and r[4]}


def last_epoch(rows: list[Row], rule: str) -> int:
    return max((r[2] for r in rows if r[1] == rule and r[3] == "test_acc"), default=0)


def mean_over_layers(rows: list[Row], rule: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        if r[1] == rule and r[3] == metric and r[4]:
            by_epoch.setdefault(r[2], []).append(r[6])
    epochs = sorted(by_epoch)
    return np.array(epochs), np.array([_mean(by_epoch[e]) for e in epochs])


def pfa_floor(layer: Layer, expansion: float) -> float:
    """Theoretical path angle of converged PFA (W_b = B Bᵀ W) for this layer's shape."""
    n_in = int(np.prod(layer.shape[1:]))
    return predicted_path_angle(expansion, layer.shape[0], n_in)


def plot(
    rows: list[Row], task: Task, args: argparse.Namespace, rules: list[str], layers: list[Layer], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5), constrained_layout=True)
    (ax_acc, ax_loss, ax_mean), (ax_angle, ax_ratio, ax_grad) = axes
    depth = [lay.depth for lay in layers]
    grads = [r[6] for r in rows if r[3] == "grad_angle_deg" and math.isfinite(r[6])]
    for rule in rules:
        c = COLORS[rule]
        e, acc = curve(rows, rule, "test_acc")
        ax_acc.plot(e, 100 * acc, "-o" if len(e) < 15 else "-", ms=3, color=c, label=rule)
        if rule in task.reference_error:
            ax_acc.axhline(100 - task.reference_error[rule], color=c, ls=":", lw=1)
        e, loss = curve(rows, rule, "train_loss")
        ax_loss.plot(e, loss, "-o" if len(e) < 15 else "-", ms=3, color=c, label=rule)
        e, ang = mean_over_layers(rows, rule, "angle_deg")
        ax_mean.plot(e, ang, "-", color=c, label=f"{rule} W vs W_b")
        e, gang = mean_over_layers(rows, rule, "grad_angle_deg")
        ax_mean.plot(e, gang, "--", color=c, lw=1)
        final = last_epoch(rows, rule)
        for ax, metric in ((ax_angle, "angle_deg"), (ax_ratio, "norm_ratio"), (ax_grad, "grad_angle_deg")):
            vals = per_layer(rows, rule, metric, final)
            ax.plot(depth, [vals.get(lay.name, np.nan) for lay in layers], "-o", ms=3, color=c, label=rule)
    if "pfa" in rules:
        ax_angle.plot(depth, [pfa_floor(lay, args.expansion) for lay in layers], ":", color=COLORS["pfa"], lw=1.2, label="PFA theory (converged)")  # fmt: skip
    ax_acc.set(title="Test accuracy (top-1, %)" + (f"\ndotted: published ({task.reference_source})" if task.reference_error else ""), xlabel="epoch")  # fmt: skip
    losses = [r[6] for r in rows if r[3] == "train_loss" and math.isfinite(r[6]) and r[6] > 0]
    ax_loss.set(title="Train loss (epoch mean)", xlabel="epoch")
    if losses and max(losses) > 10 * min(losses):
        ax_loss.set_yscale("log")
    ax_mean.set(title="Mean over layers (°): angle W vs W_b (solid),\nangle of rule's vs BP's weight update, fixed batch (dashed)", xlabel="epoch", ylim=(-2, max([95.0, *grads]) + 3))  # fmt: skip
    ax_angle.set(title="Final angle W vs W_b per layer (°; path alignment for PFA)", ylim=(-2, 95))
    ax_ratio.set(title="Final norm ratio |W_b| / |W| per layer", yscale="log")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_grad.set(title="Final angle, rule's vs BP's weight update per layer (°)", ylim=(-2, max([95.0, *grads]) + 3))
    for ax in (ax_angle, ax_ratio, ax_grad):
        ax.set_xticks(depth, [lay.name for lay in layers], rotation=90, fontsize=6)
        ax.set_xlabel("layer (network order)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax in (ax_acc, ax_loss, ax_mean) and args.wd_epochs < args.epochs:
            ax.axvline(args.wd_epochs, color="grey", lw=0.8, ls=":")
    ax_acc.legend(fontsize=9)
    ax_angle.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"{task.title}: SGD lr {args.lr:g} ({args.schedule}), batch {args.batch_size}, momentum {args.momentum:g}, "
        f"weight decay {args.weight_decay:g} for {args.wd_epochs} epoch(s) (dotted vertical) then ×{args.wd_factor:g}; "
        f"expansion {args.expansion:g}; seed {args.seed}" + (" [SMOKE: generated data]" if args.smoke else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(rows: list[Row], task: Task, args: argparse.Namespace, info: dict[str, Any], d: Dist) -> dict[str, Any]:
    """Final numbers per rule trained so far (the keys of ``info``)."""
    per_rule = {}
    for rule in info:
        final = last_epoch(rows, rule)
        acc = curve(rows, rule, "test_acc")[1]
        angle = per_layer(rows, rule, "angle_deg", final)
        ratio = per_layer(rows, rule, "norm_ratio", final)
        grad = per_layer(rows, rule, "grad_angle_deg", final)
        per_rule[rule] = {
            "epochs_done": final,
            "test_acc": float(acc[-1]) if len(acc) else float("nan"),
            "best_test_acc": float(np.nanmax(acc)) if len(acc) else float("nan"),
            "test_error_pct": 100 * (1 - float(acc[-1])) if len(acc) else float("nan"),
            "published_error_pct": task.reference_error.get(rule),
            "mean_angle_deg": _mean(angle.values()),
            "mean_norm_ratio": _mean(ratio.values()),
            "mean_grad_angle_deg": _mean(grad.values()),
            "angle_deg": angle,
            "norm_ratio": ratio,
            "grad_angle_deg": grad,
            "train_s": info[rule]["train_s"],
            "diverged": info[rule]["diverged"],
        }
    first = next(iter(info.values()))["layers"]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"}
    return {
        "figure": task.title,
        "command": f"python examples/{task.name}.py " + " ".join(args.argv),
        "config": config,
        "data": {"source": task.data_source, "n_train": len(task.train_set), "n_test": len(task.test_set)},
        "world_size": d.world,
        "device": str(d.device),
        "layers": [{"name": lay.name, "depth": lay.depth, "shape": list(lay.shape)} for lay in first],
        "reference_error_pct": {"source": task.reference_source, **task.reference_error},
        "rules": per_rule,
        "torch": torch.__version__,
    }


def format_table(summary: dict[str, Any]) -> str:
    head = f"{'rule':<6} | {'test err %':>10} | {'published':>9} | {'best acc %':>10} | {'angle W,W_b':>11} | {'|W_b|/|W|':>9} | {'grad angle':>10} | {'train s':>8}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for rule, r in summary["rules"].items():
        pub = f"{r['published_error_pct']:.2f}" if r["published_error_pct"] is not None else "-"
        lines.append(
            f"{rule:<6} | {r['test_error_pct']:>10.2f} | {pub:>9} | {100 * r['best_test_acc']:>10.2f} | "
            f"{r['mean_angle_deg']:>10.1f}° | {r['mean_norm_ratio']:>9.2f} | {r['mean_grad_angle_deg']:>9.1f}° | {r['train_s']:>8.1f}"
        )
    lines.append("angles and norm ratio: mean over layers at the last epoch; published: " + summary["reference_error_pct"]["source"])  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace, d: Dist, task: Task) -> dict[str, Any] | None:
    """Train every rule, write ``curves.csv``, ``<task.name>.png`` and ``summary.json`` (rank 0)."""
    if d.main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(
            f"{task.name}: data {task.data_source} ({len(task.train_set)} train / {len(task.test_set)} test); "
            f"rules {' '.join(args.rules)}; {args.epochs} epochs; world size {d.world}; device {d.device}",
            flush=True,
        )
    torch.manual_seed(args.seed)
    init = task.build_model()
    if args.sync_bn:
        if d.device.type != "cuda":
            raise SystemExit("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on CPU)")
        init = nn.SyncBatchNorm.convert_sync_batchnorm(init)
    rec = Recorder(args.seed, args.out / "curves.csv" if d.main else None)
    info: dict[str, Any] = {}
    summary = None
    for rule in args.rules:
        info[rule] = train_rule(init, rule, task, args, d, rec)
        if d.main:  # after every rule, so a long run leaves usable outputs if it stops early
            plot(rec.rows, task, args, list(info), info[rule]["layers"], args.out / f"{task.name}.png")
            summary = summarize(rec.rows, task, args, info, d)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        d.barrier()
    if d.main:
        print(format_table(summary))
        print(f"wrote {args.out}/curves.csv, {task.name}.png, summary.json")
    return summary


@contextlib.contextmanager
def distributed(args: argparse.Namespace) -> Iterator[Dist]:
    """Process group (under torchrun) and torch threads for the duration of a run."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    d = setup_distributed(args.device)
    try:
        yield d
    finally:
        cleanup_distributed()
        torch.set_num_threads(threads)


def argv_list(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
