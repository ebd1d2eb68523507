"""Diagnoses of the Hugging Face coverage sweep's failures, written by hand after reading each
one down to the pfa_fx function at fault (or to transformers / torch.export where the cause is
there). ``COVERAGE_HF.md`` prints a diagnosis under a model's failure only while the model fails
that way: a diagnosis names its models and pieces of the failing row's reason it explains, so a
changed failure is not given a stale diagnosis."""

from __future__ import annotations

import re
from dataclasses import dataclass

_MOE_GROUPED = """\
**Diagnosis — pfa_fx gap: expert banks multiplied by transformers' grouped matmul are not
converted.** transformers 5 holds the experts of a `@use_experts_implementation` block as 3-D
parameters `gate_up_proj (E, 2·I, H)` and `down_proj (E, H, I)` and by default
(`experts_implementation="grouped_mm"`) multiplies the tokens, sorted by expert, with
`_grouped_mm`; under torch.export in float32 that is the custom op
`torch.ops.transformers.grouped_mm_fallback`. pfa_fx has no feedback-aware form of it, so the
banks stay on BP: `convert` warns ("an operand of grouped_mm_fallback.default … the pass cannot
route"), the audit names them, `report()` calls them "not consumed by a linear or convolution op".
(At pfa_fx `3da71e5` neither the warning nor `weights_on_backprop` saw them — the audit's
`STANDARD_WEIGHT_OPS` did not know `GeneratedBackwardFor_transformers_grouped_mm_fallback_defaultBackward`,
only this sweep's own `unlisted_on_bp` check did; `85a791c` added grouped products to both.) The
router (`F.linear` on the bare `gate.weight`), attention and shared experts convert. Suggested
fix: a feedback-aware grouped matmul — per-expert feedback matrices, block-diagonal over experts
like `ops._FeedbackExpertMix` for timm's CondConv2d — matched in `rewrite.py` on
`aten._grouped_mm` / `F.grouped_mm` / `torch.ops.transformers.grouped_mm_fallback` with a 3-D
parameter operand (and on `F.linear(x, P[i])` / `torch.bmm(P[ids], x)` for the `eager` and
`batched_mm` implementations)."""

_MOE_EAGER = """\
**Diagnosis — pfa_fx gap: expert banks used as `F.linear(x, P[expert])` under the eager
fallback.** With `experts_implementation="eager"` transformers loops over the experts the batch
hits (`nonzero()`, then `F.linear(x, self.gate_up_proj[expert_idx])`). torch.export cannot
capture the data-dependent loop (`GuardOnDataDependentSymNode`) and torch.fx cannot trace the
root, so the whole forward runs under eager interception. It routes the weights of Linear/Conv
modules and, since `85a791c`, matrix parameters a probe forward finds used directly (the router's
bare `gate.weight` converts), but not a slice of a 3-D parameter: the two banks of each layer stay
on BP (the audit names them). Suggested fix: route `F.linear` whose weight is `P[i]` of a 3-D
parameter `P` (`capture/intercept.py`, `weights.py::hidden_weights`) to one feedback matrix per
expert, stored as a bank like the CondConv2d case."""

_BEIT = """\
**Diagnosis — not pfa_fx's rewrite: torch.export takes another branch of transformers' mask
code, and BEiT adds a boolean mask to a float bias.** Eval-mode logits differ by 7.45e-09
(train mode is identical). Exporting the *native* model with torch.export gives the same
difference, so pfa_fx's feedback ops are not the cause; its export front end inherits it. In the
exported graph `create_bidirectional_mask` (transformers' masking utils) materialises the
all-true padding mask (a traced call cannot skip it the way eager does), and `BeitLayer` forms
`relative_position_bias + attention_mask`: float bias + bool mask = bias + 1.0 everywhere.
Softmax absorbs the constant, so q, k and v are bit-equal and only the attention output differs
by float rounding. Suggested fix on the pfa_fx side: have the export front end compare the
captured graph's forward with the eager forward on the example inputs (both modes) and warn, or
fall back, when they are not bit-identical — the promise is a bit-identical forward; the BEiT
bool-plus-float mask is a transformers bug to report upstream."""

