"""The Hugging Face coverage sweep's models: one small, randomly initialised configuration per
(model type, head) — two layers, hidden size 32, vocabulary 256, images of 32 px — written by
hand (``SPECS``), plus every other causal-LM class of the installed transformers on a config
derived generically from its config class (``CAUSAL_LM_SPECS``, ``_hf_causal_lm.py``), and the
inputs each family is trained on (``build``). No weights are downloaded."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _hf_causal_lm import SKIPS, TEXT_IDS, causal_lm_classes, small_config
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._hf_causal_lm import SKIPS, TEXT_IDS, causal_lm_classes, small_config

BATCH, SEQ, DEC_SEQ, IMAGE = 2, 8, 6, 32
VOCAB = 256
#: special tokens inside the small vocabulary (the configs' defaults, e.g. GPT-2's 50256, are not)
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

#: head -> the transformers Auto class that builds it
HEADS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "image-cls": "AutoModelForImageClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "ctc": "AutoModelForCTC",
    "contrastive": "AutoModel",
}


@dataclass(frozen=True)
class Spec:
    """One row family of the sweep: ``name`` (unique), the config's ``model_type``, the
    head, and the config's keyword arguments (on top of the head's defaults)."""

    name: str
    model_type: str
    head: str
    config: dict[str, Any] = field(default_factory=dict)
    cls: str | None = None  # the transformers class, where the head's Auto class has several
    build: dict[str, Any] = field(default_factory=dict)  # keyword arguments of ``from_config``
    #: the config derived generically from the config class's defaults (``_hf_causal_lm``),
    #: ``config`` on top; the batch's token ids stay below the special tokens moved there
    generic: bool = False


def _bert(**kw: Any) -> dict[str, Any]:
    """BERT-style names: hidden size, layers, heads, FFN width, positions."""
    return {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        **TOKENS,
        **kw,
    }


def _llama(**kw: Any) -> dict[str, Any]:
    """Llama-style decoders: BERT names plus grouped-query attention and an explicit head size."""
    return _bert(num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, **kw)


def _gpt2(**kw: Any) -> dict[str, Any]:
    """GPT-2-style names (``n_embd``, ``n_layer``, ``n_head``)."""
    return {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, **TOKENS, **kw}


def _bart(**kw: Any) -> dict[str, Any]:
    """BART-style encoder-decoder names."""
    return {
        "vocab_size": VOCAB,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 64,
        "decoder_start_token_id": 0,
        **TOKENS,
        **kw,
    }


def _t5(**kw: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "decoder_start_token_id": 0,
        **TOKENS,
        **kw,
    }


def _vit(**kw: Any) -> dict[str, Any]:
    return {
        "image_size": IMAGE,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "num_labels": 10,
        **kw,
    }


def _cnn(**kw: Any) -> dict[str, Any]:
    """ConvNeXt/ResNet-style stages: two stages of one block each."""
    return {"hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 10, **kw}


def _audio(**kw: Any) -> dict[str, Any]:
    """wav2vec2-style: a two-layer convolutional feature encoder, then a BERT-style encoder."""
    return _bert(
        vocab_size=32,
        conv_dim=[16, 16],
        conv_stride=[5, 2],
        conv_kernel=[10, 3],
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        max_position_embeddings=None,
        **kw,
    )


_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_MOE = {"num_experts_per_tok": 2}

SPECS: list[Spec] = [
    # causal LMs
    Spec("gpt2", "gpt2", "causal-lm", _gpt2()),
    Spec("gpt_bigcode", "gpt_bigcode", "causal-lm", _gpt2(multi_query=True)),
    Spec("gptj", "gptj", "causal-lm", _gpt2(rotary_dim=4)),
    Spec("codegen", "codegen", "causal-lm", _gpt2(rotary_dim=4, n_ctx=64)),
    Spec("gpt_neox", "gpt_neox", "causal-lm", _bert(rotary_pct=0.5)),
    Spec("opt", "opt", "causal-lm", _bert(ffn_dim=64, word_embed_proj_dim=32)),
    Spec("bloom", "bloom", "causal-lm", {"vocab_size": VOCAB, "hidden_size": 32, "n_layer": 2, "n_head": 4, **TOKENS}),
    Spec("falcon", "falcon", "causal-lm", _bert(new_decoder_architecture=True, num_kv_heads=2)),
    Spec("llama", "llama", "causal-lm", _llama()),
    Spec("mistral", "mistral", "causal-lm", _llama(sliding_window=4)),
    Spec("mixtral", "mixtral", "causal-lm", _llama(num_local_experts=4, **_MOE)),
    # the experts as transformers' loop over experts (F.linear on gate_up_proj[expert]), not grouped_mm
    Spec(
        "mixtral-eager-experts",
        "mixtral",
        "causal-lm",
        _llama(num_local_experts=4, **_MOE),
        build={"experts_implementation": "eager"},
    ),
    Spec("qwen2", "qwen2", "causal-lm", _llama()),
    Spec(
        "qwen2_moe",
        "qwen2_moe",
        "causal-lm",
        _llama(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **_MOE),
    ),
    Spec("qwen3", "qwen3", "causal-lm", _llama()),
    Spec("gemma", "gemma", "causal-lm", _llama()),
    Spec("gemma2", "gemma2", "causal-lm", _llama(sliding_window=4)),
    Spec("phi", "phi", "causal-lm", _bert(partial_rotary_factor=0.5)),
    Spec("phi3", "phi3", "causal-lm", _llama()),
    Spec("stablelm", "stablelm", "causal-lm", _llama(partial_rotary_factor=0.5)),
    Spec("olmo", "olmo", "causal-lm", _llama()),
    Spec("starcoder2", "starcoder2", "causal-lm", _llama()),
    Spec("granite", "granite", "causal-lm", _llama()),
    # masked LMs and sequence classifiers (encoders)
    Spec("bert", "bert", "masked-lm", _bert()),
    Spec("bert-seqcls", "bert", "seq-cls", _bert(num_labels=3)),
    Spec("roberta", "roberta", "masked-lm", _bert(max_position_embeddings=80)),
    Spec("xlm-roberta", "xlm-roberta", "masked-lm", _bert(max_position_embeddings=80)),
    Spec("camembert", "camembert", "masked-lm", _bert(max_position_embeddings=80)),
    Spec("electra", "electra", "masked-lm", _bert(embedding_size=16)),
    Spec("albert", "albert", "masked-lm", _bert(embedding_size=16)),
    Spec("mpnet", "mpnet", "masked-lm", _bert(max_position_embeddings=80)),
    Spec("deberta", "deberta", "masked-lm", _bert(relative_attention=True, max_relative_positions=16)),
    Spec(
        "deberta-v2",
        "deberta-v2",
        "seq-cls",
        _bert(relative_attention=True, position_buckets=8, max_relative_positions=16, num_labels=3),
    ),
    Spec("distilbert", "distilbert", "seq-cls", _bert(dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3)),
    Spec("modernbert", "modernbert", "masked-lm", _bert(global_attn_every_n_layers=2, local_attention=4)),
    # image classifiers
    Spec("vit", "vit", "image-cls", _vit()),
    Spec("deit", "deit", "image-cls", _vit(), cls="DeiTForImageClassification"),
    Spec("beit", "beit", "image-cls", _vit(use_relative_position_bias=True)),
    Spec("dinov2", "dinov2", "image-cls", _vit()),
    Spec(
        "swin",
        "swin",
        "image-cls",
        {"image_size": IMAGE, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2]}
        | {"window_size": 4, "num_labels": 10},
    ),
    Spec("convnext", "convnext", "image-cls", _cnn(num_stages=2)),
    Spec("convnextv2", "convnextv2", "image-cls", _cnn(num_stages=2)),
    Spec("resnet", "resnet", "image-cls", _cnn(embedding_size=16, layer_type="basic")),
    Spec("regnet", "regnet", "image-cls", _cnn(embedding_size=16, groups_width=8)),
    Spec("poolformer", "poolformer", "image-cls", _cnn(hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1])),
    Spec(
        "mobilevit",
        "mobilevit",
        "image-cls",
        {"image_size": IMAGE, "hidden_sizes": [32, 32, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]}
        | {"num_attention_heads": 2, "num_labels": 10},
    ),
    # encoder-decoder seq2seq
    Spec("t5", "t5", "seq2seq", _t5()),
    Spec("mt5", "mt5", "seq2seq", _t5()),
    Spec("bart", "bart", "seq2seq", _bart()),
    Spec("mbart", "mbart", "seq2seq", _bart()),
    Spec("marian", "marian", "seq2seq", _bart()),
    Spec("pegasus", "pegasus", "seq2seq", _bart()),
    # audio
    Spec(
        "whisper",
        "whisper",
        "speech-seq2seq",
        _bart(num_mel_bins=16, max_source_positions=16, max_target_positions=32, decoder_start_token_id=1),
    ),
    Spec("wav2vec2", "wav2vec2", "ctc", _audio()),
    Spec("hubert", "hubert", "ctc", _audio()),
    # two towers
    Spec(
        "clip",
        "clip",
        "contrastive",
        {
            "text_config": {"vocab_size": VOCAB, "max_position_embeddings": 16, **_TOWER, **TOKENS},
            "vision_config": {"image_size": IMAGE, "patch_size": 8, **_TOWER},
            "projection_dim": 16,
        },
    ),
]


def _causal_lm_specs() -> list[Spec]:
    """One spec per causal-LM class of the installed transformers whose type has no
    hand-written causal-LM spec above: its config derived generically (``_hf_causal_lm``).
    Named after the type, ``<type>-clm`` where a spec of another head has that name."""
    hand = {s.model_type for s in SPECS if s.head == "causal-lm"}
    names = {s.name for s in SPECS}
    return [
        Spec(t if t not in names else f"{t}-clm", t, "causal-lm", cls=cls, generic=True)
        for t, cls in causal_lm_classes().items()
        if t not in hand
    ]


#: every causal-LM class of transformers not in ``SPECS``, configured generically
CAUSAL_LM_SPECS: list[Spec] = _causal_lm_specs()
ALL_SPECS: list[Spec] = SPECS + CAUSAL_LM_SPECS
SPEC_BY_NAME = {s.name: s for s in ALL_SPECS}
#: the models every rule runs on by default (the others get --rules' default)
SAMPLE = ("gpt2", "llama", "bert", "vit", "t5")
#: --quick: one model per head
QUICK = ("gpt2", "llama", "bert", "distilbert", "vit", "t5", "whisper", "wav2vec2", "clip")


def select(patterns: list[str] | None, quick: bool = False, every_causal_lm: bool = False) -> list[Spec]:
    """The specs whose name or model type matches one of the fnmatch ``patterns`` (all
    when none), restricted to ``QUICK`` with ``quick``; the hand-written ``SPECS``, and with
    ``every_causal_lm`` the generically configured ``CAUSAL_LM_SPECS`` too."""
    pool = ALL_SPECS if every_causal_lm and not quick else SPECS
    specs = [s for s in pool if not quick or s.name in QUICK]
    if not patterns:
        return specs
    return [s for s in specs if any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (s.name, s.model_type))]


class SkipModel(Exception):
    """A model the sweep does not run (``_hf_causal_lm.SKIPS``): the message says why."""


@dataclass
class BuiltHF:
    model: nn.Module
    inputs: dict[str, Tensor]  # the keyword tensors of a training batch (also the export's example inputs)
    targets: Tensor  # class indices for the task loss on the main output
    params: int
    build_s: float


def build(spec: Spec, seed: int = 0) -> BuiltHF:
    """The model of ``spec``, randomly initialised from ``seed`` (dropout as configured),
    in eval mode, with a seeded batch of its family's inputs."""
    import transformers

    t0 = time.perf_counter()
    if spec.generic:
        if spec.model_type in SKIPS:
            raise SkipModel(SKIPS[spec.model_type])
        config = small_config(spec.model_type, spec.config)
    else:
        config = transformers.AutoConfig.for_model(spec.model_type, **spec.config)
    torch.manual_seed(seed)
    if spec.cls and not spec.generic:
        model = getattr(transformers, spec.cls)._from_config(config, **spec.build).eval()
    else:
        model = getattr(transformers, HEADS[spec.head]).from_config(config, **spec.build).eval()
    inputs = make_inputs(spec, config, seed)
    with torch.no_grad():
        out = model(**inputs, **call_options(model))
    main = main_output(out)
    g = torch.Generator().manual_seed(seed + 7)
    if spec.head == "contrastive":  # image i goes with text i
        targets = torch.arange(main.shape[0])
    else:
        targets = torch.randint(0, main.shape[-1], main.shape[:-1], generator=g)
    params = sum(p.numel() for p in model.parameters())
    return BuiltHF(model, inputs, targets, params, time.perf_counter() - t0)


