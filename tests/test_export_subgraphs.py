"""torch.export graphs with higher-order-op subgraphs: a ``torch.no_grad()`` or
``torch.autocast`` region inside forward becomes ``wrap_with_set_grad_enabled`` /
``wrap_with_autocast`` with a subgraph (transformers < 5.24 compute rotary embeddings in
one), torch.cond two. The export front end inlines the region subgraphs (so the weight ops
in them are rewritten), adopts other subgraphs as submodules, and where a weight is used
inside one it cannot rewrite, falls back to the next front end with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pfa_fx
from pfa_fx.audit import weights_on_backprop


class NoGradRegion(nn.Module):
    """A frozen projection computed under no_grad (a table, like rotary embeddings), a
    trained one outside it, and an autocast region holding a trained Linear."""

    def __init__(self):
        super().__init__()
        self.table = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, 8))

    def forward(self, x):
        with torch.no_grad():
            angles = self.table(x * self.freq).cos()
        h = self.fc(x) * angles
        with torch.autocast("cpu", enabled=False):
            return self.head(torch.relu(h))


def _exported_hops(model, x):
    ep = torch.export.export(model, (x,), strict=False)
    return {n.target.name() for n in ep.module().graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)}


def test_region_subgraphs_are_inlined_and_their_weight_ops_converted():
    torch.manual_seed(0)
    native = NoGradRegion()
    x = torch.randn(3, 8)
    assert "wrap_with_set_grad_enabled" in _exported_hops(native, x)  # the case this test is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, nothing left on BP
        model = pfa_fx.convert(native, "fa", capture="export", example_inputs=(x,), fallback=False)
    ops = dict(pfa_fx.feedback_modules(model))
    assert set(ops) == {"table", "fc", "head"}
    assert {n.conversion_path for n in ops.values()} == {"export graph"}
    for mode in (False, True):
        native.train(mode)
        model.train(mode)
        assert torch.equal(native(x), model(x))
    # the region keeps its grad mode: no gradient reaches the table, the rest trains
    model(x).square().sum().backward()
    assert model.table.weight.grad is None and model.fc.weight.grad is not None
    assert weights_on_backprop(model(x).sum(), model) == []
    # the previous grad mode is restored after the region, not the one at export
    with torch.no_grad():
        assert not model(x).requires_grad
    assert model(x).requires_grad


def test_a_model_run_under_no_grad_keeps_no_grad_after_an_inlined_region():
    native = NoGradRegion()
    x = torch.randn(2, 8)
    model = pfa_fx.convert(native, "fa", capture="export", example_inputs=(x,))
    with torch.no_grad():
        model(x)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


class AutocastRegion(nn.Module):
    """A Linear under bfloat16 autocast between two float32 ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.b(h.relu())
        return self.c(h.float())


def test_an_autocast_region_is_inlined_and_keeps_its_dtype():
    torch.manual_seed(0)
    native = AutocastRegion()
    x = torch.randn(3, 8)
    assert "wrap_with_autocast" in _exported_hops(native, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = pfa_fx.convert(native, "pfa", expansion=2, capture="export", example_inputs=(x,), fallback=False)
    assert set(dict(pfa_fx.feedback_modules(model))) == {"a", "b", "c"}
    assert torch.equal(native(x), model(x))
    assert not torch.is_autocast_enabled("cpu")  # left after the region
    out = model(x)
    assert weights_on_backprop(out.sum(), model) == []
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class CondWithoutWeights(nn.Module):
    """torch.cond on activations only: its branches use no weight."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        return torch.cond(h.sum() > 0, lambda t: t.relu(), lambda t: t.sin(), (h,))


class CondWithWeights(nn.Module):
    """torch.cond whose branches apply Linear weights: the rewrite does not enter them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: self.a(t), lambda t: self.b(t), (x,))


def test_cond_subgraphs_without_weights_are_adopted_as_submodules():
    torch.manual_seed(0)
    native = CondWithoutWeights()
    x = torch.randn(2, 6)
    assert "cond" in _exported_hops(native, x)
    model = pfa_fx.convert(native, "fa", capture="export", example_inputs=(x,), fallback=False)
    assert {n.conversion_path for _, n in pfa_fx.feedback_modules(model)} == {"export graph"}
    assert any(name.startswith("pfa_export_subgraph_") for name, _ in model.named_children())
    assert not any(k.startswith("pfa_export") for k in model.state_dict())  # subgraphs hold no state
    for sign in (1, -1):
        assert torch.equal(native(sign * x.abs()), model(sign * x.abs()))


def test_weights_inside_a_cond_fall_back_with_a_warning_naming_why():
    native = CondWithWeights()
    x = torch.randn(2, 6)
    with (
        pytest.warns(UserWarning, match=r"higher-order op 'cond'.*matrix product"),
        pytest.raises(pfa_fx.TraceError, match=r"a\.weight"),
    ):
        pfa_fx.convert(native, "fa", capture="export", example_inputs=(x,), fallback=False)
    # with fallback, another front end converts it; never a stray TypeError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pfa_fx.convert(native, "fa", capture="export", example_inputs=(x,))
    assert "export graph" not in {n.conversion_path for _, n in pfa_fx.feedback_modules(model)}
    assert torch.equal(native(x), model(x))
