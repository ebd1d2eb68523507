"""Where users run it: dtypes, bf16 autocast, torch.compile, channels_last, .to()."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import pfa_fx
from tests.nets import MLP, Mixed


def _grads(model, x):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    named = model.named_parameters()
    return x.grad, {k.removeprefix("_orig_mod."): p.grad for k, p in named if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bp_rule_matches_native_gradients_in_each_dtype(dtype):
    model = Mixed().to(dtype)
    gm = pfa_fx.convert(model, "bp")
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    gx, gp = _grads(model, x)
    hx, hp = _grads(gm, x)
    assert torch.equal(gx, hx)
    for k, g in gp.items():
        assert torch.equal(g, hp[k]), k


def test_bf16_autocast_forward_equals_native_autocast_and_grads_are_fp32():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gm = pfa_fx.convert(model, "pfa", expansion=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        out = gm(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(gm(x), torch.arange(2))
    loss.backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_bp_rule_under_bf16_autocast_matches_native_autocast_gradients():
    model = MLP()
    gm = pfa_fx.convert(model, "bp")
    x = torch.randn(4, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gx, gp = _grads(model, x)
        hx, hp = _grads(gm, x)
    assert torch.equal(gx, hx)
    for k in gp:
        torch.testing.assert_close(gp[k], hp[k], rtol=0, atol=0)


def test_channels_last_model_matches_and_keeps_its_layout():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
    gm = pfa_fx.convert(model, "pfa", expansion=2)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert torch.equal(gm(x), model(x))
    xg = x.clone().requires_grad_()
    gm(xg).sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_to_moves_feedback_state_with_the_model():
    gm = pfa_fx.convert(Mixed(), "pfa", expansion=2).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in gm.state_dict().values() if t.is_floating_point())
    node = dict(pfa_fx.feedback_modules(gm))["conv"]
    assert node.weight.dtype == torch.float64  # the reference follows the moved parameter
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    gm(x).sum().backward()
    assert x.grad.dtype == torch.float64


@pytest.mark.parametrize("rule", ["fa", "pfa"])
def test_torch_compile_gives_the_same_forward_and_gradients(rule):
    torch.manual_seed(0)
    model = Mixed()
    gm = pfa_fx.convert(model, rule, **({"expansion": 2} if rule == "pfa" else {}))
    compiled = torch.compile(gm, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(compiled(x), gm(x), rtol=1e-6, atol=1e-6)
    gx, gp = _grads(gm, x)
    cx, cp = _grads(compiled, x)
    torch.testing.assert_close(cx, gx, rtol=1e-5, atol=1e-6)
    for k in gp:
        torch.testing.assert_close(cp[k], gp[k], rtol=1e-5, atol=1e-6)


def test_torch_compile_inductor_on_cpu_trains_without_graph_breaks():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    gm = pfa_fx.convert(MLP(), "pfa", expansion=2)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(torch.randn(4, 20))
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(gm)
    x = torch.randn(4, 20)
    ref_x, ref = _grads(gm, x)
    cx, cp = _grads(compiled, x)
    torch.testing.assert_close(cx, ref_x, rtol=1e-4, atol=1e-5)
    for k in ref:
        torch.testing.assert_close(cp[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "swin_t"])
def test_dynamo_captures_converted_models_in_one_graph(name):
    # swin_t exercises the run-time interception of an FX-wrapped function
    gm = pfa_fx.convert(torchvision.models.get_model(name, num_classes=10), "pfa", compact=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("rule", ["dfa", "wm", "pal"])
def test_torch_compile_trains_the_table1_rules_like_eager_over_two_steps(rule):
    # DFA's output error and PAL's noisy pass live outside the compiled graph (forward
    # hooks kept eager); the second step must use that step's error, not a traced constant
    import copy

    torch.manual_seed(0)
    gm = pfa_fx.convert(MLP(), rule)
    twin = copy.deepcopy(gm)
    torch._dynamo.reset()
    compiled = torch.compile(twin)
    for step in range(2):
        x = torch.randn(4, 20) * (step + 1)
        gx, gp = _grads(gm, x)
        cx, cp = _grads(compiled, x)
        torch.testing.assert_close(cx, gx, rtol=1e-4, atol=1e-5)
        for k in gp:
            torch.testing.assert_close(cp[k], gp[k], rtol=1e-4, atol=1e-5)
        pfa_fx.step_feedback(gm)  # WM's mirror step, PAL's update: the next step sees them
        pfa_fx.step_feedback(twin)
    for (k, a), b in zip(gm.state_dict().items(), twin.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("rule", ["dfa", "wm", "pal"])
def test_table1_rules_under_bf16_autocast_keep_the_native_forward_and_fp32_grads(rule):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gm = pfa_fx.convert(model, rule)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), gm.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gm(x), model(x))
    gm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(gm(x), torch.arange(2))
    loss.backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_dfa_ops_run_between_compiled_graphs_without_recompiling():
    # DFA's backward reads the output error captured during the backward, so dynamo cannot
    # trace it ahead of time: each op is a deliberate break at its call, the rest compiles,
    # and no op frame is retraced per shape (which would hit dynamo's recompile limit)
    from torch._dynamo.utils import counters

    gm = pfa_fx.convert(torchvision.models.resnet18(num_classes=10), "dfa")
    ops_n = len(list(pfa_fx.feedback_modules(gm)))
    torch._dynamo.reset()
    counters.clear()
    explained = torch._dynamo.explain(gm)(torch.randn(2, 3, 32, 32))
    assert 0 < explained.graph_break_count <= ops_n  # at most one per op
    assert all("disable" in str(r.reason) for r in explained.break_reasons)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, backend="aot_eager")
    compiled(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counters["stats"]["unique_graphs"] <= ops_n + 1  # retraced op frames would add more
