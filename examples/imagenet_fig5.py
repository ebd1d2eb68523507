"""Reproduce the setting of the paper's Figure 5: ResNet-18 on ImageNet with every rule of pfa_fx (BP, FA, SF, KP, PFA, PFA-o, ...).

Li Ji-An & Marcus K. Benna, *Deep Learning without Weight Symmetry* (arXiv 2405.20594),
Figure 5: top-1 test (validation) accuracy over training for each credit-assignment rule,
and per layer the alignment and norm ratio between ``W`` and the feedback ``W_b`` (the
path ``B·R`` for PFA/PFA-o).

Model: torchvision's ResNet-18 (``num_classes`` = the number of class folders),
re-initialised Xavier-uniform (zero biases) as in the paper's recipe: 20 convs + 1 linear
= 21 converted weight ops (the three 1x1 downsampling convs included).

Data: ``torchvision.datasets.ImageFolder`` at ``--data PATH/train`` and ``PATH/val`` (one
sub-folder per class; the usual ImageNet layout after ``valprep.sh``). Standard
transforms: training ``RandomResizedCrop(224)`` + horizontal flip; validation resize to
256 and ``CenterCrop(224)``; ImageNet mean/std normalization (``--image-size`` scales both).

Recipe (defaults; BioTorch's ResNet-18 ImageNet config, the paper's optimizer): SGD lr
0.1, momentum 0.9, global batch 256, 75 epochs, lr ×0.1 at epochs 20, 40, 60 (``--schedule
cosine`` as alternative), weight decay 0.01 for the first epoch then ×0.01, expansion 10.
PFA/PFA-o run with ``compact=True`` (exact under SGD; docs/design.md, section 'Compact PFA and optimizers'); ``--explicit-r``
keeps R. Published reference top-1 error (BioTorch, Sanfiz & Akrout 2021): BP 30.39 %,
FA 85.25 %, uSF 34.97 % (dotted lines in the accuracy panel).

Usage::

    # 8 GPUs, one process each (DDP, nccl); --batch-size is global
    torchrun --nproc_per_node=8 examples/imagenet_fig5.py --data /data/imagenet --amp bf16 --channels-last
    torchrun --nproc_per_node=8 examples/imagenet_fig5.py --data /data/imagenet --rules bp pfa --compile --sync-bn
    # FSDP2 instead of DDP: model, feedback state and momentum sharded over the ranks; checkpoints
    # in --out/checkpoint.dcp (torch.distributed.checkpoint); not with --compile or --channels-last
    torchrun --nproc_per_node=8 examples/imagenet_fig5.py --data /data/imagenet --amp bf16 --fsdp
    python examples/imagenet_fig5.py --data /data/imagenet --rules pfa --limit-steps 100 --epochs 2   # one process
    # after a crash or preemption: the same command plus --resume (checkpoint every 1000 steps as well)
    torchrun --nproc_per_node=8 examples/imagenet_fig5.py --data /data/imagenet --checkpoint-every 1000 --resume
    python examples/imagenet_fig5.py --smoke --out /tmp/fig5                                          # CI, seconds
    torchrun --nproc_per_node=2 examples/imagenet_fig5.py --smoke --out /tmp/fig5                     # gloo on CPU

``--smoke`` writes a tiny ImageFolder (32 training and 16 validation images of 64 px,
10 classes, random pixels) under ``--out/smoke_data``, trains 2 rules for 1 epoch of 2
steps at 64 px, and deletes it afterwards.

Outputs in ``--out`` (default ``runs/imagenet_fig5``): ``curves.csv`` (long format: seed,
rule, epoch, metric, layer, depth, value; see ``examples/harness/outputs.py``),
``imagenet_fig5.png``, ``summary.json``, ``checkpoint.pt`` (every epoch and every
``--checkpoint-every`` steps, atomically; ``--resume`` continues from it, with the same
number of processes); only rank 0 writes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import harness as common  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PUBLISHED_ERROR = {"bp": 30.39, "fa": 85.25, "sf": 34.97}  # BioTorch ResNet-18, top-1 val error (%); sf = uSF
SMOKE = {"n_train": 32, "n_val": 16, "classes": 10, "px": 64}


def transforms(size: int) -> tuple[Any, Any]:
    import torchvision.transforms as T

    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    val = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])
    return train, val


def write_fake_imagefolder(root: Path, n_train: int, n_val: int, classes: int, px: int, seed: int = 0) -> Path:
    """A tiny ImageFolder (root/train/<class>/*.png, root/val/<class>/*.png) of random images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def load_imagefolder(root: Path, size: int) -> tuple[Dataset, Dataset]:
    from torchvision.datasets import ImageFolder

    root = root.expanduser()
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise SystemExit(f"{root} has no {' or '.join(missing)}/ folder: --data expects PATH/train and PATH/val")
    train_t, val_t = transforms(size)
    train, val = ImageFolder(str(root / "train"), train_t), ImageFolder(str(root / "val"), val_t)
    if train.classes != val.classes:
        raise SystemExit(f"train/ has {len(train.classes)} classes, val/ {len(val.classes)}: they must match")
    return train, val


def resnet18(num_classes: int) -> Any:
    import torchvision

    return common.xavier_init_(torchvision.models.resnet18(num_classes=num_classes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    defaults = common.Defaults(out="runs/imagenet_fig5", epochs=75, lr=0.1, batch_size=256, milestones=[20, 40, 60], workers=8)  # fmt: skip
    common.add_common_args(p, defaults)
    p.add_argument("--image-size", type=int, default=224, help="training crop / validation center crop")
    args = p.parse_args(argv)
    if args.smoke:  # 32 generated images, 1 epoch (unless --epochs) of 2 steps at 64 px
        args.batch_size, args.workers, args.align_batch = 16, 0, 8
        args.image_size = SMOKE["px"]
    elif args.data is None:
        p.error("--data PATH (with train/ and val/ ImageFolder sub-folders) is required unless --smoke")
    return common.check_args(p, args, defaults)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Train every rule (DDP under torchrun); rank 0 writes curves.csv, imagenet_fig5.png, summary.json
    and returns the summary (other ranks return None)."""
    args = parse_args(argv)
    args.argv = common.argv_list(argv)
    with common.process_group(args) as d:
        smoke_root = args.out / "smoke_data"
        if args.smoke:
            size = {k: SMOKE[k] for k in ("n_train", "n_val", "classes", "px")}
            if d.main:
                shutil.rmtree(smoke_root, ignore_errors=True)
                write_fake_imagefolder(smoke_root, **size, seed=args.seed)
            d.barrier()
            args.data = smoke_root
        train, val = load_imagefolder(args.data, args.image_size)
        reference = {k: v for k, v in PUBLISHED_ERROR.items() if k != "sf" or args.sf_variant == "usf"}
        task = common.Task(
            name="imagenet_fig5",
            title=f"ImageNet ResNet-18 ({len(train.classes)} classes, {args.image_size} px)",
            train_set=train,
            test_set=val,
            build_model=lambda: resnet18(len(train.classes)),
            data_source=("generated ImageFolder (smoke)" if args.smoke else "ImageFolder") + f" at {args.data}",
            reference_error=reference,
            reference_source="BioTorch ResNet-18 (BP, FA, uSF)",
        )
        summary = common.run(args, d, task)
        if args.smoke:
            d.barrier()
            if d.main:
                shutil.rmtree(smoke_root, ignore_errors=True)
        return summary


if __name__ == "__main__":
    main()
