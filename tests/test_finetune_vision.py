"""examples/finetune_vision.py: pretrain a timm model with BP, load it back through timm's
pretrained path, fine-tune it with every rule (plain and aligned start) on the built-in
data (--quick), write what it promises, and resume from its per-run checkpoints."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import struct
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STATS = ("test_acc_before", "test_acc_epoch1", "test_acc_final", "train_s", "forward_max_abs_diff")


def _load() -> ModuleType:
    for dep in ("matplotlib", "tqdm", "mlxtend", "sklearn"):
        pytest.importorskip(dep)
    spec = importlib.util.spec_from_file_location("examples_finetune_vision", EXAMPLES / "finetune_vision.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def test_quick_run_writes_outputs_and_resumes(tmp_path):
    fv = _load()
    out = tmp_path / "out"
    summary = fv.main(["--quick", "--no-progress", "--out", str(out)])

    for name in ("curves.csv", "summary.json", "finetune_vision.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "finetune_vision.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("command", "config", "seeds", "date", "machine", "wall_time_s", "data", "pretrained", "runs"):
        assert key in summary, key
    assert 0 < summary["pretrained"]["source_test_acc"] <= 1
    assert 0 < summary["pretrained"]["ridge_probe_acc"] <= 1

    rules = list(fv.RULES)
    plastic = [r for r in fv.PLASTIC if r in rules]
    expected = ["bp/scratch"] + [
        f"{r}/{s}" for r in rules for s in ("plain", "aligned") if s == "plain" or r in plastic
    ]
    assert list(summary["runs"]) == expected
    for name, run in summary["runs"].items():
        for key in STATS:
            assert _finite(run[key]["mean"]), (name, key)
        assert 0 <= run["test_acc_final"]["mean"] <= 1, name
        assert run["forward_max_abs_diff"]["mean"] < 1e-4, name  # the converted forward is the native one
        assert run["diverged"] == [False], name
        # DFA has no W-shaped feedback weight: no feedback angle, only its update's angle to BP's
        assert _finite(run["angle_end"]["mean"]) == (run["rule"] != "dfa"), name
        assert _finite(run["grad_angle_end"]["mean"]), name
    for rule in plastic:  # the aligned start did align: pfa_fx.mirror reached ops and lowered the angle
        aligned, plain = summary["runs"][f"{rule}/aligned"], summary["runs"][f"{rule}/plain"]
        assert aligned["mirrored_ops"][0] > 0, rule
        assert aligned["angle_start"]["mean"] < plain["angle_start"]["mean"] - 10, rule
    assert summary["runs"]["bp/plain"]["angle_end"]["mean"] < 0.5

    with (out / "curves.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(fv.CSV_HEADER)
    accs = [float(r["value"]) for r in rows if r["metric"] == "test_acc"]
    assert len(accs) == len(expected) * 3 and all(math.isfinite(v) for v in accs)  # epochs 0, 1, 2
    assert all(math.isfinite(float(r["value"])) for r in rows if r["metric"] == "train_loss")

    # a second call finds every (rule, start, seed) finished and trains nothing
    files = sorted((out / "runs").glob("*.json"))
    assert len(files) == len(expected)
    again = fv.main(["--quick", "--no-progress", "--out", str(out)])
    for name, run in summary["runs"].items():
        assert again["runs"][name]["test_acc_final"] == run["test_acc_final"], name
        assert again["runs"][name]["train_s"] == run["train_s"], name


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_folder_is_read(tmp_path):
    fv = _load()
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (10, 28, 28))}
    for split, x in images.items():
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(len(x)) % 10)
    data = fv.load_images(tmp_path, "FashionMNIST", download=False)
    assert data.x_train.shape == (30, 28, 28) and data.x_test.shape == (10, 28, 28)
    assert torch.equal(data.x_train, torch.as_tensor(images["train"], dtype=torch.uint8))
    assert data.y_test.tolist() == list(range(10)) and data.y_test.dtype == torch.long
    with pytest.raises(SystemExit, match="lacks"):
        (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
        fv.load_images(tmp_path, "FashionMNIST", download=False)


def test_mnist_and_fashion_go_together():
    fv = _load()
    with pytest.raises(SystemExit):
        fv.parse_args(["--mnist", "somewhere"])
