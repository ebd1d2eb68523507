"""Alignment metrics against direct computations."""

import csv

import pytest
import torch
import torch.nn.functional as F

import pfa_fx
from tests.nets import MLP

DT = torch.float64


def _closure(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def test_gradient_alignment_is_zero_for_bp_and_matches_a_separate_bp_model():
    torch.manual_seed(0)
    mlp = MLP((20, 32, 32, 4)).double()
    x, y = torch.randn(16, 20, dtype=DT), torch.randint(0, 4, (16,))
    bp = pfa_fx.convert(mlp, "bp")
    assert all(a == pytest.approx(0.0, abs=1e-5) for a in pfa_fx.gradient_alignment(bp, _closure(bp, x, y)).values())
    fa = pfa_fx.convert(mlp, "fa")
    angles = pfa_fx.gradient_alignment(fa, _closure(fa, x, y))
    # independent: BP gradients from the unconverted model, FA gradients from a plain backward
    mlp.zero_grad()
    F.cross_entropy(mlp(x), y).backward()
    fa.zero_grad()
    F.cross_entropy(fa(x), y).backward()
    for name in ("0", "2", "4"):
        expected, _ = pfa_fx.angle_and_norm_ratio(getattr(mlp, name).weight.grad, getattr(fa, name).weight.grad)
        assert angles[name] == pytest.approx(expected, abs=1e-9)
    assert angles["4"] == pytest.approx(0.0, abs=1e-5)  # the output layer's error is exact
    assert angles["0"] > 30.0


def test_gradient_alignment_leaves_grads_and_plastic_state_untouched():
    mlp = MLP().double()
    kp = pfa_fx.convert(mlp, "kp")
    x, y = torch.randn(8, 20, dtype=DT), torch.randint(0, 4, (8,))
    pfa_fx.gradient_alignment(kp, _closure(kp, x, y))
    assert all(p.grad is None for p in kp.parameters())


def test_alignment_logger_writes_long_format_csv(tmp_path):
    model = pfa_fx.convert(MLP(), "pfa", expansion=2)
    with pfa_fx.AlignmentLogger(tmp_path / "log.csv") as log:
        log.log(0, model, extra={"loss": 1.5}, gradient_angles={"0": 12.0})
        log.log(1, model)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    metrics = {(r["step"], r["metric"], r["op"]) for r in rows}
    assert (
        ("0", "angle_deg", "2") in metrics and ("0", "loss", "") in metrics and ("0", "grad_angle_deg", "0") in metrics
    )
    assert ("1", "norm_ratio", "4") in metrics


def test_gradient_alignment_does_not_advance_brsf_draws():
    gm = pfa_fx.convert(MLP().double(), "sf", variant="brsf")
    x, y = torch.randn(5, 20, dtype=DT), torch.randint(0, 4, (5,))
    gm(x).sum().backward()
    steps = [n.step for _, n in pfa_fx.feedback_modules(gm)]
    pfa_fx.gradient_alignment(gm, _closure(gm, x, y))
    assert [n.step for _, n in pfa_fx.feedback_modules(gm)] == steps == [1, 1, 1]
