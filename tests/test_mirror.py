"""pfa_fx.mirror: aligned starts for every plastic rule from noise, without weight transport."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx

DT = torch.float64


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return math.degrees(math.acos(float((a @ b) / (a.norm() * b.norm())).__round__(15)))


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """An MLP trained with backprop (a teacher task): the pretrained model of these tests."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(DT)
    teacher = nn.Linear(48, 8).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(150):
        x = torch.randn(32, 48, dtype=DT)
        loss = F.cross_entropy(model(x), teacher(x).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _floor(node) -> float:
    """The path angle PFA cannot go below: between ``B·Bᵀ·W`` and W (from the node's B or G)."""
    W = node.weight.double()
    G = node.held("G").double() if node.compact else node.held("B").double() @ node.held("B").double().mT
    return _angle(node._ungrouped(torch.bmm(G, node._grouped(W)), node.weight_shape), W)


CASES = [
    ("kp", {}, 10.0),
    ("kp", {"implicit": True}, 10.0),
    ("wm", {}, 10.0),
    ("pal", {}, 10.0),
    ("pfa-o", {}, 10.0),
    ("pfa", {}, None),
    ("pfa", {"compact": True}, None),
    ("pfa", {"compact": True, "implicit": True}, None),
]


@pytest.mark.parametrize(("rule", "opts", "bound"), CASES, ids=lambda c: str(c))
def test_mirror_aligns_every_plastic_rule_and_touches_nothing_else(trained, rule, opts, bound):
    gm = pfa_fx.convert(trained, rule, **opts)
    nodes = dict(pfa_fx.feedback_modules(gm))
    before = {k: _angle(n.weight, n.feedback_weight()) for k, n in nodes.items()}
    own = {k: v.clone() for k, v in gm.state_dict().items() if "pfa_feedback" not in k}
    rng = torch.get_rng_state()
    assert pfa_fx.mirror(gm, steps=300) == len(nodes) == 3
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG stream is untouched
    after = gm.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in own.items())  # W, biases, buffers untouched
    for k, n in nodes.items():
        angle = _angle(n.weight, n.feedback_weight())
        if bound is not None:
            assert angle < bound, (k, before[k], angle)
        else:  # PFA: the path B·R (or G·S) within 5° of its floor B·Bᵀ·W
            floor = _floor(n)
            assert floor <= angle < floor + 5.0, (k, before[k], floor, angle)
        assert before[k] > angle + 20  # it started unaligned: the comparison is not vacuous


def test_one_average_step_is_each_rules_local_update_with_the_same_noise_estimate(trained):
    """The noise stream is (seed, op name, draw): with one step of the average schedule KP's
    B, compact PFA's S and explicit PFA's R all become the rule's update of one estimate Ŵ:
    B = Ŵ, S = Ŵ, R = Bᵀ·Ŵ."""
    kp = pfa_fx.convert(trained, "kp")
    compact = pfa_fx.convert(trained, "pfa", compact=True, expansion=2)
    explicit = pfa_fx.convert(trained, "pfa", expansion=2)
    for gm in (kp, compact, explicit):
        pfa_fx.mirror(gm, steps=1)
    for name, node in pfa_fx.feedback_modules(kp):
        w_hat = node.B.detach()
        assert 5 < _angle(w_hat, node.weight) < 60  # a noisy estimate of W, not W
        torch.testing.assert_close(dict(pfa_fx.feedback_modules(compact))[name].S.detach(), w_hat)
        pfa = dict(pfa_fx.feedback_modules(explicit))[name]
        B = pfa.held("B")
        expected = pfa._ungrouped(torch.bmm(B.mT, pfa._grouped(w_hat)), tuple(pfa.R.shape))
        torch.testing.assert_close(pfa.R.detach(), expected)


