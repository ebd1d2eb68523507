"""CUDA checks (skipped without a GPU; run by benchmarks/gpu_check.sh on a GPU machine)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import pfa_fx
from pfa_fx.audit import weights_on_backprop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).cuda()


@pytest.mark.parametrize("rule", ["fa", "pfa"])
def test_cuda_forward_identical_and_nothing_on_backprop(rule):
    model = _model()
    gm = pfa_fx.convert(model, rule)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    assert torch.equal(gm.eval()(x), model.eval()(x))
    gm.train()
    assert weights_on_backprop(gm(x).sum(), gm) == []


def test_cuda_bp_rule_gives_autograd_gradients():
    torch.backends.cudnn.deterministic = True
    model = _model().double()
    gm = pfa_fx.convert(model, "bp")
    x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.float64)
    model(x).sum().backward()
    gm(x).sum().backward()
    grads = dict(gm.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-12, atol=1e-12)


def test_cuda_bf16_autocast_channels_last_and_compile():
    model = _model().to(memory_format=torch.channels_last)
    gm = pfa_fx.convert(model, "pfa", compact=True)
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(gm(x), model(x))
    compiled = torch.compile(gm)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(compiled(x), torch.arange(8, device="cuda") % 10)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None)
