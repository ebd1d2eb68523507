"""Matrix products with a parameter operand are weight ops: ``torch.addmm(b, x, W)`` with W
stored (in, out) (Hugging Face's Conv1D), ``x @ W``, ``x @ W.T``, ``torch.mm``; and what
stays on BP is named (a warning, or an error under ``strict=True``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pfa_fx

DT = torch.float64


class InOut(nn.Module):
    """GPT-2's Conv1D, written out: the weight is (in, out), applied as x @ W + b."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=DT) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=DT) * 0.1)

    def forward(self, x):
        size = x.size()[:-1] + (self.weight.shape[1],)  # noqa: RUF005 (as Conv1D writes it: torch.fx traces it)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


class Products(nn.Module):
    """Every spelling of a matrix product with a parameter the pass takes."""

    def __init__(self):
        super().__init__()
        self.a = InOut(6, 5)
        self.p = nn.Parameter(torch.randn(5, 4, dtype=DT) * 0.3)  # x @ p: (in, out)
        self.q = nn.Parameter(torch.randn(3, 4, dtype=DT) * 0.3)  # x @ q.T: (out, in)
        self.r = nn.Parameter(torch.randn(3, 2, dtype=DT) * 0.3)  # torch.mm(x, r)

    def forward(self, x):
        h = torch.tanh(self.a(x))  # (n, t, 5)
        h = torch.tanh(h @ self.p)  # (n, t, 4)
        h = torch.tanh(h @ self.q.T)  # (n, t, 3)
        return torch.mm(h.reshape(-1, 3), self.r)


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    e = torch.randn_like(y)
    y.backward(e)
    return y, x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_bp_exact(native, gm, x) -> dict:
    """``gm`` (converted with bp) computes the native forward bit for bit and autograd's
    gradients, for the input and every parameter, on the same error; returns them."""
    torch.manual_seed(1)
    y0, gx0, g0 = _run(native, x)
    torch.manual_seed(1)
    y1, gx1, g1 = _run(gm, x)
    assert torch.equal(y0, y1)  # the forward is the native call, bit for bit
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-12)
    assert g0.keys() == g1.keys()
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=0, atol=1e-12)
    return g0


def test_every_product_with_a_parameter_is_converted_and_bp_equals_autograd():
    torch.manual_seed(0)
    native = Products()
    gm = pfa_fx.convert(native, "bp", strict=True)
    assert sorted(k for k, _ in pfa_fx.feedback_modules(gm)) == ["a", "p", "q", "r"]
    x = torch.randn(2, 3, 6, dtype=DT)
    _assert_bp_exact(native, gm, x)


def test_an_in_out_weight_sends_the_error_through_its_feedback_in_out_orientation():
    torch.manual_seed(0)
    gm = pfa_fx.convert(InOut(6, 5), "fa")
    node = dict(pfa_fx.feedback_modules(gm))["weight"]  # a root-level parameter: the op is named after it
    assert node.weight_shape == (5, 6)  # held (out, in) as nn.Linear holds its own
    assert torch.equal(node.weight, gm.weight.detach().t())
    x = torch.randn(4, 6, dtype=DT, requires_grad=True)
    y = gm(x)
    e = torch.randn_like(y)
    y.backward(e)
    b = node.feedback_weight()  # (out, in)
    torch.testing.assert_close(x.grad, e @ b, rtol=0, atol=1e-12)  # independent formula: e B
    torch.testing.assert_close(gm.weight.grad, x.detach().t() @ e, rtol=0, atol=1e-12)  # (in, out): xᵀ e
    torch.testing.assert_close(gm.bias.grad, e.sum(0), rtol=0, atol=1e-12)
    assert not torch.allclose(b, gm.weight.detach().t())  # FA's B is not W


def test_a_product_the_pass_cannot_route_is_named_a_warning_then_an_error_under_strict():
    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):  # (n, t, 4)
            return torch.bmm(self.fc(x), self.w.expand(x.shape[0], 4, 3))

    with pytest.warns(UserWarning, match=r"(?s)stay on BP as operands of a matrix product.*\bw: an operand of bmm"):
        pfa_fx.convert(Batched(), "fa")
    with pytest.raises(pfa_fx.ConversionError, match=r"(?s)strict=True.*\bw: an operand of bmm"):
        pfa_fx.convert(Batched(), "fa", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pfa_fx.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), "fa")  # nothing left: no warning


def test_a_product_kept_native_on_purpose_is_not_listed():
    gm = pfa_fx.convert(Products(), {"q": None, "*": "fa"}, strict=True)
    assert "q" not in dict(pfa_fx.feedback_modules(gm)) and gm.pfa_kept_native == ["q"]


