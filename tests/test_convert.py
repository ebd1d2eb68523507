"""convert(): identical forwards on real architectures, nothing left on BP, state and
modes kept, the user's model untouched, clear errors on bad input."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import pfa_fx
from pfa_fx.audit import weights_on_backprop
from tests.nets import MLP, Mixed

MODELS = {
    # name: (factory, input size)
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 64),
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64), 64),
    "timm_resnetv2_stdconv": (
        lambda: timm.models.resnetv2.ResNetV2(
            layers=(1, 1, 1, 1), num_classes=10, conv_layer=timm.layers.StdConv2d, stem_type="fixed"
        ),
        64,
    ),
    "timm_tf_efficientnet_conv2dsame": (lambda: timm.create_model("tf_efficientnet_b0", num_classes=10), 64),
    "timm_nfnet_scaledstdconv": (lambda: timm.create_model("nf_resnet26", num_classes=10), 64),
}


def _same_forward_in_both_modes(model, gm, x):
    """Compare forwards in eval then train mode (same RNG seed); return gm's train output."""
    for mode in (False, True):  # train mode last: audits need its autograd graph
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(1)
        ref = model(x)
        torch.manual_seed(1)
        out = gm(x)
        assert torch.equal(_logits(ref), _logits(out)), f"forward changed in {'train' if mode else 'eval'} mode"
    return out


def _logits(out):
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rule", ["pfa", "sf"])
def test_forward_is_bit_identical_in_train_and_eval_and_nothing_stays_on_backprop(name, rule):
    factory, size = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    gm = pfa_fx.convert(model, rule)
    out = _same_forward_in_both_modes(model, gm, torch.randn(2, 3, size, size))
    assert weights_on_backprop(_logits(out).sum(), gm) == []
    assert len(list(pfa_fx.feedback_modules(gm))) > 0
    assert isinstance(gm, torch.fx.GraphModule) and gm.pfa_fallbacks == {}  # traced, no fallback


def test_audit_flags_an_unconverted_model():
    model = MLP()
    assert weights_on_backprop(model(torch.randn(2, 20)).sum(), model) == ["0.weight", "2.weight", "4.weight"]


def test_one_training_step_moves_every_weight_without_standard_backward():
    torch.manual_seed(0)
    gm = pfa_fx.convert(torchvision.models.resnet18(num_classes=10), "pfa", expansion=2)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    before = {k: v.detach().clone() for k, v in gm.named_parameters()}
    loss = nn.functional.cross_entropy(gm(torch.randn(4, 3, 32, 32)), torch.arange(4))
    assert weights_on_backprop(loss, gm) == []
    loss.backward()
    opt.step()
    moved = {k for k, v in gm.named_parameters() if not torch.equal(v, before[k])}
    assert moved == set(before)  # weights, biases, BN affine, and every R


def test_state_dict_keeps_original_names_and_loads_pretrained_checkpoints():
    model = torchvision.models.resnet18(num_classes=10)
    gm = pfa_fx.convert(model, "pfa", expansion=2)
    keys = set(gm.state_dict())
    assert set(model.state_dict()) <= keys
    assert all(k.startswith("pfa_feedback.") for k in keys - set(model.state_dict()))
    trained = torchvision.models.resnet18(num_classes=10).state_dict()
    missing, unexpected = gm.load_state_dict(trained, strict=False)
    assert unexpected == [] and all(k.startswith("pfa_feedback.") for k in missing)
    for k, v in trained.items():
        assert torch.equal(gm.state_dict()[k], v)


def test_unused_parameters_and_non_persistent_buffers_are_kept_as_they_were():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 2)  # e.g. a head the forward does not use
            self.register_buffer("table", torch.arange(4.0), persistent=False)

        def forward(self, x):
            return self.fc(x) + self.table

    model = Odd()
    # what strict=True would refuse is said without it too: the unused head stays on BP
    with pytest.warns(UserWarning, match="unused.weight: never reached by a converted op"):
        gm = pfa_fx.convert(model, "fa")
    assert {k for k in gm.state_dict() if not k.startswith("pfa_feedback.")} == set(model.state_dict())
    assert torch.equal(gm(torch.ones(1, 4)), model(torch.ones(1, 4)))


