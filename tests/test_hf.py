"""Hugging Face transformers models: captured with torch.export (torch.fx cannot trace them),
every weight op converted (GPT-2's Conv1D included), the forward identical, BP exact,
generation with a KV cache unbroken, and strict=True refusing what stays on BP."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pfa_fx
from pfa_fx.audit import weights_on_backprop

transformers = pytest.importorskip("transformers")

DT = torch.float64
VOCAB = 97


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
    return transformers.GPT2LMHeadModel(cfg)


#: a small decoder's sizes, shared by the Llama and Mixtral configs
DECODER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)


def _llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, bos_token_id=0, eos_token_id=0, pad_token_id=0, **DECODER)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB
    )
    return transformers.BertForMaskedLM(cfg)


def _vit():
    cfg = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=16, patch_size=4
    )
    return transformers.ViTForImageClassification(cfg)


def _ids(batch=2, seq=9, seed=0):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt2_pair():
    torch.manual_seed(0)
    native = _gpt2().to(DT).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on BP: no warning
        converted = pfa_fx.convert(native, "bp", strict=True)
    return native, converted


def test_gpt2_converts_all_nine_weight_ops_through_a_captured_graph(gpt2_pair):
    native, gm = gpt2_pair
    ops = dict(pfa_fx.feedback_modules(gm))
    assert len(ops) == 9 and "lm_head" in ops and "transformer.h.0.attn.c_attn" in ops
    assert {n.conversion_path for n in ops.values()} == {"export graph"}
    assert type(gm) is type(native)  # the class is kept: generate, config, save_pretrained
    assert ops["transformer.h.0.attn.c_attn"].weight_shape == (96, 32)  # Conv1D (in, out) held as (out, in)
    assert "export graph" in str(pfa_fx.report(gm))


def test_gpt2_forward_is_identical_and_bp_gradients_equal_autograd(gpt2_pair):
    native, gm = gpt2_pair
    ids = _ids()
    for model in (native, gm):
        model.zero_grad()
        out = model(ids).logits
        out.square().mean().backward()
    assert torch.equal(native(ids).logits, gm(ids).logits)
    assert weights_on_backprop(gm(ids).logits.sum(), gm) == []
    grads = dict(gm.named_parameters())
    for name, p in native.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=0, atol=1e-12, msg=name)


def test_the_captured_graph_takes_other_batch_and_sequence_sizes(gpt2_pair):
    native, gm = gpt2_pair
    captured = gm.__dict__["_pfa_export"]
    calls = []
    forward = captured.forwards[False]
    captured.forwards[False] = lambda *a: calls.append(1) or forward(*a)
    try:
        for batch, seq in ((1, 3), (4, 17), (3, 5)):
            ids = _ids(batch, seq, seed=batch)
            assert torch.equal(native(ids).logits, gm(ids).logits)
    finally:
        captured.forwards[False] = forward
    assert len(calls) == 3  # every call ran the graph, none the eager route


def test_generation_with_a_kv_cache_gives_the_native_tokens(gpt2_pair):
    native, gm = gpt2_pair
    prompt = _ids(1, 4)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(native.generate(prompt, **kwargs), gm.generate(prompt, **kwargs))


def test_tied_lm_head_is_a_weight_op_named_after_its_module_and_the_embedding_is_not(gpt2_pair):
    _, gm = gpt2_pair
    assert gm.lm_head.weight is gm.transformer.wte.weight  # still tied after conversion
    ops = dict(pfa_fx.feedback_modules(gm))
    assert ops["lm_head"]._weight_ref[0] is gm.lm_head.weight and "transformer.wte" not in ops


@pytest.mark.parametrize("capture", ["export", "eager"])
def test_gpt2_under_fa_sends_no_error_through_a_forward_weight(capture):
    torch.manual_seed(0)
    gm = pfa_fx.convert(_gpt2(), "fa", capture=capture, strict=True)
    assert len(list(pfa_fx.feedback_modules(gm))) == 9
    out = gm(_ids(), labels=_ids())  # labels: not the captured call, runs the eager route
    assert torch.isfinite(out.loss) and weights_on_backprop(out.loss, gm) == []
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None)


def test_strict_refuses_conv1d_weights_left_on_bp_and_the_default_warns(monkeypatch):
    # the conversion GPT-2 got before Conv1D was known (and no probe forward): only lm_head converted
    monkeypatch.setattr(pfa_fx.weights, "in_out_linear_modules", lambda: ())
    monkeypatch.setattr(pfa_fx.capture.eager, "applied_weights", lambda *a: [])
    model = _gpt2()
    with pytest.warns(UserWarning, match=r"(?s)stay on BP.*transformer\.h\.0\.attn\.c_attn\.weight"):
        gm = pfa_fx.convert(model, "fa", capture="eager")
    assert list(dict(pfa_fx.feedback_modules(gm))) == ["lm_head"]
    with pytest.raises(pfa_fx.ConversionError, match=r"(?s)strict=True.*transformer\.h\.1\.mlp\.c_proj\.weight"):
        pfa_fx.convert(model, "fa", capture="eager", strict=True)


@pytest.mark.parametrize(
    ("build", "inputs"),
    [
        (_llama, lambda: {"input_ids": _ids(3, 7)}),
        (_bert, lambda: {"input_ids": _ids(3, 7)}),
        (_vit, lambda: {"pixel_values": torch.randn(3, 3, 16, 16)}),
    ],
    ids=["llama", "bert", "vit"],
)
def test_hf_models_convert_to_a_captured_graph_with_the_same_forward(build, inputs):
    torch.manual_seed(0)
    native = build().eval()
    gm = pfa_fx.convert(native, "pfa", expansion=2, strict=True)  # example inputs: the model's own
    paths = {n.conversion_path for _, n in pfa_fx.feedback_modules(gm)}
    assert paths == {"export graph"}
    inputs = inputs()
    out_n, out_c = native(**inputs), gm(**inputs)
    key = "logits"
    assert torch.equal(out_n[key], out_c[key])
    gm.train()
    loss = gm(**inputs)[key].float().square().mean()
    loss.backward()
    assert weights_on_backprop(gm(**inputs)[key].sum(), gm) == []


def test_llama_generation_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    native = _llama().eval()
    gm = pfa_fx.convert(native, "kp")
    prompt = _ids(1, 5)
    kw = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(native.generate(prompt, **kw), gm.generate(prompt, **kw))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm.train()
    gm(_ids()).logits.square().mean().backward()
    opt.step()
    torch.save(gm.state_dict(), tmp_path / "ck.pt")
    assert not any(k.startswith("pfa_export") for k in gm.state_dict())  # capture constants are not state
    fresh = pfa_fx.convert(native, "kp")
    fresh.load_state_dict(torch.load(tmp_path / "ck.pt"))
    for k, v in gm.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(pfa_fx.ConversionError, match="another conversion"):
        pfa_fx.convert(native, "fa").load_state_dict(torch.load(tmp_path / "ck.pt"))


def test_torch_compile_of_a_converted_llama_trains_with_no_more_graph_breaks_than_native():
    torch.manual_seed(0)
    native = _llama().train()
    gm = pfa_fx.convert(native, "pfa", expansion=2).train()
    ids = _ids()
    counts = {}
    for name, model in (("native", native), ("converted", gm)):
        torch._dynamo.reset()
        counts[name] = torch._dynamo.explain(model)(ids).graph_break_count
    assert counts["converted"] <= counts["native"], counts
    # a compiled training step (AOT autograd, no code generation) computes what the eager one does
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager")
    grads = []
    for model in (gm, compiled):
        gm.zero_grad()
        model(ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None})
    torch._dynamo.reset()
    assert grads[0].keys() == grads[1].keys() and any(".R" in n or ".S" in n for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_moe_expert_banks_and_the_router_are_converted():
    cfg = transformers.MixtralConfig(num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2, **DECODER)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on BP: no warning
        gm = pfa_fx.convert(model, "fa", strict=True)
    ops = dict(pfa_fx.feedback_modules(gm))
    assert "model.layers.0.mlp.gate" in ops  # the router's bare weight
    bank = ops["model.layers.0.mlp.experts.gate_up_proj"]  # (4, 128, 32): 4 groups of (128, 32)
    assert bank.groups == 4 and bank.weight_shape == (4 * 128, 32) and "model.layers.0.mlp.experts.down_proj" in ops
    ids = _ids()
    assert torch.equal(model(ids).logits, gm(ids).logits)
    assert weights_on_backprop(gm(ids).logits.sum(), gm) == []  # the audit sees the grouped products too


def test_a_model_cast_after_conversion_runs_the_eager_route_with_a_warning(gpt2_pair):
    native, gm = gpt2_pair  # captured in float64
    cast, native32 = copy.deepcopy(gm).float(), copy.deepcopy(native).float()
    ids = _ids()
    with pytest.warns(UserWarning, match=r"converted on .*float64.*now lives on .*float32"):
        out = cast(ids).logits
    assert out.dtype == torch.float32 and torch.equal(out, native32(ids).logits)


def test_op_names_and_rule_mappings_use_module_paths(gpt2_pair):
    native, gm = gpt2_pair
    names = pfa_fx.op_names(native)
    assert names == list(dict(pfa_fx.feedback_modules(gm)))
    mapped = pfa_fx.convert(native, {"lm_head": None, "transformer.h.1.*": "kp", "*": "fa"}, strict=True)
    rules = {k: n.rule for k, n in pfa_fx.feedback_modules(mapped)}
    assert mapped.pfa_kept_native == ["lm_head"] and "lm_head" not in rules
    assert rules["transformer.h.1.mlp.c_fc"] == "kp" and rules["transformer.h.0.attn.c_attn"] == "fa"


def test_pal_learns_in_its_noisy_pass_when_the_hf_model_computes_its_own_loss():
    """``labels=`` routes the call through the eager front end; PAL's noisy pass runs under
    no_grad and must still reach the feedback ops (else PAL trains as plain FA)."""
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=32,
    )  # fmt: skip
    torch.manual_seed(0)
    gm = pfa_fx.convert(transformers.LlamaForCausalLM(cfg), "pal")
    nodes = dict(pfa_fx.feedback_modules(gm))
    before = {k: n.B.clone() for k, n in nodes.items()}
    opt = torch.optim.AdamW(pfa_fx.model_parameters(gm), lr=1e-3)
    ids = torch.randint(0, 32, (2, 8))
    gm.train()
    gm(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # PAL applies what its noisy pass learned
    assert all(not torch.equal(before[k], n.B) for k, n in nodes.items())