def test_the_average_schedule_error_falls_as_one_over_sqrt_of_the_samples():
    torch.manual_seed(3)
    layer = nn.Linear(100, 40).to(DT)
    angles = []
    for steps in (10, 160):
        gm = pfa_fx.convert(nn.Sequential(layer), "kp")
        pfa_fx.mirror(gm, steps=steps, batch=50)
        node = dict(pfa_fx.feedback_modules(gm))["0"]
        angles.append(_angle(node.weight, node.B))
    # tan θ ≈ sqrt(fan_in / (batch·steps)): 16x the samples, a quarter of the error
    for steps, angle in zip((10, 160), angles):
        expected = math.degrees(math.atan(math.sqrt(100 / (50 * steps))))
        assert angle == pytest.approx(expected, rel=0.25)


def test_mirror_on_a_convolution_estimates_its_kernel():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).to(DT)
    gm = pfa_fx.convert(nn.Sequential(conv), "pfa", compact=True, expansion=3)
    node = dict(pfa_fx.feedback_modules(gm))["0"]
    assert _angle(node.S, conv.weight) > 60
    pfa_fx.mirror(gm, steps=400)
    assert _angle(node.S, conv.weight) < 5


def test_mirror_warns_and_does_nothing_on_a_model_without_plastic_ops(trained):
    gm = pfa_fx.convert(trained, {"0": "fa", "2": "sf", "4": "bp"})
    state = {k: v.clone() for k, v in gm.state_dict().items() if torch.is_tensor(v)}
    with pytest.warns(UserWarning, match="its ops use bp, fa, sf"):
        assert pfa_fx.mirror(gm, steps=3) == 0
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())


def test_mirror_rejects_bad_arguments(trained):
    gm = pfa_fx.convert(trained, "kp")
    with pytest.raises(ValueError, match="valid schedules: average, constant"):
        pfa_fx.mirror(gm, 1, schedule="avg")
    with pytest.raises(ValueError, match="steps must be an int"):
        pfa_fx.mirror(gm, -1)
    with pytest.raises(ValueError, match="batch must be an int"):
        pfa_fx.mirror(gm, 1, batch=0)


@pytest.mark.parametrize("opts", [{}, {"compact": True}], ids=["explicit", "compact"])
def test_floor_alignment_is_the_angle_of_b_bt_w(trained, opts):
    gm = pfa_fx.convert(trained, "pfa", expansion=2, **opts)
    floors = pfa_fx.floor_alignment(gm)
    nodes = dict(pfa_fx.feedback_modules(gm))
    assert set(floors) == set(nodes)
    for k, n in nodes.items():
        assert floors[k] == pytest.approx(_floor(n), abs=1e-9)
        # expansion 2, n_out 64: tan²θ ≈ (n_out + 1)/n̄, about 35°
        assert 25 < floors[k] < 45 or k == "4"
    ortho = pfa_fx.floor_alignment(pfa_fx.convert(trained, "pfa-o"))
    assert all(a < 1e-5 for a in ortho.values())
    assert pfa_fx.floor_alignment(pfa_fx.convert(trained, "kp")) == {}


@pytest.mark.parametrize(("rule", "opts"), [("kp", {}), ("pfa", {"expansion": 2}), ("pal", {})])
def test_constant_schedule_steps_applied_at_once_equal_steps_applied_one_by_one(trained, rule, opts):
    """A call's steps are applied as one update (the targets are linear in the estimate):
    three one-step calls (the draw count goes on between calls) give the state one
    three-step call gives."""
    one_by_one, at_once = pfa_fx.convert(trained, rule, **opts), pfa_fx.convert(trained, rule, **opts)
    for _ in range(3):
        pfa_fx.mirror(one_by_one, steps=1, schedule="constant", batch=8)
    pfa_fx.mirror(at_once, steps=3, schedule="constant", batch=8)
    a, b = dict(pfa_fx.feedback_modules(one_by_one)), dict(pfa_fx.feedback_modules(at_once))
    fresh = dict(pfa_fx.feedback_modules(pfa_fx.convert(trained, rule, **opts)))
    for k in a:
        torch.testing.assert_close(a[k].feedback_weight(), b[k].feedback_weight(), rtol=1e-9, atol=1e-12)
        assert not torch.equal(a[k].feedback_weight(), fresh[k].feedback_weight())  # the steps moved it
