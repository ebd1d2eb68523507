"""Sparse PFA feedback (``density < 1``): the mask, the scale of ``B``, the option's checks
and conversion. That the compact and explicit states stay equal under SGD with a sparse
``B`` is checked with the other forms in ``tests/test_pfa_forms.py``; the path alignment
against the theory in ``tests/test_theory.py``."""

import math

import pytest
import torch
from torch import nn

import pfa_fx
from pfa_fx.rules.pfa_parts import sparse_feedback_mask
from pfa_fx.theory import feedback_gram

DT = torch.float64


def _nodes(model: nn.Module) -> dict:
    return dict(pfa_fx.feedback_modules(model))


def _only(model: nn.Module):
    """The feedback node of a converted single layer."""
    (node,) = _nodes(model).values()
    return node


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10)).to(DT)


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: one output unit per group
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).to(DT)


def test_mask_has_the_asked_density_and_no_unit_without_connections():
    # Linear 64 -> 200 at expansion 4: 200 x 800 = 160,000 entries; the realized density of a
    # Bernoulli(0.3) mask has sd sqrt(0.3·0.7/160000) = 0.0011, so 2 % relative (0.006) is > 5 sd
    node = _only(pfa_fx.convert(nn.Linear(64, 200), "pfa", expansion=4, density=0.3))
    kept = node.B != 0
    assert kept.double().mean().item() == pytest.approx(0.3, rel=0.02)
    assert kept.any(dim=-1).all()
    # per error unit (column) the fraction of output units it reaches: mean 0.3, sd 0.032 over 200 units
    per_column = kept.double().mean(dim=1)
    assert per_column.mean().item() == pytest.approx(0.3, rel=0.02)
    assert per_column.std().item() < 0.05
    # grouped and depthwise convs: the mask is drawn per group, every output unit keeps a connection
    for name, node in _nodes(pfa_fx.convert(_convnet(), "pfa", expansion=3, density=0.2)).items():
        kept = node.B != 0
        assert kept.shape == (node.groups, node.n_out // node.groups, node.nbar // node.groups), name
        assert kept.any(dim=-1).all(), name


def test_empty_rows_get_one_connection():
    # density 0.01 on 50 x 10: P(row empty) = 0.99^10 = 90 %, so almost every row is repaired
    gen = torch.Generator().manual_seed(0)
    mask = sparse_feedback_mask((3, 50, 10), 0.01, gen)
    assert mask.any(dim=-1).all()
    assert (mask.sum(dim=-1) == 1).double().mean() > 0.8
    # and through the rule: n_out = n̄ = 32 at density 0.05 leaves ~19 % of the rows empty before repair
    node = _only(pfa_fx.convert(nn.Linear(8, 32), "pfa", expansion=1, density=0.05))
    assert (node.B[0] != 0).any(dim=-1).all()


def test_sparse_B_keeps_E_BBt_identity():
    # mean of G = B B^T over 4000 draws (n_out = 6, n̄ = 12, density 0.2): per entry the sd of
    # one draw is <= sqrt(E b⁴·n̄) ≈ sqrt(3/(p·n̄)) = 1.1, so the s.e. is <= 0.018; 0.08 is > 4 s.e.
    # A scale of 1/density instead of 1/sqrt(density) would put the diagonal at 5.
    gen = torch.Generator().manual_seed(3)
    mean = sum(feedback_gram(6, 2.0, gen, density=0.2) for _ in range(4000)) / 4000
    torch.testing.assert_close(mean, torch.eye(6, dtype=DT), rtol=0, atol=0.08)
    # one large layer: tr(G)/n_out has sd sqrt((3/p - 1)/(n_out·n̄)) = 0.005 (n_out = 256, n̄ = 1024, p = 0.1)
    node = _only(pfa_fx.convert(nn.Linear(16, 256).double(), "pfa", expansion=4, density=0.1))
    B = node.B[0]
    assert torch.trace(B @ B.T).item() / 256 == pytest.approx(1.0, abs=0.025)


@pytest.mark.parametrize("compact", [False, True])
def test_density_one_draws_exactly_the_dense_state(compact):
    net = _convnet()
    default = _nodes(pfa_fx.convert(net, "pfa", expansion=3, seed=5, compact=compact))
    dense = _nodes(pfa_fx.convert(net, "pfa", expansion=3, seed=5, compact=compact, density=1.0))
    sparse = _nodes(pfa_fx.convert(net, "pfa", expansion=3, seed=5, density=0.4))
    for name, node in default.items():
        for key, value in node.state_dict().items():
            assert torch.equal(value, dense[name].state_dict()[key]), (name, key)
        assert dense[name].density == 1.0 and "density=1.0" in repr(dense[name])
        if not compact:
            # the mask is drawn last: B's Gaussian values and R0 are the dense ones at any density
            assert torch.equal(sparse[name].R, node.R), name
            kept = sparse[name].B != 0
            torch.testing.assert_close(sparse[name].B[kept], node.B[kept] / math.sqrt(0.4), rtol=1e-15, atol=0)
            assert "density=0.4" in repr(sparse[name])


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", True, None])
def test_bad_density_is_refused(bad):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        pfa_fx.convert(nn.Linear(4, 4), "pfa", density=bad)
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        feedback_gram(4, 2.0, density=bad)


def test_pfa_o_refuses_sparse_B_and_compact_refuses_a_singular_G():
    with pytest.raises(ValueError, match="orthonormalizing the rows of a sparse B"):
        pfa_fx.convert(nn.Linear(4, 4), "pfa-o", density=0.5)
    assert _only(pfa_fx.convert(nn.Linear(4, 4), "pfa-o", density=1.0)).density == 1.0
    # n̄ < n_out: G has rank <= n̄, whatever the mask; the explicit R is still fine
    with pytest.raises(ValueError, match="raise density or expansion"):
        pfa_fx.convert(nn.Linear(8, 32), "pfa", expansion=0.5, density=0.5, compact=True)
    pfa_fx.convert(nn.Linear(8, 32), "pfa", expansion=0.5, density=0.5)


@pytest.mark.parametrize("make", [_mlp, _convnet])
@pytest.mark.parametrize("compact", [False, True])
def test_convert_with_density_keeps_the_forward_and_trains(make, compact):
    net = make()
    x = torch.randn(4, 20, dtype=DT) if make is _mlp else torch.randn(4, 3, 8, 8, dtype=DT)
    model = pfa_fx.convert(net, rule="pfa", density=0.3, expansion=4, compact=compact)
    assert torch.equal(model(x), net(x))
    nodes = _nodes(model)
    assert len(nodes) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in net.modules())
    for node in nodes.values():
        assert node.density == 0.3
        if not compact:
            assert 0.2 < (node.B != 0).double().mean().item() < 0.45
    x.requires_grad_(True)
    model(x).square().sum().backward()
    xn = x.detach().clone().requires_grad_(True)
    net(xn).square().sum().backward()  # convert copied the model: net is still native
    # the last layer's weight gradient is BP's; the input gradient went through sparse feedback
    last = str(len(net) - 1)
    torch.testing.assert_close(getattr(model, last).weight.grad, net[-1].weight.grad, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(x.grad).all()
    assert (x.grad - xn.grad).norm() > 1e-3 * xn.grad.norm()
