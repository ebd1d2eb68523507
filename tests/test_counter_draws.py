"""Fixed feedback drawn with ``generator="philox"``: each draw a pure function of (seed, op,
stream, position) from pfa_fx.counter_rng, so stored and redrawn feedback are the same
numbers by construction, a slice (a rank's rows) is drawn alone, and checkpoints record
which generator drew them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pfa_fx
from pfa_fx import ConversionError, counter_rng
from pfa_fx.draws import derived_seed
from tests.nets import MLP, Mixed

RULES = [("fa", {}), ("sf", {"variant": "frsf"}), ("pfa", {}), ("pfa-o", {"expansion": 2}), ("pfa", {"density": 0.5})]


def _nodes(model: nn.Module) -> dict:
    return dict(pfa_fx.feedback_modules(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("rule", "opts"), RULES)
def test_redrawn_feedback_equals_stored_feedback_bit_for_bit(rule, opts, dtype):
    torch.manual_seed(0)
    net = Mixed()
    stored = pfa_fx.convert(net, rule, generator="philox", **opts).to(dtype)
    redrawn = pfa_fx.convert(net, rule, generator="philox", store_feedback=False, **opts).to(dtype)
    a, b = _nodes(stored), _nodes(redrawn)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k].feedback_weight(), b[k].feedback_weight()), k
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    grads = []
    for model in (stored, redrawn):
        xi = x.clone().requires_grad_(True)
        model(xi).float().square().sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_philox_feedback_is_the_counter_generator_at_the_ops_key_and_differs_from_mt19937():
    lin = nn.Sequential(nn.Linear(30, 20))
    node = _nodes(pfa_fx.convert(lin, "fa", seed=7, generator="philox"))["0"]
    std = float(lin[0].weight.detach().double().square().mean().sqrt())
    key = derived_seed("pfa_fx", 7, "0")
    expected = (counter_rng.gaussian(key, 0, 0, 600, dtype=torch.float64) * std).float().view(20, 30)
    assert torch.equal(node.B, expected)  # stream 0 of the op's key, times W's RMS
    mt = _nodes(pfa_fx.convert(lin, "fa", seed=7))["0"]
    assert not torch.equal(mt.B, node.B)
    again = _nodes(pfa_fx.convert(lin, "fa", seed=7, generator="philox"))["0"]
    assert torch.equal(again.B, node.B)


def test_a_ranks_rows_drawn_alone_equal_the_same_rows_of_the_whole_draw():
    lin = nn.Sequential(nn.Linear(64, 48))
    node = _nodes(pfa_fx.convert(lin, "fa", seed=1, generator="philox"))["0"]
    key = derived_seed("pfa_fx", 1, "0")
    std = float(lin[0].weight.detach().double().square().mean().sqrt())
    for r0, r1 in [(0, 24), (24, 48), (5, 17)]:  # two ranks' halves, and an unaligned slice
        rows = counter_rng.gaussian_rows(key, 0, (48, 64), r0, r1, dtype=torch.float64)
        assert torch.equal((rows * std).float(), node.B[r0:r1])


def test_checkpoints_record_the_generator_and_a_redraw_under_another_one_is_refused():
    net = MLP()
    philox = pfa_fx.convert(net, "fa", generator="philox", store_feedback=False)
    sd = philox.state_dict()
    assert sd._metadata[""]["pfa_fx"]["generator"] == "philox4x32-10-boxmuller/1"
    assert "generator" not in pfa_fx.convert(net, "fa").state_dict()._metadata[""]["pfa_fx"]  # the default
    pfa_fx.convert(net, "fa", generator="philox", store_feedback=False).load_state_dict(sd)
    with pytest.raises(ConversionError, match="another conversion"):
        pfa_fx.convert(net, "fa", store_feedback=False).load_state_dict(sd)
    # stored feedback carries its numbers: it loads whatever the generator
    stored = pfa_fx.convert(net, "fa", generator="philox").state_dict()
    mt = pfa_fx.convert(net, "fa")
    mt.load_state_dict(stored)
    assert torch.equal(_nodes(mt)["0"].B, stored["pfa_feedback.0.B"])


def test_an_unknown_generator_is_refused_naming_the_valid_ones():
    with pytest.raises(
        ConversionError, match=r"unknown generator 'philx'; valid: 'mt19937', 'philox'; did you mean 'philox'"
    ):
        pfa_fx.convert(MLP(), "fa", generator="philx")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_seed_gives_the_same_feedback_on_cpu_and_cuda():
    net = Mixed()
    cpu = _nodes(pfa_fx.convert(net, "fa", generator="philox"))
    cuda = _nodes(pfa_fx.convert(net.cuda(), "fa", generator="philox"))
    for k in cpu:
        assert cuda[k].B.device.type == "cuda"
        assert torch.equal(cpu[k].B, cuda[k].B.cpu()), k
