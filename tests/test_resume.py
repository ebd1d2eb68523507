"""Checkpoints and ``--resume`` of the shared experiment harness (``examples/harness/``).

A run stopped after its first epoch (or in the middle of an epoch) and resumed ends with
exactly the parameters, feedback state (brSF's draw counter included), optimizer and
scheduler state, RNG states and curves of an uninterrupted run: bit for bit on the CPU,
for every rule pfa_fx has, in one process and under torchrun with two gloo processes.
Damaged checkpoints are refused by name; a failed write leaves the previous one whole.

Runs use the CIFAR-10 script on its smoke data (64 generated images; 2 steps of 16 per
epoch) with one block per ResNet stage (ResNet-8: 7 convs, BatchNorm, fc); the figure is
not drawn here (``test_examples_fig45.py`` checks it).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import pfa_fx
from tests.test_examples_fig45 import _load  # the examples as modules, as their smoke tests load them

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMING = {"epoch_time_s"}  # wall-clock metrics: the only curve values allowed to differ
# 2 epochs of 2 steps of 16 images; a 4-image gradient-alignment probe (smoke data: 64 train / 32 test)
SMALL = ["--epochs", "2", "--batch-size", "16", "--limit-steps", "2", "--align-batch", "4"]
RULE_FLAGS = {"sf": ["--sf-variant", "brsf"]}  # brSF: the per-batch draw counter must survive a restart


@pytest.fixture
def fig4(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The CIFAR-10 script with a ResNet-8 (one block per stage: 7 convs + fc) and no figure."""
    module = _load("cifar10_fig4")
    monkeypatch.setattr(module, "ResNet20", functools.partial(module.ResNet20, blocks=1))
    monkeypatch.setattr(module.common.figure, "plot", lambda *a, **k: None)  # ~0.5 s a run, checked elsewhere
    return module


def _run(fig4: ModuleType, out: Path, rule: str, *extra: str) -> dict[str, Any] | None:
    argv = ["--smoke", "--no-progress", *SMALL, "--rules", rule, *RULE_FLAGS.get(rule, []), *extra]
    return fig4.main([*argv, "--out", str(out)])


def _curves(out: Path) -> list[list[str]]:
    with (out / "curves.csv").open(newline="") as f:
        return [row for row in csv.reader(f) if row[3] not in TIMING]


