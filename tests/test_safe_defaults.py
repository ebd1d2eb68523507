"""Default conversion keeps the backward's error magnitudes at backprop's on any architecture.

Transformers initialise far below Xavier scale (HF at std 0.02) and LayerNorm's backward
multiplies the error by ``1/σ`` of its input, so feedback drawn at Xavier's std made the
error grow at every block (GPT-2's step-0 gradient 5e8x BP's under FA). The default draws
at W's own RMS: the step-0 gradient norm of the model's weights stays within 2x of BP's.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import pfa_fx

RULES = [("fa", {}), ("sf", {}), ("kp", {}), ("wm", {}), ("pfa", {}), ("pfa", {"compact": True})]


def _grad_norm(model: nn.Module, loss_fn) -> float:
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    grads = [p.grad for p in pfa_fx.model_parameters(model) if p.grad is not None and p.ndim >= 2]
    return float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))


def _check(model: nn.Module, loss_fn) -> None:
    model.train()
    ref = _grad_norm(model, loss_fn)
    ratios = {}
    for rule, opts in RULES:
        converted = pfa_fx.convert(model, rule, **opts)
        ratios[(rule, tuple(opts))] = _grad_norm(converted, loss_fn) / ref
    bad = {k: r for k, r in ratios.items() if not 0.5 <= r <= 2.0}
    assert not bad, f"step-0 gradient norm vs BP outside [0.5, 2]: {bad} (all: {ratios})"


def _hf_lm(kind: str) -> tuple[nn.Module, object]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=3,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(
            num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128
        )
        model = transformers.BertForMaskedLM(cfg)
    return model, lambda m: m(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_default_conversion_of_hf_models_keeps_backprop_gradient_magnitudes(kind):
    model, loss_fn = _hf_lm(kind)
    _check(model, loss_fn)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "convnext_atto"])
def test_default_conversion_of_timm_models_keeps_backprop_gradient_magnitudes(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 3} if name.startswith("vit") else {}  # ViT-S width, 3 blocks
    model = timm.create_model(name, num_classes=10, **kwargs)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    _check(model, lambda m: nn.functional.cross_entropy(m(x), y))


def test_xavier_scale_is_one_option_away_and_recorded():
    model = nn.Sequential(nn.Linear(64, 32))
    nn.init.normal_(model[0].weight, std=0.02)
    default = pfa_fx.convert(model, "fa")
    paper = pfa_fx.convert(model, "fa", scale="xavier")
    (_, node_d), (_, node_x) = next(iter(pfa_fx.feedback_modules(default))), next(iter(pfa_fx.feedback_modules(paper)))
    assert node_d.config["scale"] == "weight" and node_x.config["scale"] == "xavier"
    rms = model[0].weight.detach().double().square().mean().sqrt()
    assert node_d.B.double().std().item() == pytest.approx(float(rms), rel=0.1)
    assert node_x.B.double().std().item() == pytest.approx((2 / 96) ** 0.5, rel=0.1)