_FA_OVERFLOW = """\
**Diagnosis — not a conversion bug: FA's default feedback scale against transformers' small
init.** Converted through torch.export, MobileViT's forward is identical and BP's gradients equal
the native ones, but FA's overflow: the largest conv-weight gradient, every third conv from the
classifier towards the input, is 1e-2, 6e10, 2e13, 3e14, 6e31, 4e33, then nan (the loss is
finite). transformers initialises at `initializer_range=0.02` (the 35 conv weights' median std:
0.020), far below the Xavier scale FA draws its feedback at (`report()` notes the gap), and
between 32 BatchNorm layers each feedback matrix multiplies the error by its own, much larger,
scale. `scale="weight"` (feedback at each W's own RMS) passes, with gradients of BP's size
(1e-6 – 1e-3). Suggested: `convert` could warn, not only note in `report()`, when weights sit far
below the feedback's scale in a deep stack."""


@dataclass(frozen=True)
class Diagnosis:
    """A failure explained: the models it concerns (none: any model whose failure matches),
    substrings of the failing row's reason (one must occur; with ``pattern``, a regular
    expression on the row's status, reason, where, conversion warning and parameters left on
    BP instead), a short cause and where it is fixed (the summary's table), and the full text
    (empty: the cause and place say it all)."""

    models: tuple[str, ...]
    match: tuple[str, ...]
    cause: str
    fix_at: str
    text: str
    pattern: str = ""


DIAGNOSES: list[Diagnosis] = [
    Diagnosis(
        ("mixtral", "qwen2_moe"),
        ("experts",),
        "MoE expert banks (3-D) through transformers' `grouped_mm` custom op: not converted",
        "pfa_fx gap: `rewrite.py` (no feedback-aware grouped matmul)",
        _MOE_GROUPED,
    ),
    Diagnosis(
        ("mixtral-eager-experts",),
        ("experts",),
        "`F.linear(x, gate_up_proj[e])` on a slice of a 3-D bank under the eager fallback: not routed",
        "pfa_fx gap: `capture/intercept.py`, `weights.py::hidden_weights`",
        _MOE_EAGER,
    ),
    Diagnosis(
        ("beit",),
        ("forward changed",),
        "the exported graph takes transformers' traced mask branch: a bool mask added to a float bias (7e-9)",
        "torch.export / transformers; pfa_fx could verify the captured graph",
        _BEIT,
    ),
    Diagnosis(
        ("mobilevit",),
        ("non-finite",),
        "FA at Xavier scale vs transformers' 0.02 init: the error overflows across 32 BatchNorm layers",
        'not a bug: `scale="weight"` passes',
        _FA_OVERFLOW,
    ),
]


_EXPERT_BANK = """\
**Diagnosis — pfa_fx gap, known and being fixed: expert banks multiplied by `bmm` / a per-expert
slice, not by a routed op.** The experts (or shared experts) of these MoE blocks are one parameter
per projection holding every expert: 3-D `(E, out, in)` multiplied with `torch.bmm` after a
gather (Llama 4's `Llama4TextExperts`, Inkling's shared experts: `torch.bmm(x,
self.gate_proj.transpose(1, 2))`), or a 2-D `(E·F, H)` parameter viewed per expert and sliced
(`self.mlp.w1.view(E, F, H)[expert_idx]`, then `x.matmul(w1.T)`, DBRX — whose data-dependent
expert loop also defeats torch.export, so it runs on the eager front end). `convert` warns ("an
operand of bmm.default … the pass cannot route") and the audit names the banks. Types whose banks
go through transformers' `@use_experts_implementation` `grouped_mm` (qwen3_moe, mixtral at this
revision, …) now pass: only the `bmm`/slice forms remain. Suggested fix: the grouped feedback
op (per-expert feedback matrices) matched on `aten.bmm` with a 3-D parameter operand (after a
transpose/index) in `rewrite.py`, and on `P.view(E, …)[i]` slices in `capture/intercept.py` /
`weights.py::hidden_weights`."""

