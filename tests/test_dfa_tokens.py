"""DFA for sequences: the per-token projection (``form="token"``, Launay et al. 2020) against
its formula in float64, ``form="auto"``'s choice per op, and a Hugging Face model's own loss
(``labels=``) carrying DFA's output error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfa_fx

DT = torch.float64


def _nodes(gm):
    return dict(pfa_fx.feedback_modules(gm))


class _SeqMLP(nn.Module):
    """``(batch, T, 5) -> (batch, T, 3)``: two linear ops applied at every position."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_token_form_is_launays_per_position_projection_in_float64():
    torch.manual_seed(0)
    model = _SeqMLP().double()
    x = torch.randn(2, 4, 5, dtype=DT, requires_grad=True)
    gm = pfa_fx.convert(model, "dfa", form="token")
    out = gm(x)
    e = torch.randn_like(out)  # the output error dloss/dy, (batch, T, V)
    out.backward(e)
    nodes = _nodes(gm)
    assert {n.last_form for n in nodes.values()} == {"token"}
    assert nodes["fc1"].config == {"scale": "xavier", "form": "token"}

    # Launay et al.: delta_x[b, t] = B_k e[b, t], B_k = P_k^T with P_k = node.projection(V, d_k)
    P1 = nodes["fc1"].projection(3, 5).double()  # (V, d_in) of fc1, whose input is x
    P2 = nodes["fc2"].projection(3, 7).double()
    B1, B2 = P1.T, P2.T
    W1 = model.fc1.weight.detach().clone().requires_grad_()
    b1 = model.fc1.bias.detach().clone().requires_grad_()
    W2 = model.fc2.weight.detach().clone().requires_grad_()
    a1 = torch.einsum("btd,hd->bth", x.detach(), W1) + b1
    h1 = torch.tanh(a1)
    a2 = torch.einsum("bth,vh->btv", h1.detach(), W2)
    delta_h1 = torch.einsum("hv,btv->bth", B2, e)  # fc2's input error: a projection, not W2^T e
    delta_x = torch.einsum("dv,btv->btd", B1, e)
    # weight gradients: autograd of the explicit computation, fed DFA's errors
    gW2 = torch.autograd.grad(a2, W2, e)[0]  # the top op trains on its true error
    gW1, gb1 = torch.autograd.grad(h1, (W1, b1), delta_h1)
    torch.testing.assert_close(x.grad, delta_x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gm.get_parameter("fc2.weight").grad, gW2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gm.get_parameter("fc1.weight").grad, gW1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gm.get_parameter("fc1.bias").grad, gb1, rtol=1e-12, atol=1e-14)

    # and it differs from the dense form, which projects each sample's whole (T x V) error
    dense = pfa_fx.convert(model, "dfa", form="dense")
    x2 = x.detach().clone().requires_grad_()
    dense(x2).backward(e)
    assert {n.last_form for n in _nodes(dense).values()} == {"dense"}
    assert not torch.allclose(x2.grad, x.grad)
    # "auto" takes the token form here: the same gradients
    auto = pfa_fx.convert(model, "dfa")
    x3 = x.detach().clone().requires_grad_()
    auto(x3).backward(e)
    assert torch.equal(x3.grad, x.grad)


