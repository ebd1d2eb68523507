"""PFA five ways, one trajectory: the paper's population form (explicit error units ē,
written here independently as the oracle), and the library's explicit R and compact S
states, each through both backward routes (product: W_b built once per step; population:
the error mixed per position). docs/design.md, sections 'Backward routes' and 'Compact PFA and optimizers'."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp

import pfa_fx

DT = torch.float64


class _PopulationOp(torch.autograd.Function):
    """y = L_W(x) + b forward; backward through ē = B^T e, then e_in = R^T ē, ΔR ∝ ē ⊗ x."""

    @staticmethod
    def forward(ctx, x, W, b, R, B, conv, transposed=False):
        ctx.save_for_backward(x, W, R, B)
        ctx.conv, ctx.transposed = conv, transposed
        if conv is None:
            return F.linear(x, W, b)
        return F.conv_transpose2d(x, W, b, *conv) if transposed else F.conv2d(x, W, b, *conv)

    @staticmethod
    def backward(ctx, e):
        x, W, R, B = ctx.saved_tensors
        conv = ctx.conv
        g = B.shape[0]
        # the error population: ē = B^T e, channel by channel within each group
        if conv is None:
            ebar = e @ B[0]
            lin = lambda inp, w: F.linear(inp, w)  # noqa: E731
        else:
            n, c, h, w_ = e.shape
            eg = e.reshape(n, g, c // g, h, w_)
            ebar = torch.einsum("ngohw,gok->ngkhw", eg, B).reshape(n, -1, h, w_)
            op = F.conv_transpose2d if ctx.transposed else F.conv2d
            lin = lambda inp, w: op(inp, w, None, *conv)  # noqa: E731
        # R is the forward map x -> ē; its adjoint carries ē down, its local update is ē ⊗ x
        _, pull = vjp(lin, x, R)
        grad_x, grad_R = pull(ebar)
        _, pull_w = vjp(lambda w: lin(x, w), W)
        (grad_W,) = pull_w(e)
        grad_b = e.sum(0) if conv is None else e.sum((0, 2, 3))
        return grad_x, grad_W, grad_b, grad_R, None, None, None


class PopulationNet(nn.Module):
    """The same network as ``_net()``, trained with the population-form rule."""

    def __init__(self, net: nn.Sequential, nodes: dict):
        super().__init__()
        self.net = copy.deepcopy(net)
        self.R = nn.ParameterDict({k: nn.Parameter(n.R.detach().clone()) for k, n in nodes.items()})
        self.B = {k: n.B.detach().clone() for k, n in nodes.items()}

    def forward(self, x):
        for i, layer in enumerate(self.net):
            k = str(i)
            if isinstance(layer, nn.ConvTranspose2d):
                conv = (layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
                x = _PopulationOp.apply(x, layer.weight, layer.bias, self.R[k], self.B[k], conv, True)
            elif isinstance(layer, nn.Conv2d):
                conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
                x = _PopulationOp.apply(x, layer.weight, layer.bias, self.R[k], self.B[k], conv)
            elif isinstance(layer, nn.Linear):
                x = _PopulationOp.apply(x, layer.weight, layer.bias, self.R[k], self.B[k], None)
            else:
                x = layer(x)
        return x

    def feedback(self, k):
        B, R = self.B[k], self.R[k].detach()
        g = B.shape[0]
        shape = self.net[int(k)].weight.shape
        if isinstance(self.net[int(k)], nn.ConvTranspose2d):
            # W_b[(g, i), o, ...] = sum_j B[g, o, j] R[(g, i), j, ...]: W's (in, out/g, *k) layout
            Rg = R.reshape(g, R.shape[0] // g, R.shape[1], -1)
            return torch.einsum("goj,gijk->giok", B, Rg).reshape(shape)
        return torch.bmm(B, R.reshape(g, R.shape[0] // g, -1)).reshape(shape)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.Tanh(),
        nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2),  # 4x4 -> 8x8
        nn.Tanh(),
        nn.Conv2d(6, 12, 8),  # one output position per sample: the population mix is a matmul
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).to(DT)


def _train(model, steps, opt_kwargs, data):
    opt = torch.optim.SGD(model.parameters(), **opt_kwargs)
    for step in range(steps):
        if step == steps // 3:  # the paper's schedule: weight decay x0.01 after a while
            for group in opt.param_groups:
                group["weight_decay"] *= 0.01
        if step == 2 * steps // 3:
            for group in opt.param_groups:
                group["lr"] *= 0.3
        x, y = data[step % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


SGD_VARIANTS = {
    "momentum": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "dampening": {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.05},
}


@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
@pytest.mark.parametrize("rule", ["pfa", "pfa-o"])
def test_population_product_and_compact_forms_give_the_same_trajectory(variant, rule):
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(6, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 5, (6,), generator=gen)) for _ in range(5)
    ]
    net = _net()
    forms = {
        f"{state}-{route}": pfa_fx.convert(net, rule, expansion=3, seed=4, compact=state == "compact", route=route)
        for state in ("explicit", "compact")
        for route in ("product", "population")
    }
    population = PopulationNet(net, dict(pfa_fx.feedback_modules(forms["explicit-product"])))
    for model in (population, *forms.values()):
        _train(model, 30, SGD_VARIANTS[variant], data)
    for k in ("0", "2", "4", "6", "9"):
        W_pop = population.net[int(k)].weight.detach()
        Wb_pop = population.feedback(k)
        for name, model in forms.items():
            W = getattr(model, k).weight.detach()
            assert (W - W_pop).norm() <= 1e-9 * W_pop.norm(), name
            node = dict(pfa_fx.feedback_modules(model))[k]
            assert (node.feedback_weight() - Wb_pop).norm() <= 1e-9 * Wb_pop.norm(), name
    # and the rule really differs from BP: the feedback is not the weight
    node = dict(pfa_fx.feedback_modules(forms["explicit-product"]))["2"]
    assert (node.feedback_weight() - node.weight).norm() > 0.05 * node.weight.norm()


def test_compact_pfa_o_is_kolen_pollack_started_from_B_R0():
    net = _net()
    gen = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(6, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 5, (6,), generator=gen)) for _ in range(3)
    ]
    pfao = pfa_fx.convert(net, "pfa-o", expansion=2, compact=True)
    kp = pfa_fx.convert(net, "kp")
    for k, node in pfa_fx.feedback_modules(pfao):
        torch.testing.assert_close(node.G, torch.eye(node.G.shape[1], dtype=DT).expand_as(node.G), rtol=0, atol=1e-12)
        dict(pfa_fx.feedback_modules(kp))[k].B.data.copy_(node.feedback_weight())
    for model in (pfao, kp):
        _train(model, 12, SGD_VARIANTS["nesterov"], data)
    for k, node in pfa_fx.feedback_modules(pfao):
        torch.testing.assert_close(
            node.feedback_weight(), dict(pfa_fx.feedback_modules(kp))[k].B.detach(), rtol=1e-10, atol=1e-12
        )


def test_compact_state_under_adaptive_optimizers_is_another_rule_than_explicit_r():
    net = _net()
    data = [(torch.randn(6, 3, 8, 8, dtype=DT), torch.randint(0, 5, (6,)))]
    product = pfa_fx.convert(net, "pfa", expansion=3)
    compact = pfa_fx.convert(net, "pfa", expansion=3, compact=True)
    assert torch.allclose(
        dict(pfa_fx.feedback_modules(product))["2"].feedback_weight(),
        dict(pfa_fx.feedback_modules(compact))["2"].feedback_weight(),
    )
    opt = torch.optim.Adam(compact.parameters(), lr=1e-2)
    F.cross_entropy(compact(data[0][0]), data[0][1]).backward()
    opt.step()  # one group: S follows W's own Adam updates (tests/test_optim.py), not B·R's
    opt_p = torch.optim.Adam(product.parameters(), lr=1e-2)
    F.cross_entropy(product(data[0][0]), data[0][1]).backward()
    opt_p.step()
    a = dict(pfa_fx.feedback_modules(product))["2"].feedback_weight()
    b = dict(pfa_fx.feedback_modules(compact))["2"].feedback_weight()
    assert (a - b).norm() > 1e-4 * a.norm()


def test_compact_state_under_sgd_does_not_warn():
    import warnings

    compact = pfa_fx.convert(_net(), "pfa", expansion=3, compact=True)
    opt = torch.optim.SGD(compact.parameters(), lr=1e-2, momentum=0.9)
    compact(torch.randn(2, 3, 8, 8, dtype=DT)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_auto_route_picks_the_cheaper_backward_for_the_shape():
    big_kernel = pfa_fx.convert(nn.Conv2d(512, 512, 3), "pfa", expansion=10)
    node = next(n for _, n in pfa_fx.feedback_modules(big_kernel))
    assert node.choose_route(positions=128) == "population"  # last ResNet stage on 32 px images
    assert node.choose_route(positions=128 * 56 * 56) == "product"  # an early stage at 224 px
    compact = next(n for _, n in pfa_fx.feedback_modules(pfa_fx.convert(nn.Conv2d(512, 512, 3), "pfa", compact=True)))
    assert compact.choose_route(positions=128) == "population"
    assert compact.choose_route(positions=128 * 7 * 7) == "product"
    with pytest.raises(ValueError, match="valid routes: auto, product, population"):
        pfa_fx.convert(nn.Linear(3, 3), "pfa", route="fast")


def test_sparse_B_population_product_and_compact_forms_give_the_same_trajectory():
    # density 0.3: B is masked (each error unit reaches ~30 % of its group's output units,
    # grouped conv and grouped transposed conv included); G = B B^T is then no longer close
    # to I, and every form must still follow the population oracle exactly under SGD
    gen = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(6, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 5, (6,), generator=gen)) for _ in range(4)
    ]
    net = _net()
    forms = {
        f"{state}-{route}": pfa_fx.convert(
            net, "pfa", expansion=3, seed=4, density=0.3, compact=state == "compact", route=route
        )
        for state in ("explicit", "compact")
        for route in ("product", "population")
    }
    nodes = dict(pfa_fx.feedback_modules(forms["explicit-product"]))
    assert all(0.1 < (n.B != 0).double().mean().item() < 0.6 for n in nodes.values())
    population = PopulationNet(net, nodes)
    for model in (population, *forms.values()):
        _train(model, 12, SGD_VARIANTS["momentum"], data)
    for k in ("0", "2", "4", "6", "9"):
        W_pop = population.net[int(k)].weight.detach()
        Wb_pop = population.feedback(k)
        for name, model in forms.items():
            W = getattr(model, k).weight.detach()
            assert (W - W_pop).norm() <= 1e-9 * W_pop.norm(), (name, k)
            node = dict(pfa_fx.feedback_modules(model))[k]
            assert (node.feedback_weight() - Wb_pop).norm() <= 1e-9 * Wb_pop.norm(), (name, k)


def test_compact_state_below_expansion_one_is_refused_with_the_valid_forms():
    with pytest.raises(pfa_fx.ConversionError, match="compact=True needs expansion >= 1"):
        pfa_fx.convert(nn.Sequential(nn.Linear(8, 16)), "pfa", compact=True, expansion=0.5)
    pfa_fx.convert(nn.Sequential(nn.Linear(8, 16)), "pfa", expansion=0.5)  # explicit R: a bottleneck is fine
