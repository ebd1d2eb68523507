"""Implicit Kolen–Pollack (``kp``, ``implicit=True``): ``W_b = W + α·D0`` with no W-sized
parameter, equal to explicit KP under torch.optim.SGD (pfa_fx/rules/kp.py)."""

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


def _pair(net: str):
    torch.manual_seed(0)
    make, shape = NETS[net]
    native = make().double()
    explicit = pfa_fx.convert(copy.deepcopy(native), "kp", seed=5)
    implicit = pfa_fx.convert(copy.deepcopy(native), "kp", seed=5, implicit=True)
    return native, explicit, implicit, shape


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize(
    "sgd",
    [
        {"dampening": 0.0},
        {"dampening": 0.1},
        {"nesterov": True},
        {"dampening": 0.1, "foreach": True},
        {"nesterov": True, "fused": True},
        {"nesterov": True, "maximize": True},
    ],
    ids=["momentum", "dampening", "nesterov", "foreach", "fused", "maximize"],
)
def test_implicit_equals_explicit_kp_under_sgd(net, sgd):
    _, explicit, implicit, shape = _pair(net)
    torch.manual_seed(1)
    batches = [torch.randn(shape, dtype=DT) for _ in range(10)]
    opt_e, sched_e = _sgd(explicit, **sgd)
    opt_i, sched_i = _sgd(implicit, **sgd)
    _train(explicit, opt_e, sched_e, batches)
    _train(implicit, opt_i, sched_i, batches)
    ne, ni = _nodes(explicit), _nodes(implicit)
    for k in ne:
        assert int(ni[k].steps) == 10
        B, Wb = ne[k].B.detach(), ni[k].feedback_weight()
        assert _rel(Wb, B) < 1e-10, k
        # and B did move: this is not the initial draw compared with itself
        assert _rel(B, ni[k].D0 + ni[k].weight) > 1e-4
    theirs = dict(explicit.named_parameters())
    mine = dict(implicit.named_parameters())
    assert set(mine) == {n for n in theirs if not n.endswith(".B")}
    for n, p in mine.items():
        assert _rel(p.detach(), theirs[n].detach()) < 1e-10, n


def test_momentum_free_sgd_and_steps_without_a_gradient():
    _, explicit, implicit, shape = _pair("mlp")
    torch.manual_seed(2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.05) for m in (explicit, implicit)]
    for step in range(6):
        x = torch.randn(shape, dtype=DT)
        for m, opt in zip((explicit, implicit), opts):
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            if step % 2:  # as if the first two ops were not used: SGD skips them (W and explicit B)
                for name, p in m.named_parameters():
                    if name.split(".")[-2] in ("0", "2"):
                        p.grad = None
            opt.step()
    ne, ni = _nodes(explicit), _nodes(implicit)
    assert [int(ni[k].steps) for k in ("0", "2", "4")] == [3, 3, 6]
    for k in ne:
        assert _rel(ni[k].feedback_weight(), ne[k].B.detach()) < 1e-10, k


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_forward_is_native_and_first_gradients_are_explicit_kps(net):
    native, explicit, implicit, shape = _pair(net)
    x = torch.randn(shape, dtype=DT)
    assert torch.equal(implicit(x), native(x))
    explicit(x).square().sum().backward()
    implicit(x).square().sum().backward()
    for k, n in _nodes(implicit).items():
        assert list(n.parameters()) == [] and n.D0.grad is None
        torch.testing.assert_close(n.feedback_weight(), _nodes(explicit)[k].B.detach(), rtol=1e-14, atol=1e-15)
    theirs = dict(explicit.named_parameters())
    for name, p in implicit.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-12, atol=1e-14)
    # and they differ from BP's: the feedback is not W
    native(x).square().sum().backward()
    first = next(iter(_nodes(implicit)))  # the op whose error came through every feedback weight
    grads = {n: p.grad for n, p in native.named_parameters()}
    assert not torch.allclose(dict(implicit.named_parameters())[f"{first}.weight"].grad, grads[f"{first}.weight"])


def test_a_checkpoint_mid_training_resumes_exactly():
    _, _, a, shape = _pair("conv")
    # a fresh conversion of another model with another seed: everything comes from the checkpoint
    saved = resumes_exactly(a, lambda: pfa_fx.convert(ConvNet().double(), "kp", seed=9, implicit=True), shape)
    assert {"alpha", "beta", "steps", "D0"} <= {k.rpartition(".")[2] for k in saved}
    assert float(_nodes(a)["fc"].alpha) != 1.0