def _llama(layers=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _grads(gm):
    return {k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None}


def test_hf_labels_loss_inside_the_model_carries_dfas_output_error():
    model = _llama()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    gm = pfa_fx.convert(model, "dfa")

    # the loss computed outside from the logits: the reference
    logits = gm(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    outside = _grads(gm)
    nodes = _nodes(gm)
    assert {n.last_form for n in nodes.values()} == {"token"}  # auto: every op of a causal LM

    # labels=: the model computes the same loss itself, from the same logits
    gm.zero_grad(set_to_none=True)
    out = gm(input_ids=ids, labels=ids)
    out.loss.backward()
    inside = _grads(gm)
    assert inside.keys() == outside.keys() == {k for k, _ in gm.named_parameters()}
    for k in outside:
        torch.testing.assert_close(inside[k], outside[k], rtol=1e-5, atol=1e-7, msg=k)
    assert "captured at output['logits'] (the model's own loss reaches it)" in str(pfa_fx.report(gm))
    assert "15 ops took the per-token projection, 0 the dense one" in str(pfa_fx.report(gm))

    # return_dict=False puts the loss first: the logits stay the main output
    gm.zero_grad(set_to_none=True)
    loss, _ = gm(input_ids=ids, labels=ids, return_dict=False)[:2]
    loss.backward()
    for k, g in _grads(gm).items():
        torch.testing.assert_close(g, outside[k], rtol=1e-5, atol=1e-7, msg=k)

    # these are DFA's gradients, not BP's: the hidden ops' differ
    with pfa_fx.backprop_mode(gm):
        gm.zero_grad(set_to_none=True)
        gm(input_ids=ids, labels=ids).loss.backward()
    bp = _grads(gm)
    torch.testing.assert_close(bp["lm_head.weight"], outside["lm_head.weight"], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(bp["model.layers.0.mlp.up_proj.weight"], outside["model.layers.0.mlp.up_proj.weight"])


def test_hf_labels_inside_an_exported_graph():
    model = _llama(layers=1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    # labels among the example inputs: the loss is computed inside the captured graph
    gm = pfa_fx.convert(model, "dfa", example_inputs={"input_ids": ids, "labels": ids})
    assert pfa_fx.report(gm).ops[0].path == "export graph"
    gm(input_ids=ids, labels=ids).loss.backward()
    inside = _grads(gm)
    gm.zero_grad(set_to_none=True)
    logits = gm(input_ids=ids, labels=ids).logits  # the graph's own call, the loss left unused
    F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    for k, g in _grads(gm).items():
        torch.testing.assert_close(inside[k], g, rtol=1e-5, atol=1e-7, msg=k)


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_auto_keeps_the_dense_form_without_a_token_axis_and_token_refuses_such_ops():
    torch.manual_seed(3)
    x = torch.randn(4, 4, 6, requires_grad=True)  # the conv's input: (batch, channels, length)
    model = _CNN()
    auto, dense = pfa_fx.convert(model, "dfa"), pfa_fx.convert(model, "dfa", form="dense")
    for gm in (auto, dense):
        gm(x).sum().backward()
        assert {n.last_form for n in _nodes(gm).values()} == {"dense"}
    for (name, a), b in zip(auto.named_parameters(), dense.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert "per-token" not in str(pfa_fx.report(auto))
    assert _nodes(auto)["fc"].config == {"scale": "xavier"}  # auto is the default: not recorded

    # a token-shaped output does not make a convolution's channels tokens
    seq = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.Conv1d(4, 4, 1))  # (batch, 4, 6) -> (batch, 4, 6)
    gm = pfa_fx.convert(seq, "dfa")
    gm(x).sum().backward()
    assert {n.last_form for n in _nodes(gm).values()} == {"dense"}
    token = pfa_fx.convert(seq, "dfa", form="token")
    with pytest.raises(RuntimeError, match=r"op '1' \(convolution.*form='token' needs a linear op.*form='auto'"):
        token(x).sum().backward()


def test_sequence_first_inputs_inside_multihead_attention_take_the_token_form():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(8, 5))
    gm = pfa_fx.convert(model, "dfa")
    x = torch.randn(3, 4, 8, requires_grad=True)  # the first op (in_proj) computes an input error too
    out = gm(x)
    e = torch.randn_like(out)
    out.backward(e)
    forms = {k: n.last_form for k, n in _nodes(gm).items()}
    # in_proj reads (T, batch, d); out_proj reads (T·batch, d), whose order cannot be told: dense
    assert forms == {"0.self_attn.in_proj_weight": "token", "0.self_attn.out_proj": "dense"} | {
        k: "token" for k in ("0.linear1", "0.linear2", "1")
    }
    node = _nodes(gm)["0.self_attn.in_proj_weight"]
    expected = (e @ node.projection(5, 8)).transpose(0, 1)  # (T, batch, d)
    torch.testing.assert_close(node.input_error(x.detach().transpose(0, 1)), expected)


def test_bad_form_is_a_conversion_error_listing_the_valid_ones():
    with pytest.raises(
        pfa_fx.ConversionError, match=r"unknown form 'tokens'; valid forms: auto, token, dense.*'token'\?"
    ):
        pfa_fx.convert(_SeqMLP(), "dfa", form="tokens")
    with pytest.raises(pfa_fx.ConversionError, match="unknown form"):
        pfa_fx.convert(_SeqMLP(), {"fc1": ("dfa", {"form": 1}), "*": "dfa"})
    with pytest.raises(ValueError, match=r"unknown option 'form' for rule\(s\) fa"):
        pfa_fx.convert(_SeqMLP(), "fa", form="token")