_EXPORT_ROUNDING = """\
**Diagnosis — not pfa_fx's rewrite: torch.export of the *native* model already differs from
eager.** These hybrid models' linear-attention layers (gated DeltaNet: the torch fallback of the
chunked delta rule and the causal depthwise convolution, no CUDA kernels on CPU) give logits
that differ by one or two float32 ulps (6e-8 – 1.2e-7) between the eager forward and the graph
torch.export captures of the unconverted model (`torch.export.export(model,
kwargs=batch).module()(**batch)` vs `model(**batch)`, the same difference: checked on lara_mini,
qwen3_5_text and olmo_hybrid under `torch.no_grad()`, and on qwen3_next with autograd enabled as
the sweep's forwards run — under `no_grad` its export is exact — with static and with `Dim.AUTO`
shapes; BP's converted forward differs by the same amount), so pfa_fx's export front end
inherits it; the feedback ops are not involved. (At `16bb55c` qwen3_5_moe, qwen3_5_moe_text and
qwen3_next ran on the eager front end and passed; since their MoE blocks export, they inherit
this.) As
for BEiT: pfa_fx's export front end could compare the captured graph's forward with the eager
one on the example inputs and warn or fall back (`capture/export.py`) — its promise is a
bit-identical forward."""

_FX_NONE = """\
**Diagnosis — pfa_fx bug: the fx fallback freezes a None-default input that the example inputs
give.** torch.export cannot capture `ReformerModelWithLMHead` (its axial position embeddings
check `position_ids.max().item()`: a guard on a data-dependent value), so `convert` falls back to
torch.fx, and `capture/fx_trace.py::_constant_defaults` passes every argument whose default is
None as a concrete arg — `input_ids` among them. Tracing the inner `ReformerModel` with
`input_ids=None` raises ("You have to specify either input_ids or inputs_embeds"), the fallback
makes it an opaque module (front end "1 graph; 11 opaque module"), and the converted root's
forward keeps the constant: called with the batch it raises `input_ids has been specialized to
have value None but got another value` (the eval-mode forward; no row gets further). This is the
failure this sweep found at `3da71e5` for mpnet/deberta/resnet (fixed then by trying torch.export
first): where export fails it is still there. Suggested fix: in `_constant_defaults`, do not
make constant an argument that `example_inputs` supplies (or any tensor-named one), and have
`convert` run the converted forward on `example_inputs` and refuse or fall back to the eager
front end when it raises."""

_CACHE_DROPPED = """\
**Diagnosis — pfa_fx regression at `be7df44`: the converted Granite-MoE models return no cache
where the native ones do.** Their `forward(input_ids, attention_mask, **kwargs)` has no
`use_cache` parameter, so the sweep calls both models without it and the config's
`use_cache=True` applies: the native output is `(logits, cache)`. Before `be7df44` torch.export
could not capture them (a `DynamicCache` in the output) and they converted on the eager front end
with a bit-identical forward (pass at `16bb55c`). `be7df44` makes `_forced_kwargs` capture them
with `use_cache=False`; `_captured_call` then treats the call that omits `use_cache` as matching
the forced value and runs the graph, whose output has no cache — the output structure changes
(logits equal). Suggested fix: in `_captured_call`, an omitted forced argument whose effective
default differs (the config's `use_cache=True`) should not match — run the intercepted class
forward, as a call with `use_cache=True` does — or the converted output should carry the cache."""