def test_converted_checkpoint_round_trips_exactly():
    torch.manual_seed(0)
    model = Mixed()
    a = pfa_fx.convert(model, "pfa", expansion=2, seed=1)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    a(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    b = pfa_fx.convert(model, "pfa", expansion=2, seed=2)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    a(x).sum().backward()
    ga = x.grad.clone()
    x.grad = None
    b(x).sum().backward()
    assert torch.equal(ga, x.grad)


def test_convert_never_modifies_the_model():
    model = torchvision.models.resnet18(num_classes=10).train()
    before = copy.deepcopy(model.state_dict())
    structure = repr(model)
    gm = pfa_fx.convert(model, "kp")
    gm(torch.randn(2, 3, 32, 32)).sum().backward()
    torch.optim.SGD(gm.parameters(), lr=1.0).step()
    gm.eval()
    assert model.training and repr(model) == structure
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class TrainingBranch(nn.Module):
    """Forward that branches on self.training, like auxiliary or distillation heads."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.aux = nn.Linear(6, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


def test_graph_follows_the_models_mode():
    model = TrainingBranch()
    gm = pfa_fx.convert(model, "pfa")
    x = torch.randn(3, 6)
    out_train = gm.train()(x)
    assert isinstance(out_train, tuple)
    assert all(torch.equal(a, b) for a, b in zip(out_train, model.train()(x)))
    assert torch.equal(gm.eval()(x), model.eval()(x))
    assert "aux" in dict(pfa_fx.feedback_modules(gm))
    # the mode at conversion is kept
    assert not pfa_fx.convert(model.eval(), "fa").training


def test_googlenet_aux_heads_in_training_mode():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    gm = pfa_fx.convert(model, "fa")
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    ref = model.train()(x)
    torch.manual_seed(0)
    out = gm.train()(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert weights_on_backprop(sum(o.sum() for o in out), gm) == []
    assert torch.equal(model.eval()(x), gm.eval()(x))


def test_deepcopy_keeps_both_modes_and_state():
    gm = pfa_fx.convert(TrainingBranch(), "pfa")
    twin = copy.deepcopy(gm)
    x = torch.randn(2, 6)
    assert isinstance(twin.train()(x), tuple) and not isinstance(twin.eval()(x), tuple)
    for (k, v), (k2, v2) in zip(gm.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    node = dict(pfa_fx.feedback_modules(twin))["body"]
    assert node.weight.data_ptr() == twin.body.weight.data_ptr()


def test_rule_mapping_keeps_chosen_ops_on_bp_or_native():
    model = torchvision.models.resnet18(num_classes=10)
    gm = pfa_fx.convert(model, {"conv1": "bp", "fc": None, nn.Conv2d: ("pfa", {"expansion": 2})})
    nodes = dict(pfa_fx.feedback_modules(gm))
    assert nodes["conv1"].rule == "bp"
    assert "fc" not in nodes
    assert nodes["layer1.0.conv1"].rule == "pfa" and nodes["layer1.0.conv1"].expansion == 2
    loss = gm(torch.randn(2, 3, 32, 32)).sum()
    assert weights_on_backprop(loss, gm) == ["fc.weight"]


def test_glob_patterns_select_ops_by_name():
    gm = pfa_fx.convert(torchvision.models.resnet18(), {"layer4.*": "fa", "*": "kp"})
    rules = {k: n.rule for k, n in pfa_fx.feedback_modules(gm)}
    assert rules["layer4.1.conv2"] == "fa" and rules["layer1.0.conv1"] == "kp" and rules["fc"] == "kp"


def test_alignment_reports_angle_and_norm_ratio_per_op():
    gm = pfa_fx.convert(MLP(), "bp")
    for angle, ratio in pfa_fx.alignment(gm).values():
        assert angle == pytest.approx(0.0, abs=1e-3) and ratio == pytest.approx(1.0)
    al = pfa_fx.alignment(pfa_fx.convert(MLP((400, 300, 10)), "fa"))
    assert all(80 < a < 100 for a, _ in al.values())


# ----------------------------------------------------------------------- bad input
def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown rule 'pfb'.*bp, fa, dfa, sf, kp, wm, pal, pfa, pfa-o"):
        pfa_fx.convert(MLP(), "pfb")
    with pytest.raises(ValueError, match="unknown rule"):
        pfa_fx.convert(MLP(), {"*": "mirror"})


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option 'expnasion'.*compact, density, expansion"):
        pfa_fx.convert(MLP(), "pfa", expnasion=4)
    with pytest.raises(ValueError, match=r"unknown option 'expansion' for rule\(s\) fa; valid options: scale"):
        pfa_fx.convert(MLP(), "fa", expansion=4)
    with pytest.raises(ValueError, match=r"unknown option 'scale' for rule\(s\) bp; valid options: none"):
        pfa_fx.convert(MLP(), "bp", scale="weight")
    with pytest.raises(ValueError, match="valid scales: xavier, weight or a positive number"):
        pfa_fx.convert(MLP(), "kp", scale="he")
    with pytest.raises(ValueError, match="scale must be"):
        pfa_fx.convert(MLP(), "pfa", scale=-1.0)
    with pytest.raises(ValueError, match="valid variants: usf, frsf, brsf"):
        pfa_fx.convert(MLP(), "sf", variant="xsf")


def test_non_module_raises_type_error():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        pfa_fx.convert(lambda x: x, "fa")


def test_converting_twice_refuses_clearly():
    gm = pfa_fx.convert(MLP(), "fa")
    with pytest.raises(pfa_fx.ConversionError, match="already converted"):
        pfa_fx.convert(gm, "pfa")
    with pytest.raises(pfa_fx.ConversionError, match="already converted"):
        pfa_fx.convert(nn.Sequential(gm, nn.ReLU()), "pfa")


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


def test_untraceable_model_names_the_module_at_fault_without_fallback():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), DataDependent()))
    with pytest.raises(pfa_fx.TraceError, match=r"module '1\.1' \(.*DataDependent\)"):
        pfa_fx.convert(model, "fa", fallback=False)


class GatedBlock(nn.Module):
    """A block with data-dependent control flow around its own weights."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.mean() > 0 else self.b(x)


def test_untraceable_submodule_falls_back_to_interception_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), GatedBlock(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"module '1' \(GatedBlock\) cannot be traced"):
        gm = pfa_fx.convert(model, "pfa", expansion=2)
    assert isinstance(gm, torch.fx.GraphModule) and set(gm.pfa_fallbacks) == {"1"}
    paths = {op.name: op.path for op in pfa_fx.report(gm).ops}
    assert paths == {"0": "graph", "1.a": "opaque module", "1.b": "opaque module", "2": "graph"}
    for sign in (1.0, -1.0):  # both branches
        x = sign * torch.rand(3, 4) + sign
        assert torch.equal(gm(x), model(x))
        assert weights_on_backprop(gm(x).sum(), gm) == []