def test_a_fresh_optimizer_on_a_loaded_checkpoint_continues_as_explicit_kp():
    # the momentum buffer restarts for W (and for explicit B): β restarts with it
    _, explicit, implicit, shape = _pair("mlp")
    torch.manual_seed(4)
    batches = [torch.randn(shape, dtype=DT) for _ in range(8)]
    for m in (explicit, implicit):
        opt, sched = _sgd(m)
        _train(m, opt, sched, batches[:4])
        opt, sched = _sgd(m)  # new optimizer, no momentum buffers
        _train(m, opt, sched, batches[4:])
    for k, n in _nodes(explicit).items():
        assert _rel(_nodes(implicit)[k].feedback_weight(), n.B.detach()) < 1e-10


@pytest.mark.parametrize("make", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_a_non_sgd_optimizer_is_refused_before_it_updates_anything(make):
    _, explicit, implicit, shape = _pair("mlp")
    opt = make(implicit.parameters(), lr=1e-3)
    implicit(torch.randn(shape, dtype=DT)).sum().backward()
    before = {k: v.clone() for k, v in implicit.state_dict().items()}
    with pytest.raises(ConversionTypeError, match=r"implicit=False") as err:
        opt.step()
    assert isinstance(err.value, TypeError) and "torch.optim.SGD" in str(err.value)
    for k, v in implicit.state_dict().items():
        assert torch.equal(v, before[k]), k
    # explicit KP, and models without implicit ops, train under Adam as before
    opt = make(explicit.parameters(), lr=1e-3)
    explicit(torch.randn(shape, dtype=DT)).sum().backward()
    opt.step()


def test_no_w_sized_parameter_and_state_is_w_plus_three_numbers():
    native, explicit, implicit, _ = _pair("conv")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(implicit) == count(native) < count(explicit)
    assert pfa_fx.feedback_parameters(implicit) == []
    for n in _nodes(implicit).values():
        assert n.state_numel() == n.D0.numel() + 3
        assert n.alpha.dtype == n.beta.dtype == DT and n.alpha.dim() == 0
        assert n.config == {"scale": "weight", "implicit": True}
        assert not n.plastic


def test_default_is_explicit_kp_unchanged():
    _, explicit, _, _ = _pair("mlp")
    default = pfa_fx.convert(MLP((20, 16, 12, 4)).double(), "kp")
    for gm in (explicit, default):
        for n in _nodes(gm).values():
            assert isinstance(n.B, nn.Parameter) and n.plastic and n.config["implicit"] is False
            assert set(n.state_dict()) == {"B"}
            assert n.feedback_weight() is not n.B and torch.equal(n.feedback_weight(), n.B.detach())


def test_alpha_stays_float64_and_copies_keep_learning():
    _, _, implicit, shape = _pair("mlp")
    check_float64_scalars_and_a_lone_copy(implicit, shape)


def test_a_hand_written_sgd_loop_calls_sgd_step():
    _, explicit, implicit, shape = _pair("mlp")
    opt = torch.optim.SGD(explicit.parameters(), lr=0.1, momentum=0.5, weight_decay=0.02)
    for step in range(4):
        x = torch.randn(shape, dtype=DT)
        opt.zero_grad()
        explicit(x).square().mean().backward()
        opt.step()
        implicit.zero_grad()
        implicit(x).square().mean().backward()
        with torch.no_grad():  # the same SGD by hand: W's buffer and update, then α/β
            for p in implicit.parameters():
                g = p.grad + 0.02 * p
                buf = p.__dict__.setdefault("_buf", g.clone()) if step == 0 else p._buf.mul_(0.5).add_(g)
                p.sub_(0.1 * buf)
        for n in _nodes(implicit).values():
            n.sgd_step(0.1, momentum=0.5, weight_decay=0.02, first=step == 0)
    for k, n in _nodes(explicit).items():
        assert _rel(_nodes(implicit)[k].feedback_weight(), n.B.detach()) < 1e-10


def test_a_checkpoint_of_the_other_form_is_refused():
    explicit = pfa_fx.convert(MLP().double(), "kp")
    implicit = pfa_fx.convert(MLP().double(), "kp", implicit=True)
    with pytest.raises(ConversionError, match=r"implicit"):
        implicit.load_state_dict(explicit.state_dict())
    with pytest.raises(ConversionTypeError, match="implicit must be True or False"):
        pfa_fx.convert(MLP(), "kp", implicit="yes")


def test_step_feedback_refuses_implicit_kp_naming_the_ops_and_sgd_step():
    model = pfa_fx.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "kp", implicit=True)
    with pytest.raises(
        pfa_fx.ConversionTypeError, match=r"implicit ops \(kp or compact pfa with implicit=True: 0, 2\).*sgd_step"
    ):
        pfa_fx.step_feedback(model)
