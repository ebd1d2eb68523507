"""``--fsdp`` in the shared experiment harness (``examples/harness/``): FSDP2 sharding and
``--resume`` through sharded checkpoints (``--out/checkpoint.dcp``, torch.distributed.checkpoint).

With two gloo processes (one torchrun launch runs every case, as process start-up
dominates the cost):

- a run of PFA, brSF and WM stopped three times (inside PFA's second epoch, at the end of
  brSF's first, inside WM's second) and resumed each time ends with the curves and, for
  every rule, the final sharded state (model with feedback state and counters, optimizer,
  scheduler, every rank's RNG states and BatchNorm statistics) of the uninterrupted run,
  bit for bit;
- sharded over two processes, a run trains as one unsharded process does, to float
  tolerance, on a model without BatchNorm (whose per-rank batch statistics would differ);
- ``pfa_fx.angle_and_norm_ratio`` gathers unevenly sharded tensors (DTensor) exactly.

In one process (``--fsdp`` without torchrun runs in a group of one): every other rule
resumes as it would have run; a checkpoint of the other kind (sharded or not) or of
another world size is refused by name; a failed folder swap leaves the previous
checkpoint whole.

Runs use the CIFAR-10 script on its smoke data with a ResNet-8 (``tests/test_resume.py``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pfa_fx
from tests import test_resume
from tests.test_examples_fig45 import _load
from tests.test_resume import EXAMPLES, ROOT, SMALL, _curves, _run, _same

pytest.importorskip("torch.distributed.fsdp")
pytest.importorskip("torch.distributed.checkpoint")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed not built", allow_module_level=True)

fig4 = test_resume.fig4  # the fixture: the CIFAR-10 script with a ResNet-8 and no figure
RULES = ["pfa", "sf", "wm"]  # plastic feedback (PFA's S), per-batch draws (brSF), both (WM's B and steps)
STOPS = [3, 6, 11]  # steps over the run (2 epochs x 2 steps per rule): inside pfa, end of sf epoch 1, inside wm
MATCH_RULE = "kp"  # the rule trained sharded on 2 processes and unsharded on 1
UNEVEN = [(5, 3), (3, 2, 3, 3), (1, 7)]  # dim 0 not divisible by 2 ranks


def without_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by an identity: each rank would normalise its
    half of the batch with its own statistics, so 2 processes would not train as 1."""
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(m, name, nn.Identity())
    return model


DRIVER = """
import functools
import json
import shutil
import sys

sys.path.insert(0, {root!r})
sys.path.insert(0, {examples!r})
import torch
import torch.distributed as dist

import cifar10_fig4 as fig4
import pfa_fx
from tests.test_resume_fsdp import without_batchnorm

resnet = functools.partial(fig4.ResNet20, blocks=1)
fig4.ResNet20 = resnet
fig4.common.figure.plot = lambda *a, **k: None
save = fig4.common.checkpoint.Checkpointer.save


def keep_final_states(self, rule, *args, finished=None, **kwargs):
    # each rule's final checkpoint, kept aside before the next rule overwrites it
    save(self, rule, *args, finished=finished, **kwargs)
    if finished is not None and self.enabled and self.d.main:
        shutil.copytree(self.path, self.args.out / f"final_{{rule}}")
    self.d.barrier()


fig4.common.checkpoint.Checkpointer.save = keep_final_states
base = ["--smoke", "--no-progress", *{small!r}, "--fsdp", "--sf-variant", "brsf"]
three = base + ["--rules", *{rules!r}]
dist.init_process_group("gloo")  # one group for every run (the harness leaves it in place)
try:
    fig4.main(three + ["--out", {full!r}])
    fig4.main(three + ["--out", {cut!r}, "--stop-after-step", "{stops[0]}"])
    fig4.main(three + ["--out", {cut!r}, "--resume", "--stop-after-step", "{stops[1]}"])
    fig4.main(three + ["--out", {cut!r}, "--resume", "--stop-after-step", "{stops[2]}"])
    fig4.main(three + ["--out", {cut!r}, "--resume"])
    fig4.ResNet20 = lambda *a, **k: without_batchnorm(resnet(*a, **k))
    fig4.main(base + ["--rules", {match!r}, "--out", {nobn!r}, "--no-checkpoint"])

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    angles = []
    for shape in {uneven!r}:
        a, b = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in (a, b)]
        angles.append([pfa_fx.angle_and_norm_ratio(a, b), pfa_fx.angle_and_norm_ratio(*sharded)])
    if dist.get_rank() == 0:
        with open({angles!r}, "w") as f:
            json.dump(angles, f)
finally:
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every two-process run, in one torchrun launch; returns the folder and the output."""
    for dep in ("matplotlib", "tqdm", "torchvision"):
        pytest.importorskip(dep)
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    paths = {k: str(tmp / k) for k in ("full", "cut", "nobn")} | {"angles": str(tmp / "angles.json")}
    driver = tmp / "driver.py"
    text = DRIVER.format(root=str(ROOT), examples=str(EXAMPLES), small=SMALL, rules=RULES, stops=STOPS,
                         match=MATCH_RULE, uneven=UNEVEN, **paths)  # fmt: skip
    driver.write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even where a GPU exists
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(driver)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))  # their tracebacks
    assert proc.returncode == 0, proc.stdout[-2000:] + (ranks or proc.stderr)[-4000:]
    return tmp, proc.stdout


