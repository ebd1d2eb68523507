"""The autograd contract of the feedback ops, against formulas written independently:
forward identical; grad_x = L^T_{W_b}(e); grad_W and grad_b exactly BP's; grad W_b = grad W."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from pfa_fx import ops
from pfa_fx.rules import FeedbackNode

DT = torch.float64


class FixedFeedback(FeedbackNode):
    """A node returning a given W_b (optionally trainable) — isolates the op from the rules."""

    rule = "test"

    def __init__(self, weight, weight_b, trainable=False):
        super().__init__(weight, groups=1, generator=torch.Generator())
        self.wb = torch.nn.Parameter(weight_b.clone(), requires_grad=trainable)

    def state(self):
        return (self.wb,)

    def feedback_from(self, weight, state):
        return state[0]


def _leaf(*shape):
    return torch.randn(*shape, dtype=DT, requires_grad=True)


@pytest.mark.parametrize("x_shape", [(5, 7), (2, 3, 4, 7), (7,)], ids=["2d", "nd", "1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients_follow_feedback_formula(x_shape, bias):
    x, W = _leaf(*x_shape), _leaf(6, 7)
    b = _leaf(6) if bias else None
    Wb = torch.randn(6, 7, dtype=DT)
    node = FixedFeedback(W, Wb, trainable=True)
    y = ops.feedback_linear(x, W, b, node)
    assert torch.equal(y, F.linear(x, W, b))
    e = torch.randn_like(y)
    y.backward(e)
    # independent formulas
    e2, x2 = e.reshape(-1, 6), x.detach().reshape(-1, 7)
    torch.testing.assert_close(x.grad, (e2 @ Wb).reshape(x_shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W.grad, torch.einsum("no,ni->oi", e2, x2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(node.wb.grad, W.grad, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(b.grad, e2.sum(0), rtol=1e-12, atol=1e-12)


CONV_CASES = [
    # dim, in, out, kernel, stride, padding, dilation, groups
    (1, 4, 6, 3, 1, 0, 1, 1),
    (1, 4, 6, 5, 2, 2, 2, 2),
    (2, 4, 6, 3, 1, 1, 1, 1),
    (2, 4, 6, 3, 2, 1, 1, 2),
    (2, 6, 6, 3, 1, 2, 2, 6),  # depthwise, dilated
    (2, 4, 8, 1, 1, 0, 1, 1),
    (2, 4, 6, 3, 1, "same", 2, 1),
    (2, 4, 6, 4, 1, "same", 1, 2),  # even kernel: asymmetric same padding
    (2, 4, 6, 3, 2, "valid", 1, 1),
    (3, 2, 4, 3, (1, 2, 1), (1, 0, 1), 1, 2),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c[0]}d_k{c[3]}_s{c[4]}_p{c[5]}_d{c[6]}_g{c[7]}")
@pytest.mark.parametrize("bias", [True, False])
def test_conv_gradients_follow_feedback_formula(case, bias):
    dim, cin, cout, k, stride, padding, dilation, groups = case
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    x = _leaf(2, cin, *([9] * dim))
    W = _leaf(cout, cin // groups, *([k] * dim))
    b = _leaf(cout) if bias else None
    Wb = torch.randn_like(W.detach())
    node = FixedFeedback(W, Wb, trainable=True)
    y = ops.feedback_conv(x, W, b, node, stride, padding, dilation, groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch notes the even-kernel "same" pad copy
        ref = conv(x, W, b, stride, padding, dilation, groups)
    assert torch.equal(y, ref)
    e = torch.randn_like(y)
    y.backward(e)
    # grad_x: the adjoint of the linear map x -> conv(x, W_b), checked through the
    # defining identity <conv(v, W_b), e> = <v, grad_x> for random v
    for _ in range(3):
        v = torch.randn_like(x)
        lhs = (conv(v, Wb, None, stride, padding, dilation, groups) * e).sum()
        torch.testing.assert_close((v * x.grad).sum(), lhs, rtol=1e-10, atol=1e-10)
    # grad_W and grad_b: what BP gives (the weight's values never enter them)
    W2 = W.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if bias else None
    conv(x.detach(), W2, b2, stride, padding, dilation, groups).backward(e)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(node.wb.grad, W.grad, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(b.grad, e.sum(dim=[0, *range(2, e.dim())]), rtol=1e-12, atol=1e-12)


CONV_T_CASES = [
    # dim, in, out, kernel, stride, padding, output_padding, groups, dilation
    (1, 4, 6, 3, 2, 1, 1, 1, 1),
    (2, 4, 6, 3, 1, 0, 0, 1, 1),
    (2, 4, 6, 4, 2, 1, 0, 2, 1),
    (2, 6, 6, 3, 2, 1, 1, 6, 2),  # depthwise, dilated, output padding
    (3, 2, 4, 3, (2, 1, 2), (1, 0, 1), (1, 0, 0), 2, 1),
]


@pytest.mark.parametrize("case", CONV_T_CASES, ids=lambda c: f"convT{c[0]}d_k{c[3]}_s{c[4]}_op{c[6]}_g{c[7]}_d{c[8]}")
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_conv_gradients_follow_feedback_formula(case, bias):
    dim, cin, cout, k, stride, padding, out_pad, groups, dilation = case
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dim]
    x = _leaf(2, cin, *([5] * dim))
    W = _leaf(cin, cout // groups, *([k] * dim))  # torch's (in, out/groups, *k) layout
    b = _leaf(cout) if bias else None
    Wb = torch.randn_like(W.detach())
    node = FixedFeedback(W, Wb, trainable=True)
    y = ops.feedback_conv_transpose(x, W, b, node, stride, padding, out_pad, groups, dilation)
    assert torch.equal(y, conv_t(x, W, b, stride, padding, out_pad, groups, dilation))
    e = torch.randn_like(y)
    y.backward(e)
    # grad_x: adjoint of v -> conv_transpose(v, W_b), through <L(v), e> = <v, grad_x>
    for _ in range(3):
        v = torch.randn_like(x)
        lhs = (conv_t(v, Wb, None, stride, padding, out_pad, groups, dilation) * e).sum()
        torch.testing.assert_close((v * x.grad).sum(), lhs, rtol=1e-10, atol=1e-10)
    W2 = W.detach().clone().requires_grad_()
    conv_t(x.detach(), W2, None, stride, padding, out_pad, groups, dilation).backward(e)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(node.wb.grad, W.grad, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(b.grad, e.sum(dim=[0, *range(2, e.dim())]), rtol=1e-12, atol=1e-12)


def test_conv_with_feedback_equal_to_weight_is_exactly_backprop():
    x, W, b = _leaf(2, 4, 9, 9), _leaf(6, 2, 3, 3), _leaf(6)
    node = FixedFeedback(W, W.detach())
    ops.feedback_conv(x, W, b, node, 2, 1, 1, 2).sum().backward()
    x2, W2, b2 = (t.detach().clone().requires_grad_() for t in (x, W, b))
    F.conv2d(x2, W2, b2, 2, 1, 1, 2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(W.grad, W2.grad) and torch.equal(b.grad, b2.grad)


def test_feedback_weight_is_not_built_without_grad():
    calls = []

    class Counting(FixedFeedback):
        def state(self):
            calls.append(1)
            return super().state()

    x, W = _leaf(3, 4), _leaf(5, 4)
    node = Counting(W, W.detach())
    with torch.no_grad():
        y = ops.feedback_linear(x, W, None, node)
    assert calls == [] and torch.equal(y, F.linear(x, W))


def test_conv_rejects_unknown_padding_string():
    x, W = _leaf(1, 2, 5, 5), _leaf(3, 2, 3, 3)
    with pytest.raises(ValueError, match="'valid', 'same'"):
        ops.feedback_conv(x, W, None, FixedFeedback(W, W.detach()), 1, "full")
