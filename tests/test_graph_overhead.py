"""What the converted graph does per call to stay cheap, pinned down so that it stays
correct: feedback nodes read through one flat attribute (the same object that saves under
``pfa_feedback.<op>``), module weights read through one attribute chain, and PFA's route
choice counting the fixed cost of a convolution's extra native calls."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

import pfa_fx
from pfa_fx.ops import ConvFamily, LinearFamily


def _flat_nodes(model: nn.Module) -> dict[str, nn.Module]:
    return {k: v for k, v in vars(model).items() if k.startswith("pfa_fb_")}


def test_the_graph_reads_each_node_through_a_flat_attribute_that_is_the_saved_node():
    model = torchvision.models.resnet18(num_classes=10)
    converted = pfa_fx.convert(model, rule="kp")
    nodes = dict(pfa_fx.feedback_modules(converted))
    flat = _flat_nodes(converted)
    assert sorted(id(n) for n in flat.values()) == sorted(id(n) for n in nodes.values())
    assert "pfa_feedback." not in converted.code  # no nested chain left in the forward
    # saved once, under pfa_feedback.<op>, next to the model's own keys
    keys = set(converted.state_dict())
    own = set(model.state_dict())
    assert own <= keys
    assert {k.split(".B")[0] for k in keys - own} == {f"pfa_feedback.{n}" for n in nodes}


def test_a_deep_copy_trains_its_own_feedback_state():
    converted = pfa_fx.convert(torchvision.models.resnet18(num_classes=10), rule="kp")
    twin = copy.deepcopy(converted)
    for name, node in _flat_nodes(twin).items():
        assert node is twin.pfa_feedback.get_submodule(node.op_name), name
    twin(torch.randn(2, 3, 32, 32)).sum().backward()
    got = [n.B.grad is not None for _, n in pfa_fx.feedback_modules(twin)]
    assert all(got)
    assert all(n.B.grad is None for _, n in pfa_fx.feedback_modules(converted))


def test_pfa_route_counts_the_fixed_cost_of_a_convolutions_extra_calls():
    conv = pfa_fx.convert(nn.Conv2d(16, 16, 3), "pfa", compact=True)
    node = next(n for _, n in pfa_fx.feedback_modules(conv))
    # per-position mix 8·16·16 = 2,048 multiply-adds vs. G·S once 16·16·144 = 36,864
    assert node.choose_route(positions=8) == "population"
    assert node.choose_route(positions=8, call_macs=1_000_000) == "product"
    cpu = torch.device("cpu")
    family = ConvFamily([1, 1], [0, 0], [1, 1], 1, None)
    assert family.population_call_macs(cpu) > 36_864
    assert LinearFamily.population_call_macs(cpu) == 0  # same number of matmuls either way
    # the backward uses it: one native convolution backward per call, as BP makes
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    calls = []
    real = torch.ops.aten.convolution_backward.default
    import pfa_fx.ops as ops

    def counting(*args):
        calls.append(1)
        return real(*args)

    ops._CONV_BACKWARD, saved = counting, ops._CONV_BACKWARD
    try:
        conv(x).sum().backward()
    finally:
        ops._CONV_BACKWARD = saved
    assert len(calls) == 1
