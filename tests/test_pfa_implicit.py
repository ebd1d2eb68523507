"""Implicit compact PFA (``pfa``, ``compact=True, implicit=True``): ``W_b = G·(W + α·D0)``
with no W-sized parameter, equal to compact PFA under torch.optim.SGD (pfa_fx/rules/pfa.py,
pfa_fx/rules/sgd_implicit.py)."""

import copy

import pytest
import torch
from torch import nn

import pfa_fx
from pfa_fx.errors import ConversionError, ConversionTypeError
from tests.nets import MLP
from tests.sgd_runs import NETS, ConvNet, check_float64_scalars_and_a_lone_copy, resumes_exactly
from tests.sgd_runs import nodes as _nodes
from tests.sgd_runs import rel as _rel
from tests.sgd_runs import sgd as _sgd
from tests.sgd_runs import train as _train

DT = torch.float64


def _pair(net: str, rule: str = "pfa", **options):
    torch.manual_seed(0)
    make, shape = NETS[net]
    native = make().double()
    opts = {"expansion": 4, "compact": True, **options}
    explicit = pfa_fx.convert(copy.deepcopy(native), rule, seed=5, **opts)
    implicit = pfa_fx.convert(copy.deepcopy(native), rule, seed=5, implicit=True, **opts)
    return native, explicit, implicit, shape


def _assert_trained_alike(explicit, implicit, steps=10):
    ne, ni = _nodes(explicit), _nodes(implicit)
    assert ne.keys() == ni.keys() and ne
    for k in ne:
        assert int(ni[k].steps) == steps, k
        mine, theirs = ni[k].feedback_weight(), ne[k].feedback_weight()
        assert _rel(mine, theirs) < 1e-10, k
    theirs = dict(explicit.named_parameters())
    mine = dict(implicit.named_parameters())
    assert set(mine) == {n for n in theirs if not n.endswith(".S")}
    for n, p in mine.items():
        assert _rel(p.detach(), theirs[n].detach()) < 1e-10, n