def _sharded_state(folder: Path, tmp: Path) -> dict[str, Any]:
    """Model and optimizer state of a sharded checkpoint, whole (read without a process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = tmp / f"{folder.parent.name}_{folder.name}.pt"
    dcp_to_torch_save(folder, whole)
    return torch.load(whole, weights_only=True)


# ----------------------------------------------------------------------------- two gloo processes
def test_stopped_and_resumed_three_times_equals_the_uninterrupted_run(two_processes, tmp_path):
    runs, stdout = two_processes
    full, cut = runs / "full", runs / "cut"
    for said in ("stopped in pfa after epoch 1 and 1 steps", "stopped in sf after epoch 1;", "stopped in wm after epoch 1 and 1 steps"):  # fmt: skip
        assert said in stdout
    common = _load("cifar10_fig4").common
    for rule in RULES:
        a, b = (common.read_checkpoint(run / f"final_{rule}" / common.checkpoint.STATE) for run in (full, cut))
        assert a["world_size"] == 2 and a["sharded"] and a["current"]["finished"] and b["current"]["finished"]
        assert a["current"]["model"] is None  # model and optimizer are in the folder's shards
        for key in ("scheduler", "epoch", "step", "rule"):
            _same(a["current"][key], b["current"][key], f"{rule}: {key}")
        for rank, (ra, rb) in enumerate(zip(a["current"]["ranks"], b["current"]["ranks"], strict=True)):
            _same(ra["rng"], rb["rng"], f"{rule}: rank {rank} rng")  # every random stream ends in the same place
            _same(ra["buffers"], rb["buffers"], f"{rule}: rank {rank} BatchNorm statistics")
        sa, sb = (_sharded_state(run / f"final_{rule}", tmp_path) for run in (full, cut))
        _same(sa, sb, f"{rule}: sharded state")
    # the counters of brSF (draws) and WM (mirror steps) moved: the comparison is not vacuous
    sf = _sharded_state(full / "final_sf", tmp_path)["model"]
    wm = _sharded_state(full / "final_wm", tmp_path)["model"]
    assert any(isinstance(v, dict) and v.get("step", 0) > 0 for k, v in sf.items() if k.endswith("_extra_state"))
    assert any(isinstance(v, dict) and v.get("steps", 0) > 0 for k, v in wm.items() if k.endswith("_extra_state"))
    assert _curves(full) == _curves(cut)  # every curve value of the three rules, as written
    sa, sb = (json.loads((p / "summary.json").read_text())["rules"] for p in (full, cut))
    for r in (sa, sb):
        for v in r.values():
            del v["train_s"]
    assert sa == sb and list(sa) == RULES


def test_two_sharded_processes_train_as_one_unsharded_process(two_processes, fig4, tmp_path, monkeypatch):
    runs, _ = two_processes
    resnet = fig4.ResNet20
    monkeypatch.setattr(fig4, "ResNet20", lambda *a, **k: without_batchnorm(resnet(*a, **k)))
    _run(fig4, tmp_path, MATCH_RULE, "--no-checkpoint")  # one process, no process group, no FSDP

    def values(out: Path) -> dict[tuple[str, ...], float]:  # (rule, epoch, metric, layer, depth) -> value
        with (out / "curves.csv").open(newline="") as f:
            return {tuple(r[1:6]): float(r[6]) for r in list(csv.reader(f))[1:]}

    one, two = values(tmp_path), values(runs / "nobn")
    assert one.keys() == two.keys()
    metrics = {k[2] for k in one}
    assert {"train_loss", "test_loss", "test_acc", "angle_deg", "norm_ratio", "grad_angle_deg"} <= metrics
    for key, v in one.items():
        if key[2] == "epoch_time_s":
            continue
        assert math.isfinite(v), key
        assert math.isclose(v, two[key], rel_tol=1e-5, abs_tol=1e-5), (key, v, two[key])


def test_angles_of_unevenly_sharded_tensors_are_those_of_the_whole_tensors(two_processes):
    runs, _ = two_processes
    angles = json.loads((runs / "angles.json").read_text())
    assert len(angles) == len(UNEVEN)
    for whole, sharded in angles:
        assert whole == sharded  # gathered first: the same numbers to the last bit


# ----------------------------------------------------------------------------- one process
@pytest.mark.parametrize("rule", [r for r in pfa_fx.RULES if r not in RULES])
def test_every_other_rule_resumes_through_a_sharded_checkpoint(fig4, rule, tmp_path):
    """The other rules, in one process (``--fsdp`` without torchrun: a group of one):
    stopped inside epoch 2 and resumed, they end as the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(fig4, full, rule, "--fsdp")
    assert _run(fig4, cut, rule, "--fsdp", "--stop-after-step", "3") is None
    _run(fig4, cut, rule, "--fsdp", "--resume")
    assert _curves(full) == _curves(cut)
    folder = fig4.common.checkpoint.SHARDED
    _same(_sharded_state(full / folder, tmp_path), _sharded_state(cut / folder, tmp_path), rule)


