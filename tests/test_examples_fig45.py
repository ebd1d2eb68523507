"""The Figure 4 (CIFAR-10 ResNet-20) and Figure 5 (ImageNet ResNet-18) scripts run end to
end in smoke mode on generated data, in one process and under torchrun with two gloo
processes, and write what they promise."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCALARS = {"test_acc", "test_acc5", "test_loss", "lr", "weight_decay"}
PER_LAYER = {"angle_deg", "norm_ratio", "grad_angle_deg"}


def _load(name: str) -> ModuleType:
    for dep in ("matplotlib", "tqdm", "torchvision"):
        pytest.importorskip(dep)
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check_outputs(out: Path, name: str, rules: set[str], n_layers: int) -> list[dict[str, str]]:
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with (out / "curves.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["seed", "rule", "epoch", "metric", "layer", "depth", "value"]
    assert {r["rule"] for r in rows} == rules
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule]
        assert {r["epoch"] for r in mine} == {"0", "1"}, rule
        assert {r["metric"] for r in mine if r["epoch"] == "0"} >= SCALARS, rule
        assert "train_loss" in {r["metric"] for r in mine if r["epoch"] == "1"}, rule
        for metric in PER_LAYER:
            depths = {int(r["depth"]) for r in mine if r["metric"] == metric and r["epoch"] == "1"}
            assert depths == set(range(1, n_layers + 1)), (rule, metric)
    values = {(r["rule"], r["epoch"], r["metric"], r["layer"]): float(r["value"]) for r in rows}
    for layer in {r["layer"] for r in rows if r["layer"]}:
        assert values[("bp", "1", "angle_deg", layer)] == pytest.approx(0.0, abs=1e-3)  # W_b = W
        assert values[("bp", "1", "grad_angle_deg", layer)] == pytest.approx(0.0, abs=1e-3)
        if "pfa" in rules:
            assert values[("pfa", "0", "angle_deg", layer)] > 45  # random feedback path at init
    # every rule starts from the same network: same initial test loss
    assert len({round(values[(rule, "0", "test_loss", "")], 5) for rule in rules}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rules"]) == rules and len(summary["layers"]) == n_layers
    return rows


def test_cifar10_fig4_smoke(tmp_path):
    fig4 = _load("cifar10_fig4")
    summary = fig4.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--lr-rule", "pfa=0.05"])
    rows = _check_outputs(tmp_path, "cifar10_fig4", {"bp", "pfa"}, n_layers=20)  # 19 convs + fc (option A)
    assert summary["data"] == {"source": "generated (smoke)", "n_train": 64, "n_test": 32}
    assert summary["config"]["explicit_r"] is False  # compact PFA by default
    assert summary["rules"]["bp"]["published_error_pct"] == 8.63
    # --lr-rule: pfa trains at its own learning rate, bp at --lr
    assert (summary["rules"]["pfa"]["lr"], summary["rules"]["bp"]["lr"]) == (0.05, 0.1)
    lrs = {r["rule"]: float(r["value"]) for r in rows if r["metric"] == "lr" and r["epoch"] == "1"}
    assert lrs == {"bp": 0.1, "pfa": 0.05}
    # the per-epoch checkpoint holds the last rule, finished, and both rules' results
    ck = fig4.common.read_checkpoint(tmp_path / "checkpoint.pt")
    assert (ck["current"]["rule"], ck["current"]["epoch"], ck["current"]["finished"]) == ("pfa", 1, True)
    assert list(ck["done"]) == ["bp", "pfa"]


def test_cifar10_resnet20_is_the_standard_network():
    fig4 = _load("cifar10_fig4")
    a, b = fig4.ResNet20(shortcut="A"), fig4.ResNet20(shortcut="B")
    assert sum(p.numel() for p in a.parameters()) == 269_722  # He et al. (2016): 0.27M
    convs = [m for m in a.modules() if isinstance(m, fig4.nn.Conv2d)]
    assert len(convs) == 19 and {c.out_channels for c in convs} == {16, 32, 64}
    assert sum(isinstance(m, fig4.nn.Conv2d) for m in b.modules()) == 21  # two 1x1 projections
    x = fig4.torch.randn(2, 3, 32, 32)
    assert a(x).shape == b(x).shape == (2, 10)


def test_imagenet_fig5_smoke(tmp_path):
    fig5 = _load("imagenet_fig5")
    summary = fig5.main(["--smoke", "--no-progress", "--out", str(tmp_path)])
    _check_outputs(tmp_path, "imagenet_fig5", {"bp", "pfa"}, n_layers=21)  # 20 convs + fc
    assert summary["data"]["n_train"] == 32 and summary["data"]["n_test"] == 16
    assert summary["world_size"] == 1
    assert not (tmp_path / "smoke_data").exists()  # generated ImageFolder cleaned up


def test_imagenet_fig5_smoke_under_torchrun_two_processes(tmp_path):
    for dep in ("matplotlib", "tqdm", "torchvision"):
        pytest.importorskip(dep)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even where a GPU exists
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += [str(EXAMPLES / "imagenet_fig5.py"), "--smoke", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_outputs(tmp_path, "imagenet_fig5", {"bp", "pfa"}, n_layers=21)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    assert proc.stdout.count("wrote ") == 1  # only rank 0 writes and reports