@pytest.mark.parametrize("route", ["product", "population"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize(
    "sgd",
    [{"dampening": 0.0}, {"dampening": 0.1}, {"nesterov": True}, {"nesterov": True, "maximize": True}],
    ids=["momentum", "dampening", "nesterov", "maximize"],
)
def test_implicit_equals_compact_pfa_under_sgd(net, route, sgd):
    _, explicit, implicit, shape = _pair(net, route=route)
    initial = {k: n.feedback_weight() for k, n in _nodes(explicit).items()}
    torch.manual_seed(1)
    batches = [torch.randn(shape, dtype=DT) for _ in range(10)]
    for m in (explicit, implicit):
        opt, sched = _sgd(m, **sgd)
        _train(m, opt, sched, batches)
    _assert_trained_alike(explicit, implicit)
    for k, n in _nodes(explicit).items():  # the feedback did move: not the initial draw against itself
        assert _rel(n.feedback_weight(), initial[k]) > 1e-4, k
        assert n.choose_route(1) == route


@pytest.mark.parametrize("rule,options", [("pfa", {"density": 0.5, "expansion": 10}), ("pfa-o", {})])
def test_sparse_feedback_and_pfa_o_implicit_equal_their_compact_form(rule, options):
    _, explicit, implicit, shape = _pair("conv", rule, **options)
    torch.manual_seed(2)
    batches = [torch.randn(shape, dtype=DT) for _ in range(10)]
    for m in (explicit, implicit):
        opt, sched = _sgd(m, nesterov=True)
        _train(m, opt, sched, batches)
    _assert_trained_alike(explicit, implicit)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_forward_is_native_and_both_routes_give_compact_pfas_gradients(net):
    native, explicit, implicit, shape = _pair(net, route="product")
    _, _, population, _ = _pair(net, route="population")
    x = torch.randn(shape, dtype=DT)
    assert torch.equal(implicit(x), native(x)) and torch.equal(population(x), native(x))
    for m in (explicit, implicit, population):
        m(x).square().sum().backward()
    theirs = dict(explicit.named_parameters())
    for m in (implicit, population):
        for k, n in _nodes(m).items():
            assert list(n.parameters()) == [] and n.D0.grad is None
            torch.testing.assert_close(
                n.feedback_weight(), _nodes(explicit)[k].feedback_weight(), rtol=1e-13, atol=1e-15
            )
        for name, p in m.named_parameters():
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-12, atol=1e-14)
    native(x).square().sum().backward()  # and they differ from BP's: the feedback is not W
    first = next(iter(_nodes(implicit)))
    ours = dict(implicit.named_parameters())[f"{first}.weight"].grad
    assert not torch.allclose(ours, dict(native.named_parameters())[f"{first}.weight"].grad)


@pytest.mark.parametrize("route", ["product", "population"])
def test_a_checkpoint_mid_training_resumes_exactly(route):
    _, _, a, shape = _pair("conv", route=route)

    def fresh():  # another model converted with the same options: everything comes from the checkpoint
        return pfa_fx.convert(ConvNet().double(), "pfa", seed=5, expansion=4, compact=True, implicit=True, route=route)

    saved = resumes_exactly(a, fresh, shape)
    assert {"alpha", "beta", "steps", "D0", "G"} <= {k.rpartition(".")[2] for k in saved}
    assert float(_nodes(a)["fc"].alpha) != 1.0 and int(_nodes(a)["fc"].steps) == 8


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.AdamW])
def test_a_non_sgd_optimizer_is_refused_before_it_updates_anything(make):
    _, _, implicit, shape = _pair("mlp")
    opt = make(implicit.parameters(), lr=1e-3)
    implicit(torch.randn(shape, dtype=DT)).sum().backward()
    before = {k: v.clone() for k, v in implicit.state_dict().items()}
    with pytest.raises(ConversionTypeError, match=r"compact=True, implicit=True\).*torch\.optim\.SGD") as err:
        opt.step()
    assert "pfa_fx.convert(model, 'pfa', compact=True) (implicit=False)" in str(err.value)
    for k, v in implicit.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_no_w_sized_parameter_and_the_native_parameter_count():
    native, explicit, implicit, _ = _pair("conv")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(implicit) == count(native) < count(explicit)
    assert pfa_fx.feedback_parameters(implicit) == []
    for n in _nodes(implicit).values():
        assert set(n.state_dict()) == {"G", "D0", "alpha", "beta", "steps"}
        assert n.alpha.dtype == n.beta.dtype == DT and n.alpha.dim() == 0
        assert n.config == {
            "expansion": 4,
            "compact": True,
            "route": "auto",
            "scale": "weight",
            "density": 1.0,
            "implicit": True,
        }
        assert not n.plastic
    for n in _nodes(explicit).values():
        assert isinstance(n.S, nn.Parameter) and n.plastic and not n.implicit


def test_implicit_needs_compact_and_a_bool():
    for options in ({}, {"compact": False}):
        with pytest.raises(ConversionError, match=r"implicit=True.*compact=True"):
            pfa_fx.convert(MLP(), "pfa", implicit=True, **options)
    with pytest.raises(ConversionTypeError, match="implicit must be True or False"):
        pfa_fx.convert(MLP(), "pfa", compact=True, implicit=1)
    # the explicit forms are as they were
    for options in ({}, {"compact": True}):
        for n in _nodes(pfa_fx.convert(MLP(), "pfa", **options)).values():
            assert n.plastic and not n.implicit and "D0" not in n.state_dict()


def test_alpha_stays_float64_and_a_copy_keeps_learning_alone():
    _, _, implicit, shape = _pair("mlp")
    check_float64_scalars_and_a_lone_copy(implicit, shape)


def test_a_checkpoint_of_the_other_compact_form_is_refused_naming_both():
    _, explicit, implicit, _ = _pair("mlp")
    with pytest.raises(ConversionError, match=r"(?s)implicit=True.*implicit=False"):
        implicit.load_state_dict(explicit.state_dict())
    with pytest.raises(ConversionError, match=r"implicit"):
        explicit.load_state_dict(implicit.state_dict())
    assert pfa_fx.conversion_config(explicit)["0"]["options"]["implicit"] is False
    assert pfa_fx.conversion_config(implicit)["0"]["options"]["implicit"] is True
