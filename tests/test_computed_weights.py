"""Ops whose weight the model computes from its parameters (timm's StdConv2d standardizes
its kernel in every forward): ``node.weight``, ``feedback_weight()`` and
``pfa_fx.alignment`` must describe the weight the op uses, from the current parameters,
with or without a forward since the last change (a checkpoint load, an optimizer step)."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import ScaledStdConv2d, StdConv2d
from torch import nn

import pfa_fx


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        StdConv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        ScaledStdConv2d(8, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


def _standardized(w: torch.Tensor, eps: float) -> torch.Tensor:
    """StdConv2d's kernel, written out: per output channel, zero mean and unit variance."""
    flat = w.detach().double().reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, unbiased=False, keepdim=True)
    return ((flat - mean) / (var + eps).sqrt()).reshape(w.shape)


def _nodes(model: nn.Module) -> dict[str, pfa_fx.FeedbackNode]:
    return dict(pfa_fx.feedback_modules(model))


def test_the_weight_of_a_standardized_conv_is_the_standardized_kernel_before_any_forward():
    net = _net()
    converted = pfa_fx.convert(net, rule="fa")
    node = _nodes(converted)["0"]
    expect = _standardized(net[0].weight, net[0].eps)
    torch.testing.assert_close(node.weight.double(), expect, rtol=1e-5, atol=1e-5)
    # the raw parameter is far from it: a fallback to the parameter would fail above
    assert not torch.allclose(net[0].weight.double(), expect, atol=1e-2)


def test_the_weight_follows_an_optimizer_step_without_a_forward():
    converted = pfa_fx.convert(_net(), rule="sf")
    x = torch.randn(4, 3, 8, 8)
    converted(x).sum().backward()
    opt = torch.optim.SGD(pfa_fx.model_parameters(converted), lr=0.5)
    opt.step()
    node = _nodes(converted)["0"]
    expect = _standardized(converted.get_parameter("0.weight"), 1e-6)
    torch.testing.assert_close(node.weight.double(), expect, rtol=1e-5, atol=1e-5)


def test_the_weight_matches_what_the_forward_used():
    converted = pfa_fx.convert(_net(), rule="fa")
    converted(torch.randn(2, 3, 8, 8))
    nodes = _nodes(converted)
    for name in ("0", "2"):  # the standardized convs: the op notes the weight it computed
        assert torch.equal(nodes[name].weight, nodes[name].__dict__["_last_weight"]), name
    # the Linear's weight is its parameter: nothing to note, node.weight reads it
    assert nodes["5"].__dict__["_last_weight"] is None
    assert torch.equal(nodes["5"].weight, converted.get_parameter("5.weight"))


@pytest.mark.parametrize("rule", ["fa", "sf", "kp", "pfa", "wm"])
def test_alignment_after_loading_a_checkpoint_equals_the_value_before_saving(rule, tmp_path):
    converted = pfa_fx.convert(_net(), rule=rule, seed=3)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        converted(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
    before = pfa_fx.alignment(converted)
    torch.save(converted.state_dict(), tmp_path / "ckpt.pt")

    restored = pfa_fx.convert(_net(), rule=rule, seed=3)
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    after = pfa_fx.alignment(restored)  # no forward since loading
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == pytest.approx(before[name], abs=1e-4), name


def test_a_deep_copy_reads_its_own_parameters():
    converted = pfa_fx.convert(_net(), rule="fa")
    twin = copy.deepcopy(converted)
    with torch.no_grad():
        twin.get_parameter("0.weight").mul_(-1.0)
    a, b = _nodes(converted)["0"].weight, _nodes(twin)["0"].weight
    torch.testing.assert_close(b, -a, rtol=1e-4, atol=1e-4)


def test_the_weight_follows_a_dtype_change_of_the_model():
    converted = pfa_fx.convert(_net(), rule="fa").to(torch.float64)
    assert _nodes(converted)["2"].weight.dtype == torch.float64


class _InputScaledLinear(nn.Module):
    """A weight computed from the input: no function of the parameters alone exists."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * x.mean())


def test_a_weight_computed_from_the_input_reports_the_last_forward_weight():
    converted = pfa_fx.convert(_InputScaledLinear(), rule="fa")
    node = _nodes(converted)["weight"]
    x = torch.randn(3, 4) + 2.0
    converted(x)
    expect = converted.get_parameter("weight").detach() * x.mean()
    torch.testing.assert_close(node.weight, expect)
