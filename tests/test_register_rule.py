"""A rule written outside the package (examples/custom_rule.py, the code the docs show) and
registered with ``pfa_fx.register_rule``: it converts a model, trains, saves and loads,
and the registry refuses what it cannot take."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pfa_fx
from pfa_fx import ConversionError
from tests.nets import MLP

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_rule.py"


@pytest.fixture
def custom():
    spec = importlib.util.spec_from_file_location("examples_custom_rule", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)  # registers "noisy-bp"
    yield module
    # the registry is process-wide: other tests in this worker list every registered rule
    pfa_fx.RULES.pop("noisy-bp", None)
    sys.modules.pop(spec.name, None)


def test_a_registered_rule_sends_the_error_through_its_own_feedback_weight(custom):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    model = pfa_fx.convert(nn.Sequential(lin), custom.NoisyBP(noise=0.7), seed=4)
    node = dict(pfa_fx.feedback_modules(model))["0"]
    assert node.rule == "noisy-bp" and node.config == {"noise": 0.7}
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, 5, dtype=torch.float64)
    y = model(x)
    assert torch.equal(y, lin(x))  # forward unchanged
    y.backward(e)
    N = node.N
    # independent formulas: grad_x = e (W + N), grad_W = e^T x, N at 0.7 x W's RMS
    torch.testing.assert_close(x.grad, e @ (lin.weight.detach() + N), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.get_parameter("0.weight").grad, e.t() @ x.detach(), rtol=0, atol=1e-12)
    assert 0.3 < float(N.std() / lin.weight.detach().square().mean().sqrt()) / 0.7 < 2.0
    # the name works as shorthand too, with options as keywords
    again = pfa_fx.convert(nn.Sequential(lin), "noisy-bp", noise=0.7, seed=4)
    assert torch.equal(dict(pfa_fx.feedback_modules(again))["0"].N, N)


def test_a_registered_rule_trains_saves_and_loads(custom):
    torch.manual_seed(0)
    net = MLP()
    model = pfa_fx.convert(net, custom.NoisyBP(noise=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)  # a learnable labelling
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert "noisy-bp" in str(pfa_fx.report(model))
    assert all(angle > 0 for angle, _ in pfa_fx.alignment(model).values())

    sd = model.state_dict()
    fresh = pfa_fx.convert(MLP(), "noisy-bp", noise=0.5)
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, sd[k]) for k, a in fresh.state_dict().items())
    with pytest.raises(
        ConversionError, match=r"(?s)checkpoint: noisy-bp\(noise=0\.5\).*this model: noisy-bp\(noise=1\.0\)"
    ):
        pfa_fx.convert(MLP(), custom.NoisyBP(noise=1.0)).load_state_dict(sd)


def test_the_registry_refuses_taken_names_and_wrong_classes(custom):
    with pytest.raises(ConversionError, match="'fa' is a built-in rule"):
        pfa_fx.register_rule("fa", custom.NoisyBP, custom.NoisyBPNode)
    with pytest.raises(ConversionError, match="registered already"):
        pfa_fx.register_rule("noisy-bp", custom.NoisyBP, custom.NoisyBPNode)
    with pytest.raises(ConversionError, match="lower-case"):
        pfa_fx.register_rule("Noisy", custom.NoisyBP, custom.NoisyBPNode)
    with pytest.raises(ConversionError, match=r"config_type must be a subclass of pfa_fx\.RuleConfig"):
        pfa_fx.register_rule("other", dict, custom.NoisyBPNode)
    with pytest.raises(ConversionError, match=r"node_type must be a subclass of pfa_fx\.FeedbackNode"):
        pfa_fx.register_rule("other", custom.NoisyBP, nn.Linear)

    @dataclasses.dataclass(frozen=True)
    class Broken(pfa_fx.RuleConfig):
        noise: float = -1.0

        def validate(self) -> None:
            if self.noise < 0:
                raise ConversionError("noise must be >= 0")

    with pytest.raises(ConversionError, match=r"Broken\(\) must construct with its defaults: noise must be >= 0"):
        pfa_fx.register_rule("broken", Broken, custom.NoisyBPNode)
    assert "broken" not in pfa_fx.RULES and "other" not in pfa_fx.RULES


def test_a_config_version_bump_upgrades_the_options_older_checkpoints_recorded(custom):
    @dataclasses.dataclass(frozen=True)
    class V1(pfa_fx.RuleConfig):
        amount: float = 0.25

    class V1Node(custom.NoisyBPNode):
        config_type = V1

        def __init__(self, weight, *, generator, **kwargs):
            pfa_fx.FeedbackNode.__init__(self, weight, generator=generator, **kwargs)
            self.amount = self.rule_config.amount
            self.register_buffer("N", self.draw(tuple(weight.shape), generator, weight, self.amount))

    pfa_fx.register_rule("versioned", V1, V1Node)
    old = pfa_fx.convert(MLP(), "versioned").state_dict()  # records amount=0.25, version 1

    @dataclasses.dataclass(frozen=True)
    class V2(pfa_fx.RuleConfig):
        VERSION = 2
        noise: float = 0.5  # the same feedback as V1's amount / 2... in the new unit

        @classmethod
        def upgrade(cls, options, version):
            return {"noise": options["amount"] * 2} if version < 2 else options

    class V2Node(custom.NoisyBPNode):
        config_type = V2

    pfa_fx.register_rule("versioned", V2, V2Node, replace=True)
    try:
        pfa_fx.convert(MLP(), "versioned", noise=0.5).load_state_dict(old)  # upgraded: the same configuration
        with pytest.raises(ConversionError, match="another conversion"):
            pfa_fx.convert(MLP(), "versioned", noise=0.25).load_state_dict(old)
    finally:
        del pfa_fx.RULES["versioned"]