def test_untraceable_root_falls_back_to_an_eager_forward_with_every_op_converted():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
    with pytest.warns(UserWarning, match="runs eagerly"):
        conv = pfa_fx.convert(model, "kp")
    assert type(conv) is nn.TransformerEncoder and conv.pfa_fallbacks.keys() == {""}
    assert all(op.path == "eager" for op in pfa_fx.report(conv).ops) and len(pfa_fx.report(conv).ops) == 8
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    ref = model(x)
    torch.manual_seed(0)
    out = conv(x)
    assert torch.equal(ref, out)
    assert weights_on_backprop(out.sum(), conv) == []
    assert not hasattr(model, "pfa_routes") and model.forward.__func__ is nn.TransformerEncoder.forward


def test_strict_mode_raises_when_a_weight_would_stay_on_backprop():
    class DynamicWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            w = x.t() @ x  # a weight computed from the input: no parameter to hang feedback on
            return torch.nn.functional.linear(self.fc(x), w)

    with pytest.warns(UserWarning, match="not computed from a parameter"):  # not strict: converts what it can
        pfa_fx.convert(DynamicWeight(), "fa")
    with pytest.raises(pfa_fx.ConversionError, match=r"(?s)strict=True.*not computed from a parameter"):
        pfa_fx.convert(DynamicWeight(), "fa", strict=True)
    pfa_fx.convert(MLP(), {"0": None, "*": "fa"}, strict=True)  # kept native on purpose: fine


def test_report_lists_ops_and_explains_parameters_left_alone():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2)
    rep = pfa_fx.report(pfa_fx.convert(model, {"head": None, "*": "pfa"}))
    names = {op.name: op for op in rep.ops}
    assert names["blocks.0.attn.qkv"].kind == "linear" and names["patch_embed.proj"].kind == "conv2d"
    assert rep.kept_native == ["head"]
    reasons = {p.name: p.reason for p in rep.left_alone}
    assert set(reasons) == {"cls_token", "pos_embed"}
    assert "positional" in reasons["pos_embed"]
    assert "blocks.0.attn.qkv" in str(rep)