def make_inputs(spec: Spec, config: Any, seed: int = 0) -> dict[str, Tensor]:
    """A batch of ``spec``'s family: token ids with a padded row, pixels, log-mel features
    or raw audio; decoder ids for encoder-decoders."""
    g = torch.Generator().manual_seed(seed + 1)
    text = {
        "input_ids": torch.randint(3, TEXT_IDS if spec.generic else VOCAB, (BATCH, SEQ), generator=g),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }
    # row 1 is right-padded by two tokens, as in a padded training batch
    text["attention_mask"][1, -2:] = 0
    decoder = {"decoder_input_ids": torch.randint(3, VOCAB, (BATCH, DEC_SEQ), generator=g)}
    pixels = {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)}
    if spec.head in ("causal-lm", "masked-lm", "seq-cls"):
        return text
    if spec.head == "seq2seq":
        return {**text, **decoder}
    if spec.head == "image-cls":
        return pixels
    if spec.head == "contrastive":
        return {**text, **pixels}
    if spec.head == "speech-seq2seq":
        frames = 2 * config.max_source_positions
        return {"input_features": torch.randn(BATCH, config.num_mel_bins, frames, generator=g), **decoder}
    if spec.head == "ctc":
        return {"input_values": torch.randn(BATCH, 400, generator=g)}
    raise ValueError(f"no inputs for head {spec.head!r}")


def call_options(model: nn.Module) -> dict[str, Any]:
    """Keyword options of a training forward: no KV cache (what the export captures)."""
    import inspect

    return {"use_cache": False} if "use_cache" in inspect.signature(type(model).forward).parameters else {}


def main_output(out: Any) -> Tensor:
    """The tensor the task loss is computed on: ``logits``, CLIP's ``logits_per_image``."""
    for key in ("logits", "logits_per_image"):
        t = out.get(key) if hasattr(out, "get") else None
        if isinstance(t, Tensor):
            return t
    raise ValueError(f"no logits in the output ({type(out).__name__})")


def task_loss(out: Any, targets: Tensor) -> Tensor:
    """Cross-entropy of the main output against ``targets`` (next-token, masked-token,
    class, frame or image-text targets: every head's loss is one of these)."""
    main = main_output(out)
    return nn.functional.cross_entropy(main.float().reshape(-1, main.shape[-1]), targets.reshape(-1))
