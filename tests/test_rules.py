"""Each rule's feedback weight and plastic update, as docs/design.md, section 'The rules', defines them."""

import copy

import pytest
import torch
import torch.nn.functional as F

import pfa_fx
from pfa_fx.rules import xavier_std
from tests.nets import MLP, Mixed

DT = torch.float64


def _nodes(gm):
    return dict(pfa_fx.feedback_modules(gm))


def _weight(gm, key):
    params = dict(gm.named_parameters())
    return params.get(f"{key}.weight", params.get(key))


# ops whose weight is a parameter used as is (StdConv's is computed, so its grad_W is not the
# parameter's gradient)
DIRECT = ("conv", "grouped", "depthwise", "conv1d", "conv3d", "tokens", "head_weight")


def _input():
    return torch.randn(2, 3, 8, 8, dtype=DT)


def test_bp_rule_reproduces_autograd_exactly():
    model = Mixed().double()
    gm = pfa_fx.convert(model, "bp")
    x = _input()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(x1).square().sum().backward()
    gm(x2).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    grads = dict(gm.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


def test_every_weight_op_of_the_mixed_model_is_converted():
    gm = pfa_fx.convert(Mixed(), "fa")
    # ops named by their weight's path ("head_weight" is a bare parameter used by F.linear)
    assert set(_nodes(gm)) == {"conv", "grouped", "depthwise", "std", "conv1d", "conv3d", "tokens", "head_weight"}


def test_fa_feedback_is_fixed_random_at_init_scale_and_gets_no_gradient():
    gm = pfa_fx.convert(MLP((200, 300, 10)).double(), "fa", scale="xavier")
    node = _nodes(gm)["0"]
    assert torch.equal(node.feedback_weight(), node.B)
    assert list(node.parameters()) == []
    assert node.B.std().item() == pytest.approx(xavier_std((300, 200)), rel=0.05)
    assert abs(F.cosine_similarity(node.B.flatten(), node.weight.flatten(), dim=0)) < 0.02


def _grads_wrt_input(gm, x):
    x = x.clone().requires_grad_()
    gm(x).square().sum().backward()
    return x.grad


@pytest.mark.parametrize("variant", ["usf", "frsf", "brsf"])
def test_sf_feedback_has_the_weights_signs(variant):
    gm = pfa_fx.convert(MLP().double(), "sf", variant=variant)
    gm(torch.randn(3, 20, dtype=DT)).sum().backward()
    for node in _nodes(gm).values():
        Wb = node.feedback_weight()
        assert torch.equal(torch.sign(Wb), torch.sign(node.weight))
        mags = Wb.abs()
        if variant == "usf":  # at W's own RMS (the default scale)
            rms = node.weight.square().mean().sqrt().item()
            assert torch.allclose(mags, torch.full_like(mags, rms))
        else:
            assert mags.std() > 0


def test_brsf_redraws_magnitudes_every_batch_and_reproducibly():
    mlp = MLP().double()
    a = pfa_fx.convert(mlp, "sf", variant="brsf", seed=3)
    b = pfa_fx.convert(mlp, "sf", variant="brsf", seed=3)
    na, nb = _nodes(a)["2"], _nodes(b)["2"]
    x = torch.randn(3, 20, dtype=DT)
    a(x).sum().backward()
    b(x).sum().backward()
    first = na.feedback_weight()
    assert torch.equal(first, nb.feedback_weight())
    a(x).sum().backward()
    assert not torch.equal(first, na.feedback_weight())
    assert torch.equal(torch.sign(first), torch.sign(na.feedback_weight()))
    # the batch counter is saved with the state, so a reload continues the same stream
    c = pfa_fx.convert(mlp, "sf", variant="brsf", seed=3)
    c.load_state_dict(a.state_dict())
    assert torch.equal(_nodes(c)["2"].feedback_weight(), na.feedback_weight())


def test_kp_feedback_moves_by_the_same_step_as_the_weight():
    gm = pfa_fx.convert(Mixed().double(), "kp")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    nodes = _nodes(gm)
    before = {k: (n.weight.clone(), n.B.detach().clone()) for k, n in nodes.items()}
    W0 = {k: _weight(gm, k).detach().clone() for k in nodes}
    for _ in range(3):
        opt.zero_grad()
        gm(_input()).square().sum().backward()
        opt.step()
    for k in DIRECT:
        n, W1 = nodes[k], _weight(gm, k).detach()
        torch.testing.assert_close(n.B.detach() - before[k][1], W1 - W0[k], rtol=1e-10, atol=1e-12)


def _grouped(t, groups):
    return t.reshape(groups, t.shape[0] // groups, -1)


@pytest.mark.parametrize("rule", ["pfa", "pfa-o"])
def test_pfa_feedback_is_B_times_R_and_R_learns_B_transpose_grad_W(rule):
    model = Mixed().double()
    gm = pfa_fx.convert(model, rule, expansion=3)
    gm(_input()).square().sum().backward()
    for key in DIRECT:
        node = _nodes(gm)[key]
        g = node.groups
        grad_W = _weight(gm, key).grad
        B, R = node.B, node.R.detach()
        assert B.shape == (g, node.weight_shape[0] // g, node.nbar // g)
        expected_Wb = torch.einsum("gon,gni->goi", B, _grouped(R, g)).reshape(node.weight_shape)
        torch.testing.assert_close(node.feedback_weight(), expected_Wb, rtol=1e-12, atol=1e-12)
        expected_gR = torch.einsum("gon,goi->gni", B, _grouped(grad_W, g)).reshape(R.shape)
        torch.testing.assert_close(node.R.grad, expected_gR, rtol=1e-10, atol=1e-12)
        if rule == "pfa-o":
            eye = torch.eye(B.shape[1], dtype=DT).expand(g, -1, -1)
            torch.testing.assert_close(B @ B.transpose(1, 2), eye, rtol=0, atol=1e-12)


def test_pfa_B_has_variance_one_over_nbar_so_BBt_is_near_identity():
    gm = pfa_fx.convert(MLP((64, 128, 10)).double(), "pfa", expansion=10)
    B = _nodes(gm)["0"].B[0]  # (128, 1280)
    assert B.var().item() == pytest.approx(1 / 1280, rel=0.02)
    G = B @ B.T
    assert torch.diagonal(G).mean().item() == pytest.approx(1.0, abs=0.01)


def test_compact_pfa_starts_at_the_same_feedback_and_gives_S_the_weight_gradient():
    model = Mixed().double()
    full = pfa_fx.convert(model, "pfa", expansion=4, seed=1)
    compact = pfa_fx.convert(model, "pfa", expansion=4, seed=1, compact=True)
    nf, nc = _nodes(full), _nodes(compact)
    for key in nf:
        torch.testing.assert_close(nc[key].feedback_weight(), nf[key].feedback_weight(), rtol=1e-9, atol=1e-12)
        assert nc[key].S.shape == nc[key].weight_shape
        assert nc[key].G.shape[1] == nc[key].G.shape[2] == nc[key].weight_shape[0] // nc[key].groups
    compact(_input()).square().sum().backward()
    for key in DIRECT:
        node, grad_W = nc[key], _weight(compact, key).grad
        assert torch.equal(node.S.grad, grad_W)


def test_pfa_state_is_laid_out_for_a_copy_free_backward():
    # a non-contiguous S costs a W-sized reorder in every backward call and gradient
    # accumulation (it once made compact PFA 1.3x BP on a CPU ResNet-18); B is stored so
    # that B^T, the error-side mix, is contiguous; G is exactly symmetric (G^T e = G e)
    compact, full = (_nodes(pfa_fx.convert(Mixed(), "pfa", compact=c)) for c in (True, False))
    for key in compact:
        assert compact[key].S.is_contiguous()
        assert torch.equal(compact[key].G, compact[key].G.mT)
        assert full[key].B.mT.is_contiguous() and full[key].R.is_contiguous()
    moved = pfa_fx.convert(Mixed(), "pfa", compact=True).double()
    assert all(n.S.is_contiguous() for _, n in pfa_fx.feedback_modules(moved))


def test_feedback_state_is_reproducible_from_seed_and_op_name():
    # scale="xavier": the draw alone (the default scales it by each W's RMS, which differs here)
    a = _nodes(pfa_fx.convert(Mixed(), "pfa", seed=7, scale="xavier"))
    b = _nodes(pfa_fx.convert(Mixed(), "pfa", seed=7, scale="xavier"))
    c = _nodes(pfa_fx.convert(Mixed(), "pfa", seed=8, scale="xavier"))
    for key in a:
        assert torch.equal(a[key].B, b[key].B) and torch.equal(a[key].R, b[key].R)
        assert not torch.equal(a[key].R, c[key].R)
    assert not torch.equal(a["conv"].R.flatten()[:10], a["std"].R.flatten()[:10])


def test_feedback_draws_do_not_depend_on_the_global_rng():
    torch.manual_seed(1)
    a = _nodes(pfa_fx.convert(copy.deepcopy(MLP()), "fa", scale="xavier"))
    torch.manual_seed(2)
    b = _nodes(pfa_fx.convert(copy.deepcopy(MLP()), "fa", scale="xavier"))
    assert all(torch.equal(a[k].B, b[k].B) for k in a)
    # the default draws the same Gaussian values, at each W's own RMS
    c = _nodes(pfa_fx.convert(copy.deepcopy(MLP()), "fa"))
    for k in a:
        rms, std = c[k].weight.double().square().mean().sqrt(), xavier_std(c[k].weight_shape)
        torch.testing.assert_close(c[k].B / rms, a[k].B / std, rtol=1e-5, atol=1e-6, check_dtype=False)


@pytest.mark.parametrize("expansion", [0, -1, 0.0])
def test_nonpositive_expansion_raises(expansion):
    with pytest.raises(ValueError, match="expansion must be > 0"):
        pfa_fx.convert(MLP(), "pfa", expansion=expansion)


def test_pfa_o_needs_expansion_at_least_one():
    with pytest.raises(ValueError, match=">= 1"):
        pfa_fx.convert(MLP(), "pfa-o", expansion=0.5)
    pfa_fx.convert(MLP(), "pfa", expansion=0.5)  # plain pfa accepts a bottleneck


@pytest.mark.parametrize("rule", ["fa", "kp", "sf", "pfa"])
def test_feedback_scale_follows_the_weights_when_asked(rule):
    # timm ViTs start far below Xavier scale; "weight" draws feedback at W's own RMS
    torch.manual_seed(0)
    model = MLP((200, 300, 10)).double()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
    rms = model[0].weight.square().mean().sqrt().item()
    xavier = _nodes(pfa_fx.convert(model, rule, scale="xavier"))["0"].feedback_weight()
    scaled = _nodes(pfa_fx.convert(model, rule))["0"].feedback_weight()  # the default: W's own RMS
    fixed = _nodes(pfa_fx.convert(model, rule, scale=0.05))["0"].feedback_weight()
    rel = 0.1 if rule == "pfa" else 0.03  # B·R: B B^T is near, not at, the identity
    assert scaled.square().mean().sqrt().item() == pytest.approx(rms, rel=rel)
    assert fixed.square().mean().sqrt().item() == pytest.approx(0.05, rel=rel)
    # the paper's recipe: Xavier for the state's own shape (PFA: R, n̄ x n_in)
    default = xavier_std((3000, 200)) if rule == "pfa" else xavier_std((300, 200))
    assert xavier.square().mean().sqrt().item() == pytest.approx(default, rel=rel)


def _saved_numel(model, x):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(sizes)


def test_brsf_saves_nothing_weight_sized_for_the_backward():
    # the batch's magnitudes are drawn in the backward from its draw index
    model = MLP((64, 128, 10))
    x = torch.randn(4, 64)
    usf, brsf = (pfa_fx.convert(model, "sf", variant=v) for v in ("usf", "brsf"))
    n_ops = len(list(pfa_fx.feedback_modules(brsf)))
    assert _saved_numel(brsf, x) == _saved_numel(usf, x) + n_ops  # one scalar index per op