def test_a_checkpoint_of_the_other_kind_or_world_size_is_refused_by_name(fig4, tmp_path, two_processes):
    common = fig4.common
    out = tmp_path / "run"
    _run(fig4, out, "bp", "--stop-after-epoch", "1")
    with pytest.raises(SystemExit, match=r"checkpoint\.pt was written without --fsdp.*resume it without --fsdp"):
        _run(fig4, out, "bp", "--resume", "--fsdp")
    # --fsdp without torchrun: a one-process group; starting afresh sets the other kind aside
    _run(fig4, out, "bp", "--stop-after-epoch", "1", "--fsdp")
    assert (out / f"{common.CHECKPOINT}.bak").is_file() and not (out / common.CHECKPOINT).exists()
    assert (out / common.checkpoint.SHARDED / common.checkpoint.STATE).is_file()
    with pytest.raises(SystemExit, match=r"checkpoint\.dcp was written with --fsdp.*resume it with --fsdp"):
        _run(fig4, out, "bp", "--resume")
    runs, _ = two_processes  # a two-process checkpoint, resumed by one process
    with pytest.raises(SystemExit, match=r"written by 2 process\(es\), this run has 1"):
        fig4.main(["--smoke", "--no-progress", *SMALL, "--rules", *RULES, "--sf-variant", "brsf", "--fsdp",
                   "--out", str(runs / "cut"), "--resume"])  # fmt: skip


@pytest.mark.parametrize("flag", ["--compile", "--channels-last"])
def test_fsdp_refuses_what_it_cannot_combine_with(fig4, tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        _run(fig4, tmp_path, "bp", "--fsdp", flag)
    assert f"--fsdp excludes {flag}" in capsys.readouterr().err


def test_a_failed_folder_swap_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    ck = _load("cifar10_fig4").common.checkpoint

    def folder(tag: str) -> Path:
        tmp = tmp_path / f".{ck.SHARDED}.tmp"
        tmp.mkdir()
        (tmp / "__0_0.distcp").write_text(tag)
        ck.write_checkpoint(tmp / ck.STATE, {"format": 1, "tag": tag})
        return tmp

    ck.swap_in(folder("first"), tmp_path / ck.SHARDED)
    assert ck.sharded_folder(tmp_path) == tmp_path / ck.SHARDED
    second = folder("second")
    replace = os.replace
    calls = []

    def crash_on_second(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after moving the old folder aside, before the new one is in
        replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ck.swap_in(second, tmp_path / ck.SHARDED)
    found = ck.sharded_folder(tmp_path)
    assert found is not None and found != tmp_path / ck.SHARDED  # the previous one, set aside whole
    assert ck.read_checkpoint(found / ck.STATE)["tag"] == "first"
    monkeypatch.setattr(ck.os, "replace", replace)
    shutil.rmtree(second)  # as the next save does first
    ck.swap_in(folder("third"), tmp_path / ck.SHARDED)  # and the previous folder set aside goes
    assert ck.read_checkpoint(ck.sharded_folder(tmp_path) / ck.STATE)["tag"] == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.SHARDED]