def test_one_parameter_used_as_x_at_p_and_as_x_at_p_t_is_refused():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return (x @ self.p) @ self.p.T

    with pytest.raises(pfa_fx.ConversionError, match=r"both as x @ P and as x @ P\.T"):
        pfa_fx.convert(Both(), "fa")


def test_unknown_capture_lists_the_valid_front_ends():
    with pytest.raises(
        pfa_fx.ConversionError, match=r"unknown capture 'expor'.*'auto', 'fx', 'export', 'eager'.*'export'"
    ):
        pfa_fx.convert(Products(), "fa", capture="expor")


def test_export_front_end_on_a_plain_model_with_example_inputs():
    torch.manual_seed(0)
    native = Products()
    x = torch.randn(2, 3, 6, dtype=DT)
    gm = pfa_fx.convert(native, "bp", capture="export", example_inputs=(x,))
    assert type(gm) is Products  # the model keeps its class
    paths = {k: n.conversion_path for k, n in pfa_fx.feedback_modules(gm)}
    assert paths == dict.fromkeys(["a", "p", "q", "r"], "export graph")  # q's x @ q.T is aten.numpy_T there
    x2 = torch.randn(5, 7, 6, dtype=DT)  # batch and sequence not baked in
    assert torch.equal(gm(x2), native(x2))
    with pytest.raises(pfa_fx.TraceError, match="example inputs"):
        pfa_fx.convert(native, "fa", capture="export", fallback=False)


def test_the_eager_front_end_finds_matrix_parameters_a_probe_forward_applies():
    class Routed(nn.Module):
        """A router's bare weight (F.linear) and an (in, out) projection (x @ P) outside any
        weight module, behind data-dependent control flow (no graph capture takes it)."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6).double()
            self.router = nn.Parameter(torch.randn(4, 6, dtype=DT) * 0.3)
            self.proj = nn.Parameter(torch.randn(6, 3, dtype=DT) * 0.3)

        def forward(self, x):
            h = torch.tanh(self.fc(x))
            if h.sum() > 1e9:  # data-dependent: torch.fx and torch.export both refuse it
                h = h * 2
            return torch.cat([torch.nn.functional.linear(h, self.router), h @ self.proj], dim=-1)

    torch.manual_seed(0)
    native = Routed()
    x = torch.randn(5, 6, dtype=DT)
    with pytest.warns(UserWarning, match="runs eagerly"):
        gm = pfa_fx.convert(native, "bp", example_inputs=(x,), strict=True)
    assert {k: n.conversion_path for k, n in pfa_fx.feedback_modules(gm)} == {
        "fc": "eager",
        "router": "eager",
        "proj": "eager",
    }
    _assert_bp_exact(native, gm, x)
    # without example inputs there is no probe: only the Linear is routed, and the audit names the rest
    gm = pfa_fx.convert(native, "fa", capture="eager")
    assert list(dict(pfa_fx.feedback_modules(gm))) == ["fc"]
    assert pfa_fx.audit.weights_on_backprop(gm(x).sum(), gm) == ["proj", "router"]


def test_a_weight_norm_parametrized_convolution_is_routed_by_its_original_tensors():
    class Positional(nn.Module):
        """wav2vec2's positional convolution: weight_norm computes the weight each call."""

        def __init__(self):
            super().__init__()
            conv = nn.Conv1d(4, 4, 3, padding=1, groups=2).double()
            self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)

        def forward(self, x):
            return torch.tanh(self.conv(x))

    torch.manual_seed(0)
    native = Positional()
    gm = pfa_fx.convert(native, "bp", capture="eager", strict=True)
    assert list(dict(pfa_fx.feedback_modules(gm))) == ["conv"]
    x = torch.randn(2, 4, 7, dtype=DT)
    assert len(_assert_bp_exact(native, gm, x)) == 3  # bias and the two original tensors
    fa = pfa_fx.convert(native, "fa", capture="eager")
    assert pfa_fx.audit.weights_on_backprop(fa(x).sum(), fa) == []  # its error goes through B


def test_x_at_w_mt_is_a_weight_op_through_torch_export():
    class MT(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5, dtype=DT))

        def forward(self, x):
            return x @ self.w.mT

    x = torch.randn(2, 4, 5, dtype=DT)
    gm = pfa_fx.convert(MT(), "bp", capture="export", example_inputs=(x,), strict=True)
    assert {k: n.conversion_path for k, n in pfa_fx.feedback_modules(gm)} == {"w": "export graph"}