# ------------------------------------------------------------- weights hidden from the graph
def test_multihead_attention_projections_are_converted_and_forward_identical():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True), 2)
    gm = pfa_fx.convert(model, "pfa", expansion=2)
    names = set(dict(pfa_fx.feedback_modules(gm)))
    assert "layers.0.self_attn.in_proj_weight" in names and "layers.1.self_attn.out_proj" in names
    assert "layers.0.linear1" in names
    out = _same_forward_in_both_modes(model, gm, torch.randn(3, 5, 16))
    assert weights_on_backprop(out.sum(), gm) == []


def test_attention_routes_the_packed_projection_through_its_feedback():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    gm = pfa_fx.convert(Wrap(), "bp")
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gm(x1).square().sum().backward()
    mha(x2, x2, x2, need_weights=False)[0].square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)  # bp through the routed ops is autograd exactly
    assert torch.equal(gm.attn.in_proj_weight.grad, mha.in_proj_weight.grad)


@torch.fx.wrap
def _window_attention(x, qkv_weight, proj_weight, qkv_bias):
    # like torchvision's shifted_window_attention: an FX-wrapped function handed weights
    q, k, v = torch.nn.functional.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
    att = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    return torch.nn.functional.linear(att, proj_weight)


class WindowBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return _window_attention(x, self.qkv.weight, self.proj.weight, self.qkv.bias)


def test_weights_handed_to_fx_wrapped_functions_are_converted():
    model = WindowBlock()
    gm = pfa_fx.convert(model, "kp")
    assert set(dict(pfa_fx.feedback_modules(gm))) == {"qkv", "proj"}
    assert "_window_attention_with_feedback" in gm.code
    x = torch.randn(2, 4, 8)
    out = gm(x)
    assert torch.equal(out, model(x))
    assert weights_on_backprop(out.sum(), gm) == []
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_swin_and_vit_from_torchvision_convert_completely():
    for name, size in (("swin_t", 64), ("vit_b_32", 224)):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=10).eval()
        gm = pfa_fx.convert(model, "fa")
        x = torch.randn(1, 3, size, size)
        assert torch.equal(gm(x), model(x)), name
        gm.train()
        assert weights_on_backprop(gm(x).sum(), gm) == [], name


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is not None:  # a proxy here would take the wrong branch
            x = x * mask
        return self.fc(x)


def test_forward_arguments_defaulting_to_none_are_traced_as_none():
    model = OptionalMask()
    gm = pfa_fx.convert(model, "fa")
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    assert " * " not in gm.code  # the masked branch is not in the graph


class RelPosLogits(nn.Module):
    """``q @ table.T`` with a learned table, as BoTNet/HaloNet relative-position logits."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.rel = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        return self.q(x) @ self.rel.transpose(-1, -2)


def test_matmul_with_a_transposed_parameter_is_a_weight_op():
    model = RelPosLogits().double()
    gm = pfa_fx.convert(model, "fa")
    assert set(dict(pfa_fx.feedback_modules(gm))) == {"q", "rel"}
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    out = gm(x)
    assert torch.equal(out, model(x))
    assert weights_on_backprop(out.sum(), gm) == []
    bp = pfa_fx.convert(model, "bp")
    x2 = x.detach().clone().requires_grad_()
    bp(x2).square().sum().backward()
    x.grad = None
    model(x).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bp.rel.grad, model.rel.grad, rtol=1e-12, atol=1e-12)


class AdditiveAttention(nn.Module):
    """``q @ w_g`` with an untransposed ``(d, 1)`` parameter, as SwiftFormer's attention."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 4)
        self.w_g = nn.Parameter(torch.randn(4, 1))

    def forward(self, x):
        q = self.q(x)
        return (q @ self.w_g).softmax(dim=1) * q


