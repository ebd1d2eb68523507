"""The figure of a Figure 4/5 run (:func:`plot`): accuracy and loss curves, mean alignment
over training, and the final per-layer angle, norm ratio and gradient alignment vs depth.

:mod:`.experiment` calls it as ``figure.plot``, looked up at each call, so a test can
replace it to skip the drawing (about half a second a run)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pfa_fx.theory import predicted_path_angle

from .outputs import Layer, Row, curve, last_epoch, mean_over_layers, per_layer
from .rules import COLORS

if TYPE_CHECKING:
    from .experiment import Task


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
        f"{task.title}: SGD lr {args.lr:g}{_lr_rule_text(args)} ({args.schedule}), batch {args.batch_size}, momentum {args.momentum:g}, "
        f"weight decay {args.weight_decay:g} for {args.wd_epochs} epoch(s) (dotted vertical) then ×{args.wd_factor:g}; "
        f"expansion {args.expansion:g}; seed {args.seed}" + (" [SMOKE: generated data]" if args.smoke else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lr_rule_text(args: argparse.Namespace) -> str:
    return "".join(f", {rule} {lr:g}" for rule, lr in args.lr_rule.items())
