"""DFA, weight mirror and PAL against independent formulas (docs/design.md, sections 'DFA', 'WM' and 'PAL'), in float64."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx
from pfa_fx.rules import dfa as dfa_module
from pfa_fx.rules.pal import PALNode
from pfa_fx.rules.wm import WMNode

DT = torch.float64


def _nodes(gm):
    return dict(pfa_fx.feedback_modules(gm))


def _angle(a, b):
    return pfa_fx.angle_and_norm_ratio(a, b)


def _mlp(sizes=(6, 7, 5, 3), act=nn.Tanh):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


# ------------------------------------------------------------------------------ DFA
def _dfa_grads(model, x, y):
    gm = pfa_fx.convert(model, "dfa")
    out = gm(x)
    F.cross_entropy(out, y).backward()
    return gm, out, {k: p.grad for k, p in gm.named_parameters()}


def test_dfa_on_a_three_layer_mlp_follows_noklands_equations_for_every_parameter():
    torch.manual_seed(1)
    model = _mlp()
    x, y = torch.randn(9, 6, dtype=DT), torch.randint(0, 3, (9,))
    gm, out, grads = _dfa_grads(model, x, y)
    nodes = _nodes(gm)
    W1, b1, W2, b2, _W3, _b3 = (p.detach() for p in model.parameters())
    # Nøkland: a1 = W1 x, h1 = f(a1), a2 = W2 h1, h2 = f(a2), out = W3 h2
    a1 = x @ W1.T + b1
    h1 = torch.tanh(a1)
    a2 = h1 @ W2.T + b2
    h2 = torch.tanh(a2)
    e = (torch.softmax(out.detach(), 1) - F.one_hot(y, 3).double()) / len(y)
    # the random matrix B_l of hidden layer l is the projection of the op that reads h_l
    B2 = nodes["4"].projection(3, 5).double()  # (d_out, width of h2)
    B1 = nodes["2"].projection(3, 7).double()
    da2 = (e @ B2) * (1 - h2.square())
    da1 = (e @ B1) * (1 - h1.square())
    expected = {
        "4.weight": e.T @ h2,  # top layer: its true error
        "4.bias": e.sum(0),
        "2.weight": da2.T @ h1,
        "2.bias": da2.sum(0),
        "0.weight": da1.T @ x,
        "0.bias": da1.sum(0),
    }
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-14, msg=name)
    # and it is not BP (nor FA): the hidden gradients differ from autograd's
    F.cross_entropy(model(x), y).backward()
    assert not torch.allclose(model[0].weight.grad, grads["0.weight"], atol=1e-6)
    assert not torch.allclose(model[2].weight.grad, grads["2.weight"], atol=1e-6)
    torch.testing.assert_close(model[4].weight.grad, grads["4.weight"], rtol=1e-12, atol=0)


def test_dfa_projections_are_independent_per_op_even_for_equal_widths():
    gm = pfa_fx.convert(_mlp((4, 8, 8, 8, 3)), "dfa")
    nodes = _nodes(gm)
    p2, p4 = nodes["2"].projection(3, 8), nodes["4"].projection(3, 8)
    assert not torch.equal(p2, p4)
    assert abs(F.cosine_similarity(p2.flatten(), p4.flatten(), dim=0)) < 0.6
    # reproducible from the seed, and another seed draws another projection
    again = _nodes(pfa_fx.convert(_mlp((4, 8, 8, 8, 3)), "dfa"))["2"].projection(3, 8)
    assert torch.equal(p2, again)
    other = _nodes(pfa_fx.convert(_mlp((4, 8, 8, 8, 3)), "dfa", seed=1))["2"].projection(3, 8)
    assert not torch.equal(p2, other)
    assert p2.std().item() == pytest.approx(math.sqrt(2 / 11), rel=0.5)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        h1 = torch.relu(self.conv1(x))
        h2 = torch.relu(self.conv2(h1))
        return self.fc(h2.flatten(1))


def test_dfa_conv_input_error_is_the_dense_per_position_projection():
    torch.manual_seed(2)
    model = _ConvNet().double()
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    gm = pfa_fx.convert(model, "dfa")
    out = gm(x)
    g_out = torch.randn_like(out)
    out.backward(g_out)
    nodes = _nodes(gm)
    h1 = torch.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)).detach()
    a2 = F.conv2d(h1, model.conv2.weight, model.conv2.bias, stride=2, padding=1, groups=2).detach()
    # conv2's output error comes from fc's projection; conv1's from conv2's, position by position
    d2 = (g_out @ nodes["fc"].projection(5, 54).double()).reshape(a2.shape) * (a2 > 0)
    d1 = (g_out @ nodes["conv2"].projection(5, 4 * 36).double()).reshape(h1.shape) * (h1 > 0)
    gw2 = torch.nn.grad.conv2d_weight(h1, model.conv2.weight.shape, d2, stride=2, padding=1, groups=2)
    gw1 = torch.nn.grad.conv2d_weight(x, model.conv1.weight.shape, d1, padding=1)
    torch.testing.assert_close(gm.get_parameter("conv2.weight").grad, gw2, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gm.get_parameter("conv1.weight").grad, gw1, rtol=1e-12, atol=1e-13)


def test_dfa_large_projections_are_redrawn_in_blocks_with_the_same_values(monkeypatch):
    torch.manual_seed(3)
    model = _ConvNet().double()
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    cached = pfa_fx.convert(model, "dfa")
    cached(x).sum().backward()
    monkeypatch.setattr(dfa_module, "CACHE_LIMIT", 0)
    redrawn = pfa_fx.convert(model, "dfa")
    redrawn(x).sum().backward()
    for node in _nodes(redrawn).values():
        assert node._cache == {}  # nothing stored
    for (name, a), b in zip(cached.named_parameters(), redrawn.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=name)
    # an input wider than one block: the redrawn blocks are the columns of the projection
    node = _nodes(redrawn)["conv1"]
    e = torch.randn(3, 5)
    d_in = 2 * dfa_module.BLOCK + 17
    torch.testing.assert_close(node.project(e, d_in), e @ node.projection(5, d_in), rtol=1e-5, atol=1e-6)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h), self.aux(h)


def test_dfa_uses_the_first_output_of_a_tuple_and_the_report_says_so():
    gm = pfa_fx.convert(_TwoHeads().double(), "dfa")
    main, aux = gm(torch.randn(5, 4, dtype=DT))
    (main.sum() + aux.sum()).backward()
    assert "captured at output[0]" in str(pfa_fx.report(gm))
    # a loss on the auxiliary output alone carries no output error for the ops to project
    main, aux = gm(torch.randn(5, 4, dtype=DT))
    with pytest.raises(RuntimeError, match="needs the model's output error"):
        aux.sum().backward()


def test_dfa_has_no_w_shaped_feedback_alignment_leaves_it_out_and_gradient_alignment_works():
    torch.manual_seed(4)
    gm = pfa_fx.convert(_mlp((6, 16, 16, 3)), "dfa")
    assert pfa_fx.alignment(gm) == {}
    with pytest.raises(TypeError, match="no W-shaped feedback weight"):
        _nodes(gm)["0"].feedback_weight()
    x, y = torch.randn(32, 6, dtype=DT), torch.randint(0, 3, (32,))
    angles = pfa_fx.gradient_alignment(gm, lambda: F.cross_entropy(gm(x), y))
    assert angles["4"] == pytest.approx(0.0, abs=1e-4)  # the top op trains on its true error
    assert 1.0 < angles["0"] < 179.0


def test_dfa_rejects_the_weight_scale_and_bad_numbers():
    with pytest.raises(ValueError, match="valid scales: xavier or a positive number"):
        pfa_fx.convert(_mlp(), "dfa", scale="weight")
    with pytest.raises(ValueError, match="positive number"):
        pfa_fx.convert(_mlp(), "dfa", scale=-1.0)


# ------------------------------------------------------------------------ weight mirror
def _mirror_expected(node, layer, xi):
    """ΔW_b = η (KGrad(ξ, L_W ξ)/N − λ W_b): ξ as the op's input at one receptive field
    (``xi`` is drawn per group), L_W the layer's own call, KGrad by autograd."""
    g, n, _ = xi.shape
    w = layer.weight.detach().clone().requires_grad_()
    if isinstance(layer, nn.Linear):
        inp = xi[0]
        y = F.linear(inp, w)
    elif isinstance(layer, nn.ConvTranspose2d):
        inp = xi.permute(1, 0, 2).reshape(n, -1, 1, 1)  # one input pixel per sample
        y = F.conv_transpose2d(inp, w, groups=g)
    else:  # one output position per sample: the input is one receptive field
        d = w.dim() - 2
        inp = xi.permute(1, 0, 2).reshape(n, w.shape[1] * g, *w.shape[2:])
        y = (F.conv1d if d == 1 else F.conv2d)(inp, w, groups=g)
    (kgrad,) = torch.autograd.grad((y * y.detach()).sum(), w)  # d<L_W ξ, y>/dW = KGrad(ξ, y)
    return node.B + node.mirror_lr * (kgrad / n - node.decay * node.B)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(7, 5),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Conv1d(3, 4, 5, dilation=2),
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
    ],
    ids=["linear", "grouped-strided-conv2d", "dilated-conv1d", "grouped-conv-transpose2d"],
)
def test_one_mirror_step_equals_the_weight_mirror_update_with_the_drawn_noise(layer):
    layer = layer.double()
    gm = pfa_fx.convert(nn.Sequential(layer), "wm", mirror_batch=5, sigma=0.7, decay=0.3, mirror_lr=0.2)
    node = _nodes(gm)["0"]
    weight = layer.weight.detach()
    g = node.groups
    fan_in = weight.shape[0] // g if node.transposed else weight[0].numel()
    xi = node.noise((g, 5, fan_in), 0, weight)
    assert xi.std().item() == pytest.approx(0.7, rel=0.5)
    expected = _mirror_expected(node, layer, xi)
    assert pfa_fx.mirror(gm, steps=1, schedule="constant") == 1  # the authors' mirror step
    torch.testing.assert_close(node.B, expected, rtol=1e-12, atol=1e-14)
    assert node.steps == 1
    # the next step draws other noise
    assert not torch.equal(node.noise((g, 5, fan_in), 1, weight), xi)


