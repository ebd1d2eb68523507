"""What a run records and writes: curve rows, ``curves.csv``, ``summary.json``, the table.

``curves.csv`` is long format (:data:`CSV_HEADER`), one value a row, kept by
:class:`Recorder` (rank 0). Per rule and epoch:

- ``test_acc``, ``test_acc5``, ``test_loss`` on the whole test/val set (sharded over
  ranks and summed), ``train_loss`` (mean minibatch loss of the epoch, over all ranks),
  ``lr``, ``weight_decay``, ``epoch_time_s``;
- per converted op (``layer`` = op name, ``depth`` = its position in the network, 1 =
  the stem conv): ``angle_deg`` and ``norm_ratio`` between ``W`` and the feedback ``W_b``
  (``pfa_fx.alignment``; path alignment ``B·R`` vs ``W`` for PFA/PFA-o), and
  ``grad_angle_deg``, the angle between the rule's weight update and BP's on one fixed
  batch of test images (``pfa_fx.gradient_alignment``, run in eval mode so BatchNorm
  uses its running statistics and the two passes see the same function).

Epoch 0 is the initial model (no ``train_loss``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import pfa_fx

from .distributed import Dist
from .rules import rule_lr

if TYPE_CHECKING:
    from .experiment import Task


CSV_HEADER = ("seed", "rule", "epoch", "metric", "layer", "depth", "value")
Row = tuple[int, str, int, str, str, str, float]


@dataclass
class Layer:
    """A converted op: its name, position in the network (1 = first) and weight shape."""

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
        if self.path is not None:
            write_csv(self.path, CSV_HEADER, self.rows)


def write_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    """``header`` and ``rows`` to ``path`` through a temporary file renamed over it, so the
    file is never seen half-written (it is rewritten after every epoch)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def finite_mean(values: Any) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


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
    return np.array(epochs), np.array([finite_mean(by_epoch[e]) for e in epochs])


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
            "lr": rule_lr(rule, args),
            "mean_angle_deg": finite_mean(angle.values()),
            "mean_norm_ratio": finite_mean(ratio.values()),
            "mean_grad_angle_deg": finite_mean(grad.values()),
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


def alignment_logger(args: argparse.Namespace, rule: str, state: dict[str, Any] | None) -> Any:
    """``pfa_fx.AlignmentLogger`` for ``rule``; when resuming, its CSV keeps the rows of the
    epochs the checkpoint covers (the logger itself always starts a new file)."""
    path = args.out / f"alignment_{rule}.csv"
    kept: list[list[str]] = []
    if state is not None and path.exists():
        with path.open(newline="") as f:
            kept = [row for row in itertools.islice(csv.reader(f), 1, None) if row and int(row[0]) <= state["epoch"]]
    tb = pfa_fx.AlignmentLogger(path, tensorboard_dir=args.tensorboard / rule)
    writer = getattr(tb, "_csv", None)  # private, but the only way to append through the open logger
    if kept and writer is not None:
        writer.writerows(kept)
    return tb