#: causes matched on any model's failing row (after the model-specific diagnoses above)
GENERIC: list[Diagnosis] = [
    Diagnosis(
        (),
        (),
        "expert bank left on BP (grouped op pending): `bmm` on a 3-D bank or `W.view(E, …)[e]` slices",
        "pfa_fx gap (being fixed): `rewrite.py` (bmm on a 3-D parameter), `capture/intercept.py` + "
        "`weights.py::hidden_weights` (sliced banks under the eager fallback)",
        _EXPERT_BANK,
        pattern=r"left_on_bp.*experts?\.",
    ),
    Diagnosis(
        (),
        (),
        "grouped projection: a 2-D weight viewed per group `(o_groups, out, in)` and multiplied with `bmm` "
        "(DeepSeek-V4's `DeepseekV4GroupedLinear`, `o_a_proj`) left on BP (grouped op pending)",
        "pfa_fx gap: `rewrite.py` (bmm whose operand is a view of a parameter; the same grouped op as the "
        "expert banks)",
        "",
        pattern=r"left_on_bp.*an operand of bmm\.default",
    ),
    Diagnosis(
        (),
        (),
        "block-diagonal gate weights `(heads, block, block)` through `baddbmm` (Griffin's RG-LRU) left on BP",
        "pfa_fx gap: `rewrite.py` (baddbmm with a 3-D parameter operand; the grouped op again)",
        "",
        pattern=r"left_on_bp.*an operand of baddbmm\.default",
    ),
    Diagnosis(
        (),
        (),
        "3-D weights `(d_model, heads, head_dim)` through `einsum` (XLNet's q, k, v, o) left on BP",
        "pfa_fx gap: `rewrite.py` (einsum whose parameter operand has more than two dimensions)",
        "",
        pattern=r"left_on_bp.*an operand of einsum\.default",
    ),
    Diagnosis(
        (),
        (),
        "a bare parameter used as an attention query (`query.view(…) @ keys`): a `matmul` operand left on BP",
        "pfa_fx gap: `rewrite.py` (a parameter as the left operand of `matmul`, not a linear weight)",
        "",
        pattern=r"left_on_bp.*\.query\b.*an operand of matmul\.default",
    ),
    Diagnosis(
        (),
        (),
        "per-head 3-D projections (`x_proj_weight`, `dt_proj_weight` of Zamba's Mamba) through batched "
        "`matmul` left on BP",
        "pfa_fx gap: `rewrite.py` (matmul with a 3-D parameter operand: one matrix per head)",
        "",
        pattern=r"left_on_bp.*an operand of matmul\.default",
    ),
    Diagnosis(
        (),
        (),
        "after torch.export failed, the torch.fx fallback traced `input_ids` (default None) as the constant "
        "None: the converted model refuses the real ids",
        "pfa_fx bug: `capture/fx_trace.py::_constant_defaults` (and `convert` accepting a trace that cannot "
        "take `example_inputs`)",
        _FX_NONE,
        pattern=r"check_error.*specialized to have value None",
    ),
    Diagnosis(
        (),
        (),
        "the converted forward drops the KV cache the native forward returns: a call without `use_cache` runs "
        "the graph captured with the forced `use_cache=False`, though the config's `use_cache=True` applies",
        "pfa_fx regression (`be7df44`): `capture/export.py::_captured_call` (an absent forced argument is "
        "taken as the forced value; `_forced_kwargs` forces it for `**kwargs` forwards)",
        _CACHE_DROPPED,
        pattern=r"forward_changed.*output structure.*'cache'",
    ),
    Diagnosis(
        (),
        (),
        "torch.export of the native model already differs from eager by float rounding (≤ 1.2e-7)",
        "torch.export; pfa_fx could verify the captured graph (`capture/export.py`)",
        _EXPORT_ROUNDING,
        pattern=r"forward_changed.*max abs diff [0-9.]+e-0[78]",
    ),
]


def diagnose(model: str, reason: str) -> Diagnosis | None:
    """The diagnosis of ``model`` failing with ``reason`` (for ``GENERIC``, everything the row
    says), if one explains it."""
    for d in DIAGNOSES:
        if model in d.models and any(m in reason for m in d.match):
            return d
    for d in GENERIC:
        if re.search(d.pattern, reason, re.S):
            return d
    return None