def test_matmul_with_an_untransposed_parameter_is_a_linear_op_with_its_transpose():
    model = AdditiveAttention().double()
    gm = pfa_fx.convert(model, "fa")
    nodes = dict(pfa_fx.feedback_modules(gm))
    assert set(nodes) == {"q", "w_g"}
    assert nodes["w_g"].weight_shape == (1, 4)  # (out, in), as nn.Linear keeps its weight
    assert torch.equal(nodes["w_g"].weight, model.w_g.detach().t())
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    out = gm(x)
    assert torch.equal(out, model(x))
    assert weights_on_backprop(out.sum(), gm) == []
    # FA's error to q through this op is e @ B, B the (1, 4) feedback matrix; checked on
    # the op alone: the score's error e (2, 3, 1) reaches q as e @ B, its weight gets e^T q
    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 3, 1, dtype=torch.float64)
    fb = nodes["w_g"]
    y = pfa_fx.ops.feedback_linear(q, gm.w_g.t(), None, fb)
    assert torch.equal(y, q @ model.w_g)
    gm.w_g.grad = None
    y.backward(e)
    torch.testing.assert_close(q.grad, e @ fb.feedback_weight(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.w_g.grad, (e.reshape(-1, 1).T @ q.detach().reshape(-1, 4)).T, rtol=1e-12, atol=0)
    assert report_mentions(gm, "w_g", kind="linear")


def report_mentions(gm, name, kind):
    return any(op.name == name and op.kind == kind for op in pfa_fx.report(gm).ops)


def test_bp_rule_on_an_untransposed_matmul_parameter_gives_autograd_gradients():
    model = AdditiveAttention().double()
    bp = pfa_fx.convert(model, "bp")
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    bp(x1).square().sum().backward()
    model(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bp.w_g.grad, model.w_g.grad, rtol=1e-12, atol=1e-12)


def test_a_parameter_used_as_x_at_p_and_as_x_at_p_transposed_is_refused_by_name():
    class BothWays(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(4, 4))  # square: shapes alone cannot tell

        def forward(self, x):
            return x @ self.p + x @ self.p.t()

    with pytest.raises(pfa_fx.ConversionError, match=r"'p' is used both as x @ P and as x @ P.T"):
        pfa_fx.convert(BothWays(), "fa")


def test_audit_ignores_tables_that_carry_no_error():
    class OneHotTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(16, 4))

        def forward(self, x):  # a lookup written as a matmul: no error flows through the table
            # (scaled first, so the pass leaves it to the audit instead of making it a linear op)
            return x + torch.nn.functional.one_hot(torch.arange(2), 16).float() @ (2 * self.table)

    gm = pfa_fx.convert(nn.Sequential(nn.Linear(4, 4), OneHotTable()), "fa")
    assert set(dict(pfa_fx.feedback_modules(gm))) == {"0"}
    assert weights_on_backprop(gm(torch.randn(2, 4)).sum(), gm) == []


class Upsampler(nn.Module):
    """Transposed convolutions three ways: a module, a module given ``output_size``, and
    ``F.conv_transpose2d`` on a parameter."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up_sized = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1)
        self.w = nn.Parameter(torch.randn(4, 2, 2, 2) * 0.3)

    def forward(self, x):
        h = self.up(self.down(x).relu())
        h = self.up_sized(h, output_size=[2 * h.shape[-2], 2 * h.shape[-1]])
        return nn.functional.conv_transpose2d(h, self.w, stride=2)


@pytest.mark.parametrize("rule", ["fa", "pfa", "kp"])
def test_transposed_convolutions_are_weight_ops(rule):
    torch.manual_seed(0)
    model = Upsampler()
    gm = pfa_fx.convert(model, rule, strict=True)
    nodes = dict(pfa_fx.feedback_modules(gm))
    assert set(nodes) == {"down", "up", "up_sized", "w"}
    assert nodes["up"].transposed and nodes["w"].transposed and not nodes["down"].transposed
    for name, node in nodes.items():
        assert node.feedback_weight().shape == node.weight_shape, name
    x = torch.randn(2, 3, 8, 8)
    out = _same_forward_in_both_modes(model, gm, x)
    assert out.shape == (2, 2, 32, 32)
    assert weights_on_backprop(out.sum(), gm) == []
    kinds = {op.name: op.kind for op in pfa_fx.report(gm).ops}
    assert kinds["up"] == "conv_transpose2d" and kinds["down"] == "conv2d"


def test_transposed_convolution_inside_an_opaque_module_is_routed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Opaque(nn.ConvTranspose2d(4, 4, 2, stride=2)))
    with pytest.warns(UserWarning, match="module '1' .* cannot be traced"):
        gm = pfa_fx.convert(model, "fa", strict=True)
    assert set(dict(pfa_fx.feedback_modules(gm))) == {"0", "1.inner"}
    x = torch.randn(2, 3, 5, 5)
    out = _same_forward_in_both_modes(model, gm, x)
    assert weights_on_backprop(out.sum(), gm) == []


class Opaque(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > float("inf"):  # data-dependent: tracing fails, the fallback keeps it opaque
            return x
        return self.inner(x)


class ExpertMixedConv(nn.Module):
    """timm's CondConv: one kernel per sample, mixed from experts by the input."""

    def __init__(self):
        super().__init__()
        self.route = nn.Linear(3, 4)
        self.conv = timm.layers.CondConv2d(3, 8, 3, padding=1, num_experts=4)

    def forward(self, x):
        return self.conv(x, torch.sigmoid(self.route(x.mean((2, 3)))))