def test_weight_mirror_converges_to_its_fixed_point():
    torch.manual_seed(5)
    gm = pfa_fx.convert(nn.Sequential(nn.Linear(32, 24)), "wm", mirror_batch=256, mirror_lr=0.005)
    node = _nodes(gm)["0"]
    before, _ = _angle(node.weight, node.feedback_weight())
    assert before > 60
    pfa_fx.mirror(gm, steps=1500)
    angle, ratio = _angle(node.fixed_point(), node.feedback_weight())
    assert angle < 2.0 and ratio == pytest.approx(1.0, abs=0.1)
    # decay != σ²: the fixed point is (σ²/λ) W
    gm = pfa_fx.convert(nn.Sequential(nn.Linear(32, 24)), "wm", mirror_batch=256, sigma=0.5, decay=0.5, mirror_lr=0.01)
    node = _nodes(gm)["0"]
    pfa_fx.mirror(gm, steps=1500)
    angle, ratio = _angle(node.weight, node.feedback_weight())
    assert angle < 2.0 and ratio == pytest.approx(0.5, rel=0.1)


def test_weight_mirror_steps_after_each_optimizer_step_of_its_weights_only():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    gm = pfa_fx.convert(model, "wm")
    nodes = _nodes(gm)
    bn_before = copy.deepcopy(gm.get_submodule("1").state_dict())
    opt = torch.optim.SGD([gm.get_parameter("0.weight")], lr=0.1)  # only the first op's weight
    other = torch.optim.SGD([gm.get_parameter("3.bias")], lr=0.1)
    B0, B3 = nodes["0"].B.clone(), nodes["3"].B.clone()
    gm.eval()
    gm(torch.randn(8, 4)).sum().backward()
    opt.step()
    other.step()
    assert nodes["0"].steps == 1 and not torch.equal(nodes["0"].B, B0)
    assert nodes["3"].steps == 0 and torch.equal(nodes["3"].B, B3)
    for k, v in gm.get_submodule("1").state_dict().items():
        assert torch.equal(v, bn_before[k]), k  # mirror steps run no module of the model


