"""The ablation's figures: grouped bars per model and rule (accuracy, gradient alignment to
BP, feedback alignment, step time; ``plot``), and both angles and the loss over training,
one column per model (``plot_curves``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pfa_fx

#: one color per rule in every plot (pfa_fx.RULES order, tab10)
RULE_COLORS = dict(
    zip(pfa_fx.RULES, ["black", "#d62728", "#8c564b", "#ff7f0e", "#1f77b4", "#17becf", "#bcbd22", "#2ca02c", "#9467bd"])
)


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
    width = 0.8 / len(rules)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.3 * len(models) + 2), 3.0 * len(panels)), sharex=True)
    for ax, (key, ylabel, panel_title, scale) in zip(axes, panels):
        top = 0.0
        for j, rule in enumerate(rules):
            xs = [i + (j - (len(rules) - 1) / 2) * width for i in range(len(models))]
            ys = [scale * float(by[(m, rule)][key]) if (m, rule) in by else float("nan") for m in models]
            ax.bar(xs, ys, width, color=RULE_COLORS[rule], label=rule)
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


def plot_curves(curves: list[dict[str, Any]], rules: list[str], path: Path, title: str) -> None:
    """Feedback angle, gradient alignment to BP and train loss over steps: one column per
    model, one line per rule (DFA has no feedback angle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in curves))
    panels = [  # (column, y label)
        ("path_angle", "feedback angle W vs W_b (°)"),
        ("grad_angle", "update angle to BP (°)"),
        ("train_loss", "train loss (mean since last point)"),
    ]
    fig, axes = plt.subplots(
        len(panels), len(models), figsize=(3.4 * len(models) + 1.2, 2.6 * len(panels)), sharex="col", squeeze=False
    )
    for j, model in enumerate(models):
        for i, (key, ylabel) in enumerate(panels):
            ax = axes[i][j]
            for rule in rules:
                pts = [(r["step"], float(r[key])) for r in curves if r["model"] == model and r["rule"] == rule]
                pts = [(s, v) for s, v in pts if math.isfinite(v)]
                if pts:
                    ax.plot(*zip(*pts), color=RULE_COLORS[rule], lw=1.4, marker="." if len(pts) < 30 else None, label=rule)  # fmt: skip
            ax.grid(alpha=0.3)
            if key == "train_loss":
                ax.set_ylim(bottom=0)
                ax.set_xlabel("step")
            else:
                ax.axhline(90, color="gray", lw=0.8, ls=":")
                ax.set_ylim(0, 100)
                ax.set_yticks(range(0, 91, 30))
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if i == 0:
                ax.set_title(model.replace(":", "\n", 1), fontsize=8)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(
        [handles[r] for r in rules if r in handles],
        [r for r in rules if r in handles],
        ncol=len(rules),
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.955),
        frameon=False,
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