class CondConvOnly(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.conv = timm.layers.CondConv2d(4, 6, 3, padding=1, groups=groups, num_experts=3)

    def forward(self, x, routing):
        return self.conv(x, routing)


@pytest.mark.parametrize("groups", [1, 2])
def test_expert_mixed_kernels_send_errors_through_the_mixed_feedback_kernels(groups):
    torch.manual_seed(0)
    model = CondConvOnly(groups).double()
    gm = pfa_fx.convert(model, "fa", strict=True)
    node = dict(pfa_fx.feedback_modules(gm))["conv"]
    assert node.weight_shape == (18, 4 // groups, 3, 3) and node.groups == 3 * groups
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    y = gm(x, r)
    assert torch.equal(y, model(x, r))
    assert weights_on_backprop(y.sum(), gm) == []
    e = torch.randn_like(y)
    y.backward(e)
    # independent formulas, sample by sample: kernel_s = r_s @ P, feedback_s = r_s @ B
    P, B = model.conv.weight.detach(), node.B.reshape(3, -1)
    shape = (6, 4 // groups, 3, 3)
    conv = lambda inp, w: torch.nn.functional.conv2d(inp, w, None, 1, 1, 1, groups)  # noqa: E731
    grad_P = torch.zeros_like(P)
    for s in range(2):
        xs, es, rs = x[s : s + 1].detach(), e[s : s + 1], r[s].detach()
        feedback_kernel = (rs @ B).reshape(shape)
        _, pull_x = torch.func.vjp(lambda v, k=feedback_kernel: conv(v, k), xs)
        torch.testing.assert_close(x.grad[s : s + 1], pull_x(es)[0], rtol=1e-10, atol=1e-12)
        _, pull_w = torch.func.vjp(lambda w, xs=xs: conv(xs, w), (rs @ P).reshape(shape))
        g_kernel = pull_w(es)[0].reshape(-1)
        torch.testing.assert_close(r.grad[s], B @ g_kernel, rtol=1e-10, atol=1e-12)  # routing's error via B
        grad_P += torch.outer(rs, g_kernel)
    torch.testing.assert_close(gm.conv.weight.grad, grad_P, rtol=1e-10, atol=1e-12)


def test_expert_bank_under_kp_moves_its_feedback_bank_by_the_banks_gradient():
    torch.manual_seed(0)
    gm = pfa_fx.convert(CondConvOnly().double(), "kp", strict=True)
    node = dict(pfa_fx.feedback_modules(gm))["conv"]
    x, r = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    gm(x, r).square().sum().backward()
    assert torch.equal(node.B.grad.reshape(3, -1), gm.conv.weight.grad)
    pfa = pfa_fx.convert(CondConvOnly().double(), "pfa", expansion=2, strict=True)
    out = pfa(x, r)
    assert weights_on_backprop(out.sum(), pfa) == []
    assert dict(pfa_fx.feedback_modules(pfa))["conv"].feedback_weight().shape == (18, 4, 3, 3)


def test_efficientnet_condconv_converts_completely():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_cc_b0_4e", num_classes=10)
    gm = pfa_fx.convert(model, "pfa", expansion=1, strict=True)
    out = _same_forward_in_both_modes(model, gm, torch.randn(2, 3, 64, 64))
    assert weights_on_backprop(out.sum(), gm) == []