#: findings on models that pass, and the history of the failures this sweep found
NOTES = """\
- **Every causal-LM class, and which pfa_fx it ran against.** The 201 causal-LM models (22 hand
  types, mixtral-eager-experts, 178 generic) ran FA and BP at `4e0a16e` (its `pfa_fx/` is
  `1b6a91e`'s; 39.5 min wall-clock, one worker, one torch thread, 2 cores shared with other
  jobs); the other heads' rows and the sample's seven other rules are from `374ae8f`. A first FA-only pass over the 178 generic types
  at `16bb55c+dirty` (23.2 min) is superseded in the CSV by the later rows.
- **Expert banks through transformers' `grouped_mm` now convert**: mixtral, qwen2_moe (under the
  grouped-matmul diagnosis above while they failed at `374ae8f`), mixtral-eager-experts and the
  other `@use_experts_implementation` types (qwen3_moe, olmoe, deepseek_v3, …) are clean at
  `4e0a16e`. `tests/test_hf_coverage_subset.py::test_mixtral_expert_banks_are_converted` is a
  strict xfail, so it now fails as XPASS until its marker goes.
- **recurrent_gemma's BP row is a `conversion_error`** ("Only Tensors created explicitly by the
  user … support the deepcopy protocol"): converted alone under BP it is `left_on_bp` like FA
  (the `baddbmm` gates). RecurrentGemma's RG-LRU keeps `recurrent_states`, a non-leaf tensor of
  the last forward with autograd, as a module attribute; the sweep's FA check ran the native model
  in train mode first, and `pfa_fx/convert.py::_build`'s `copy.deepcopy(model)` refuses it. Any
  user converting a RecurrentGemma that has already run a training forward hits it. Suggested:
  deep-copy with non-leaf tensor attributes detached (a `memo` pre-filled with `t.detach()`), or
  say so in the error.
- **gemma3n keeps a full-size vision tower** (299 M parameters): its `vision_config` is a timm
  wrapper (`mobilenetv5_300m_enc`) that the generic shrink has no size attributes for; it is clean
  on the eager front end (359 ops, the tower's included) in 13 s.
- **Swin converts in minutes, not seconds** (its convert time above).
  `pfa_fx/capture/export.py::export_modes` exports with `Dim.AUTO` on every dimension of every
  input; Swin's window partition and padding then take torch.export's symbolic-shape reasoning
  195 s per mode for a 20 k-parameter model, against 1.0 s with static shapes (the native model in
  train mode, one thread). Suggested: export with static shapes first (or only batch and sequence
  dynamic) and re-capture for a new shape, or make dynamic shapes an option.
- **wav2vec2 and HuBERT** keep their default configs (`layerdrop=0.1`, `mask_time_prob=0.05`):
  their train-mode forward is data-dependent (LayerDrop, numpy SpecAugment masks), torch.export
  cannot capture it, and they run on the eager front end (setting both to 0 would let torch.export
  capture them and leave that front end untested). Their weight-normed positional convolution is
  routed through its original tensors since `63e9e7e`; at `3da71e5` every forward failed
  (`AttributeError: 'weight' is not an nn.Parameter` from `capture/eager.py::_eager_forward`).
- **Failures this sweep found at pfa_fx `3da71e5` that are fixed now** (42 of 56 clean under FA
  then): mpnet, deberta, deberta-v2, resnet, regnet, poolformer and mobilevit converted through
  torch.fx with every `None`-default input traced as `None` (`capture/fx_trace.py::_constant_defaults`;
  the opaque-leaf fallback accepted the broken trace, and the converted model could not be called) —
  `63e9e7e` tries torch.export first where example inputs exist; falcon's `input @ self.weight.T`
  (`aten.numpy_T` in an exported graph) was not a weight op and went unwarned — `63e9e7e` added
  `numpy_T` (`.mT`, exported as `aten.mT`, is still not recognised: a module computing
  `x @ self.weight.mT` stays on BP without a warning); wav2vec2 and HuBERT, above.
"""