def _same(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested checkpoint content (tensors: same dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def _assert_same_run(common: ModuleType, full: Path, resumed: Path) -> None:
    a = common.read_checkpoint(full / common.CHECKPOINT)
    b = common.read_checkpoint(resumed / common.CHECKPOINT)
    assert a["current"]["finished"] and b["current"]["finished"]
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "rule"):
        _same(a["current"][key], b["current"][key], key)
    for rank, (ra, rb) in enumerate(zip(a["current"]["ranks"], b["current"]["ranks"], strict=True)):
        _same(ra["rng"], rb["rng"], f"rank {rank} rng")  # the random streams end in the same place
        _same(ra["buffers"], rb["buffers"], f"rank {rank} buffers")
    assert _curves(full) == _curves(resumed)  # every curve value, as written (repr of the float)
    sa, sb = (json.loads((p / "summary.json").read_text())["rules"] for p in (full, resumed))
    for r in (sa, sb):
        for v in r.values():
            del v["train_s"]
    assert sa == sb


# ----------------------------------------------------------------------------- every rule, one process
@pytest.mark.parametrize("rule", list(pfa_fx.RULES))
def test_resume_after_first_epoch_matches_uninterrupted_run(fig4, rule, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(fig4, full, rule, "--resume")  # --resume without a checkpoint starts afresh
    assert _run(fig4, cut, rule, "--stop-after-epoch", "1") is None
    ck = fig4.common.read_checkpoint(cut / fig4.common.CHECKPOINT)
    assert (ck["current"]["rule"], ck["current"]["epoch"], ck["current"]["step"]) == (rule, 1, 0)
    assert not ck["current"]["finished"] and ck["done"] == {}
    assert {int(r[2]) for r in ck["rows"]} == {0, 1}
    summary = _run(fig4, cut, rule, "--resume")
    assert summary is not None and summary["rules"][rule]["epochs_done"] == 2
    _assert_same_run(fig4.common, full, cut)


def test_resume_mid_epoch_with_other_workers_and_a_finished_rule(fig4, tmp_path, monkeypatch):
    """Stopped at step 3 (inside epoch 2) of the second rule (step 4 + 3 of the run),
    resumed with a DataLoader worker: the skipped steps are not replayed, augmentation
    does not depend on the worker, the first rule's results come back from the
    checkpoint, and dropout (torch's global RNG, drawn at every step) continues its
    stream from the restored state."""
    resnet = fig4.ResNet20

    class DropoutResNet(resnet.func):  # type: ignore[name-defined]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(torch.nn.functional.dropout(x, 0.2, self.training))

    monkeypatch.setattr(fig4, "ResNet20", functools.partial(DropoutResNet, **resnet.keywords))
    full, cut = tmp_path / "full", tmp_path / "cut"
    rules = ["bp", "pfa"]
    _run(fig4, full, rules[0], "--rules", *rules)
    assert _run(fig4, cut, rules[0], "--rules", *rules, "--stop-after-step", "7") is None
    ck = fig4.common.read_checkpoint(cut / fig4.common.CHECKPOINT)
    assert (ck["current"]["rule"], ck["current"]["epoch"], ck["current"]["step"]) == ("pfa", 1, 1)
    assert list(ck["done"]) == ["bp"]
    with pytest.raises(SystemExit, match=r"other settings \(lr: 0\.1 -> 0\.05\)"):
        _run(fig4, cut, rules[0], "--rules", *rules, "--resume", "--lr", "0.05")
    _run(fig4, cut, rules[0], "--rules", *rules, "--resume", "--workers", "1")
    _assert_same_run(fig4.common, full, cut)


# ----------------------------------------------------------------------------- two gloo processes
DRIVER = """
import sys
sys.path.insert(0, {examples!r})
import functools

import torch.distributed as dist

import cifar10_fig4 as fig4

fig4.ResNet20 = functools.partial(fig4.ResNet20, blocks=1)
fig4.common.figure.plot = lambda *a, **k: None
base = ["--smoke", "--no-progress", *{small!r}, "--rules", "sf", "--sf-variant", "brsf"]
dist.init_process_group("gloo")  # one group for the three runs (the harness leaves it in place)
try:
    fig4.main(base + ["--out", {full!r}])
    fig4.main(base + ["--out", {cut!r}, "--stop-after-step", "3"])
    fig4.main(base + ["--out", {cut!r}, "--resume"])
finally:
    dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_resume_under_torchrun_two_processes(tmp_path):
    """Under DDP (gloo): stopped inside epoch 2, where each rank's BatchNorm statistics and
    loss sums still differ, and resumed; one torchrun launch runs all three in turn."""
    for dep in ("matplotlib", "tqdm", "torchvision"):
        pytest.importorskip(dep)
    full, cut = tmp_path / "full", tmp_path / "cut"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER.format(examples=str(EXAMPLES), full=str(full), cut=str(cut), small=SMALL)))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even where a GPU exists
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(driver)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped in sf after epoch 1 and 1 steps" in proc.stdout
    common = _load("cifar10_fig4").common
    ck = common.read_checkpoint(cut / common.CHECKPOINT)
    assert ck["world_size"] == 2 and len(ck["current"]["ranks"]) == 2
    _assert_same_run(common, full, cut)


# ----------------------------------------------------------------------------- damaged checkpoints
def test_truncated_or_damaged_checkpoint_is_refused_by_name(tmp_path):
    common = _load("cifar10_fig4").common
    path = tmp_path / common.CHECKPOINT
    payload = {"format": 1, "weights": torch.arange(1000.0), "rows": [[0, "bp", 0, "test_acc", "", "", 0.1]]}
    common.write_checkpoint(path, payload)
    _same(common.read_checkpoint(path), payload, "payload")
    good = path.read_bytes()

    for cut in (len(good) - 1, len(good) // 2, 20):
        path.write_bytes(good[:cut])
        with pytest.raises(common.CheckpointError, match=rf"{path}.*truncated"):
            common.read_checkpoint(path)
    damaged = bytearray(good)
    damaged[-10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(common.CheckpointError, match=rf"{path}.*damaged"):
        common.read_checkpoint(path)
    torch.save(payload, path)  # a plain torch file is not taken for a checkpoint
    with pytest.raises(common.CheckpointError, match="not a pfa_fx checkpoint"):
        common.read_checkpoint(path)


def test_resume_from_a_truncated_checkpoint_exits_with_a_clear_error(fig4, tmp_path):
    common = fig4.common
    common.write_checkpoint(tmp_path / common.CHECKPOINT, {"format": 1, "x": torch.zeros(100)})
    data = (tmp_path / common.CHECKPOINT).read_bytes()
    (tmp_path / common.CHECKPOINT).write_bytes(data[:-50])
    with pytest.raises(SystemExit, match=r"checkpoint .*checkpoint\.pt is truncated: .* delete"):
        _run(fig4, tmp_path, "bp", "--resume")
    # without --resume the run starts afresh, and the old checkpoint is kept aside, not overwritten
    _run(fig4, tmp_path, "bp", "--epochs", "1")
    assert (tmp_path / f"{common.CHECKPOINT}.bak").read_bytes() == data[:-50]
    assert common.read_checkpoint(tmp_path / common.CHECKPOINT)["current"]["finished"]


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    common = _load("cifar10_fig4").common
    path = tmp_path / common.CHECKPOINT
    common.write_checkpoint(path, {"format": 1, "epoch": 1})

    def crash(*args: Any) -> None:
        raise KeyboardInterrupt  # killed between writing the new file and renaming it

    monkeypatch.setattr(common.checkpoint.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        common.write_checkpoint(path, {"format": 1, "epoch": 2})
    assert common.read_checkpoint(path) == {"format": 1, "epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [common.CHECKPOINT]  # no temporary file left
