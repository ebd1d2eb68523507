"""Reproduce the setting of the paper's Figure 4: ResNet-20 on CIFAR-10 with every rule of pfa_fx (BP, FA, SF, KP, PFA, PFA-o, ...).

Li Ji-An & Marcus K. Benna, *Deep Learning without Weight Symmetry* (arXiv 2405.20594),
Figure 4: test accuracy over training for each credit-assignment rule, and per layer the
alignment (angle) and norm ratio between the forward weights ``W`` and the feedback
weights ``W_b`` (for PFA/PFA-o the path ``B·R``).

Model: the standard 3-stage CIFAR ResNet-20 of He et al. (2016): a 3x3 stem conv (16
channels), three stages of three basic blocks (16, 32, 64 channels; stride 2 at the
start of stages 2 and 3), global average pooling and a 64→10 linear layer: 19 convs + 1
linear = 20 weight ops, 0.27M parameters. Shortcuts are **option A** by default (as in
He et al.'s CIFAR experiments and BioTorch's ``resnet20``): identity, and where the shape
changes, stride-2 subsampling with zero-padded extra channels, so they hold no weights
and all feedback runs through the 20 weight ops. ``--shortcut B`` uses 1x1-conv + BN
projections instead (2 more converted ops). BatchNorm is plain (per process; running
statistics averaged over ranks before evaluation); ``--sync-bn`` on CUDA.

Recipe (defaults; BioTorch's ResNet-20 config, the paper's optimizer): SGD lr 0.1,
momentum 0.9, batch 128, 250 epochs, lr ×0.1 at epochs 100, 150, 200 (``--schedule
cosine`` as alternative), weight decay 0.01 for the first epoch then ×0.01, expansion 10,
Xavier-uniform weights (zero biases), standard augmentation (random crop with 4-pixel
padding, horizontal flip), per-channel normalization. PFA/PFA-o run with
``compact=True`` (exact under SGD; docs/design.md, section 'Compact PFA and optimizers'); ``--explicit-r`` keeps R.
Published reference error (BioTorch, Sanfiz & Akrout 2021): BP 8.63 %, FA 32.16 %,
uSF 10.05 % (dotted lines in the accuracy panel).

Usage::

    python examples/cifar10_fig4.py --download                 # ./data, every rule, 250 epochs
    python examples/cifar10_fig4.py --data ~/data --rules bp fa pfa --epochs 100 --schedule cosine
    torchrun --nproc_per_node=4 examples/cifar10_fig4.py --data ~/data   # DDP, global batch 128
    torchrun --nproc_per_node=4 examples/cifar10_fig4.py --data ~/data --fsdp   # FSDP2: each rank holds a shard
    python examples/cifar10_fig4.py --data ~/data --resume     # continue from --out/checkpoint.pt after a stop
    python examples/cifar10_fig4.py --rules fa pfa --lr-rule fa=0.02   # a learning rate per rule
    python examples/cifar10_fig4.py --smoke --out /tmp/fig4    # seconds, generated data (CI)

Outputs in ``--out`` (default ``runs/cifar10_fig4``): ``curves.csv`` (long format: seed,
rule, epoch, metric, layer, depth, value; see ``examples/harness/outputs.py`` for the metrics),
``cifar10_fig4.png`` (accuracy and loss curves, mean alignment over training, and final
per-layer angle, norm ratio and gradient alignment vs depth), ``summary.json``, and
``checkpoint.pt`` (rewritten atomically every epoch, or ``--checkpoint-every`` steps):
``--resume`` continues an interrupted run exactly where it stopped, with the same
results bit for bit on a CPU (``examples/harness/checkpoint.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import harness as common  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
PUBLISHED_ERROR = {"bp": 8.63, "fa": 32.16, "sf": 10.05}  # BioTorch ResNet-20, top-1 test error (%); sf = uSF


# ----------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, 0
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "A":  # subsample, zero-pad the new channels: no weights
                self.pad = cout - cin
            else:  # option B: 1x1 projection
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad:
            sc = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 16/32/64 channels, 3 basic blocks per stage."""

    def __init__(self, num_classes: int = 10, shortcut: str = "A", blocks: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, shortcut) for i in range(blocks))))  # fmt: skip
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- data
class ArrayImages(Dataset):
    """uint8 images (N, H, W, 3) and labels, read like torchvision's CIFAR10 (PIL + transform)."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: Any):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def transforms() -> tuple[Any, Any]:
    import torchvision.transforms as T

    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm]), T.Compose(norm)


def fake_cifar(n_train: int = 64, n_test: int = 32, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Random 32x32 RGB images with labels 0..9 (smoke mode: no download)."""
    rng = np.random.default_rng(seed)
    train_t, test_t = transforms()

    def make(n: int, t: Any) -> Dataset:
        return ArrayImages(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), [i % 10 for i in range(n)], t)

    return make(n_train, train_t), make(n_test, test_t)


def load_cifar(root: Path, download: bool) -> tuple[Dataset, Dataset]:
    from torchvision.datasets import CIFAR10

    train_t, test_t = transforms()
    root = root.expanduser()
    try:
        return (
            CIFAR10(str(root), train=True, download=download, transform=train_t),
            CIFAR10(str(root), train=False, download=download, transform=test_t),
        )
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise SystemExit(f"CIFAR-10 not found under {root} ({exc}); pass --download to fetch it") from exc


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    defaults = common.Defaults(out="runs/cifar10_fig4", epochs=250, lr=0.1, batch_size=128, milestones=[100, 150, 200], workers=4)  # fmt: skip
    common.add_common_args(p, defaults)
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data (default ./data)")
    p.add_argument(
        "--shortcut", choices=("A", "B"), default="A", help="ResNet shortcut: A zero-pad identity, B 1x1 conv"
    )
    args = p.parse_args(argv)
    if args.smoke:  # 64 generated images, 1 epoch (unless --epochs) of 2 steps
        args.batch_size, args.workers, args.align_batch = 32, 0, 16
    if args.data is None:
        args.data = Path("data")
    return common.check_args(p, args, defaults)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Train every rule; rank 0 writes curves.csv, cifar10_fig4.png, summary.json and returns the summary."""
    args = parse_args(argv)
    args.argv = common.argv_list(argv)
    with common.process_group(args) as d:
        if args.smoke:
            (train, test), source = fake_cifar(seed=args.seed), "generated (smoke)"
        else:
            train, test = common.main_first(d, lambda: load_cifar(args.data, args.download))
            source = f"torchvision CIFAR10 at {args.data}"
        reference = {k: v for k, v in PUBLISHED_ERROR.items() if k != "sf" or args.sf_variant == "usf"}
        task = common.Task(
            name="cifar10_fig4",
            title=f"CIFAR-10 ResNet-20 (option-{args.shortcut} shortcuts)",
            train_set=train,
            test_set=test,
            build_model=lambda: common.xavier_init_(ResNet20(10, args.shortcut)),
            data_source=source,
            reference_error=reference,
            reference_source="BioTorch ResNet-20 (BP, FA, uSF)",
        )
        return common.run(args, d, task)


if __name__ == "__main__":
    main()
