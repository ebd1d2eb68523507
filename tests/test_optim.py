"""Optimizer groups, the decay burst, and compact PFA under AdamW: exact semantics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx

DT = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5)).to(DT)


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g, dtype=DT), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _node(model, name="0"):
    return dict(pfa_fx.feedback_modules(model))[name]


def test_param_groups_partition_the_parameters_by_role():
    model = pfa_fx.convert(_mlp(), "kp")
    groups = pfa_fx.param_groups(model, weight_decay=0.3)
    by_tag = {g["pfa_group"]: g for g in groups}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(by_tag["weights"]["params"]) == {id(model.get_parameter(n)) for n in ("0.weight", "3.weight")}
    assert ids(by_tag["feedback"]["params"]) == ids(pfa_fx.feedback_parameters(model))
    assert all(p.ndim < 2 for p in by_tag["no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert by_tag["weights"]["weight_decay"] == by_tag["feedback"]["weight_decay"] == 0.3
    assert by_tag["no_decay"]["weight_decay"] == 0.0
    # an unconverted model gets the same groups, without feedback
    assert [g["pfa_group"] for g in pfa_fx.param_groups(_mlp())] == ["weights", "no_decay"]
    # a name to leave undecayed, and the model's own no_weight_decay() (timm's convention)
    named = pfa_fx.param_groups(model, weight_decay=0.1, no_weight_decay=["0.weight"])
    assert len(next(g for g in named if g["pfa_group"] == "weights")["params"]) == 1
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        pfa_fx.param_groups(model, weight_decay=-1)


@pytest.mark.parametrize("rule", ["kp", "pfa-compact"])
def test_under_adamw_in_one_group_the_state_minus_w_only_decays(rule):
    """KP's B and compact PFA's S get grad_W itself: AdamW's updates of W and the state are
    then equal, and ``P - W = (P0 - W0)·∏(1 - lr_t·wd_t)`` — a burst included."""
    opts = {"compact": True, "expansion": 3} if rule == "pfa-compact" else {}
    model = pfa_fx.convert(_mlp(), rule.split("-")[0], **opts)
    name = "S" if opts else "B"
    nodes = [_node(model, k) for k in ("0", "3")]
    d0 = [(getattr(n, name) - n.weight).detach().clone() for n in nodes]
    lr, wd, burst_wd, burst_steps, steps = 1e-2, 0.1, 5.0, 4, 10
    opt = torch.optim.AdamW(pfa_fx.param_groups(model, weight_decay=wd), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    burst = pfa_fx.DecayBurst(opt, weight_decay=burst_wd, steps=burst_steps)
    factor = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported form: no warning
        for t, (x, y) in enumerate(_batches(steps)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            rate = lr / (1 + t)
            factor *= 1 - rate * (burst_wd if t < burst_steps else wd)
            opt.step()
            sched.step()
            burst.step()
    for n, d in zip(nodes, d0):
        torch.testing.assert_close(getattr(n, name) - n.weight, d * factor, rtol=1e-9, atol=1e-12)
    assert factor < 0.9  # the comparison is not vacuous


def test_compact_state_stepped_apart_from_its_weight_warns_under_adam():
    model = pfa_fx.convert(_mlp(), "pfa", compact=True, expansion=2)
    own, fb = pfa_fx.model_parameters(model), pfa_fx.feedback_parameters(model)
    opt = torch.optim.Adam([{"params": own}, {"params": fb, "lr": 1e-4}], lr=1e-3)
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="other hyperparameters than"):
        opt.step()


def test_decay_burst_sets_and_restores_the_tagged_groups_and_resumes():
    model = pfa_fx.convert(_mlp(), "kp")
    opt = torch.optim.AdamW(pfa_fx.param_groups(model, weight_decay=0.1), lr=1e-3)
    burst = pfa_fx.DecayBurst(opt, weight_decay=10.0, steps=2)
    wd = lambda: {g["pfa_group"]: g["weight_decay"] for g in opt.param_groups}  # noqa: E731
    assert wd() == {"weights": 10.0, "no_decay": 0.0, "feedback": 10.0}
    burst.step()
    state = burst.state_dict()
    burst.step()
    assert wd() == {"weights": 0.1, "no_decay": 0.0, "feedback": 0.1} and not burst.active
    opt2 = torch.optim.AdamW(pfa_fx.param_groups(model, weight_decay=0.1), lr=1e-3)
    resumed = pfa_fx.DecayBurst(opt2, weight_decay=10.0, steps=2)
    resumed.load_state_dict(state)
    assert resumed.active and opt2.param_groups[0]["weight_decay"] == 10.0
    with pytest.raises(ValueError, match="valid groups: weights, no_decay, feedback"):
        pfa_fx.DecayBurst(opt, weight_decay=1.0, steps=1, groups=["weight"])
    assert math.isclose(opt.param_groups[0]["lr"], 1e-3)