def test_mirror_step_count_round_trips_through_the_state_dict():
    model = nn.Sequential(nn.Linear(4, 3))
    gm = pfa_fx.convert(model, "wm")
    pfa_fx.mirror(gm, steps=3)
    fresh = pfa_fx.convert(model, "wm")
    fresh.load_state_dict(gm.state_dict())
    a, b = _nodes(gm)["0"], _nodes(fresh)["0"]
    assert b.steps == 3 and torch.equal(a.B, b.B)
    pfa_fx.mirror(gm)
    pfa_fx.mirror(fresh)
    assert torch.equal(a.B, b.B)  # the same noise is drawn after the reload


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [("sigma", 0, "sigma must be a positive number"), ("mirror_batch", 0, "mirror_batch must be an int >= 1")],
)
def test_weight_mirror_rejects_bad_options(option, value, match):
    with pytest.raises(ValueError, match=match):
        pfa_fx.convert(nn.Linear(3, 2), "wm", **{option: value})


# ----------------------------------------------------------------------------------- PAL
def test_pal_update_equals_its_documented_per_step_form():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    gm = pfa_fx.convert(model, "pal", feedback_lr=0.3, sigma=0.2, decay=0.05)
    n0, n2 = _nodes(gm)["0"], _nodes(gm)["2"]
    B0, B2 = n0.B.clone(), n2.B.clone()
    x = torch.randn(11, 5, dtype=DT)
    gm.train()
    out = gm(x)
    assert torch.equal(out, model(x))  # the noisy pass does not change what the model returns
    W0, b0, W2, _ = (p.detach() for p in model.parameters())
    xi0 = n0.noise((11, 5), 0, x)
    h = torch.relu(x @ W0.T + b0)
    h_noisy = torch.relu((x + xi0) @ W0.T + b0)
    xi2 = n2.noise((11, 7), 0, x)
    # op 0: Δr through the ReLU, read by op 2; op 2 (the output) takes its own response L_W(ξ)
    dr0 = h_noisy - h
    dr2 = xi2 @ W2.T
    exp0 = B0 + 0.3 * (dr0.T @ xi0 / 11 - 0.05 * B0)
    exp2 = B2 + 0.3 * (dr2.T @ xi2 / 11 - 0.05 * B2)
    assert (n0.last_response, n2.last_response) == ("downstream", "own")
    # the step's backward uses W_b as its forward saw it: the update waits for the step
    assert torch.equal(n0.B, B0) and torch.equal(n2.B, B2)
    out.sum().backward()
    expected_grad = ((torch.ones(11, 3, dtype=DT) @ B2) * (h > 0)).T @ x
    torch.testing.assert_close(gm.get_parameter("0.weight").grad, expected_grad, rtol=1e-12, atol=1e-13)
    torch.optim.SGD(gm.parameters(), lr=0.0).step()
    torch.testing.assert_close(n0.B, exp0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(n2.B, exp2, rtol=1e-12, atol=1e-14)
    # no noisy pass in eval mode
    gm.eval()
    gm(x)
    assert pfa_fx.step_feedback(gm) == 2
    torch.testing.assert_close(n0.B, exp0, rtol=0, atol=0)


def test_pal_converges_to_the_gain_weighted_fixed_point():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    gm = pfa_fx.convert(model, "pal", feedback_lr=0.5)  # 0.5 % per step: converges in 1,500 steps
    for p in gm.parameters():
        p.requires_grad_(True)
    x = torch.randn(256, 16)
    gm.train()
    for _ in range(1500):
        gm(x)
        pfa_fx.step_feedback(gm)  # the loop has no optimizer: apply each step's update
    n0, n2 = _nodes(gm)["0"], _nodes(gm)["2"]
    gain = (x @ model[0].weight.T + model[0].bias > 0).float().mean(0).detach()
    assert gain.min() > 0.05 and gain.max() < 0.95  # the gain weighting is visible
    angle, ratio = _angle(n0.fixed_point(gain), n0.feedback_weight())
    assert angle < 2.0 and ratio == pytest.approx(1.0, abs=0.1)
    # and it is not W itself (that would be a weight mirror, not PAL)
    assert _angle(n0.weight, n0.feedback_weight())[0] > angle + 1.0
    angle, ratio = _angle(n2.fixed_point(), n2.feedback_weight())
    assert angle < 2.0 and ratio == pytest.approx(1.0, abs=0.1)


def test_pal_noisy_pass_leaves_batchnorm_statistics_and_the_random_stream_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    pal = pfa_fx.convert(model, "pal")
    bp = pfa_fx.convert(model, "bp")
    x = torch.randn(8, 4)
    torch.manual_seed(11)
    out_pal = pal(x)
    after_pal = torch.rand(3)
    torch.manual_seed(11)
    out_bp = bp(x)
    after_bp = torch.rand(3)
    assert torch.equal(out_pal, out_bp) and torch.equal(after_pal, after_bp)
    for (k, a), b in zip(bp.get_submodule("1").state_dict().items(), pal.get_submodule("1").state_dict().values()):
        assert torch.equal(a, b), k
    assert _nodes(pal)["0"].last_response == "downstream"  # the dropout masks replayed: Δr is small
    out_pal.sum().backward()  # the saved running statistics were not modified in place


def test_pal_links_convolutions_through_batchnorm_and_residual_sums():
    import torchvision

    gm = pfa_fx.convert(torchvision.models.resnet18(num_classes=10), "pal")
    gm.train()
    gm(torch.randn(2, 3, 32, 32)).sum().backward()
    responses = {name: node.last_response for name, node in pfa_fx.feedback_modules(gm)}
    assert responses["fc"] == "own"
    assert responses["layer1.0.conv1"] == "downstream"
    assert sum(r == "downstream" for r in responses.values()) >= 15


def test_pal_and_wm_nodes_are_weight_mirror_nodes_with_their_own_schedule():
    assert issubclass(PALNode, WMNode)
    assert not PALNode.mirrors_after_step and WMNode.mirrors_after_step
    gm = pfa_fx.convert(nn.Sequential(nn.Linear(3, 2)), "pal")
    assert pfa_fx.mirror(gm, steps=2) == 1  # pfa_fx.mirror aligns PAL's B too (pfa_fx.rules.align)
    B = _nodes(gm)["0"].B.clone()
    assert pfa_fx.step_feedback(gm) == 1 and torch.equal(_nodes(gm)["0"].B, B)  # nothing pending


# ------------------------------------------------------------------------- all three
@pytest.mark.parametrize("rule", ["dfa", "wm", "pal"])
def test_a_reloaded_checkpoint_trains_on_exactly_like_the_original(rule):
    torch.manual_seed(8)
    model = _ConvNet()
    gm = pfa_fx.convert(model, rule, seed=3)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(4, 2, 6, 6)
    for _ in range(2):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()  # WM mirrors, PAL applies its update
    fresh = pfa_fx.convert(model, rule, seed=3)
    fresh.load_state_dict(gm.state_dict())
    for a, b in zip(gm.state_dict().values(), fresh.state_dict().values()):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)
    # the next step (fresh noise, the same projections) gives the same gradients and state
    x2 = torch.randn(4, 2, 6, 6)
    grads = []
    for m in (gm, fresh):
        m.zero_grad()
        m(x2).square().mean().backward()
        pfa_fx.step_feedback(m)
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)
    for (k, a), b in zip(gm.state_dict().items(), fresh.state_dict().values()):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b), k


@pytest.mark.parametrize("rule", ["dfa", "wm", "pal"])
def test_to_float64_moves_the_rule_state_and_keeps_training(rule):
    gm = pfa_fx.convert(_ConvNet(), rule).to(torch.float64)
    x = torch.randn(2, 2, 6, 6, dtype=DT, requires_grad=True)
    gm(x).sum().backward()
    pfa_fx.step_feedback(gm)
    assert x.grad.dtype == DT and torch.isfinite(x.grad).all()
    assert all(t.dtype == DT for t in gm.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point())
