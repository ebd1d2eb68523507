"""Every causal-LM class of the installed transformers, each with a small config derived
GENERICALLY from its config class: the class's defaults, then every attribute of a known name
shrunk (layers → 2, hidden size → 32, heads → 4, key/value heads → 2, head size → 8, FFN → 64,
vocabulary → 256, experts → 4 of which ≤ 2 per token, windows → 4, …), per-layer lists
(``layer_types``, ``mlp_layer_types``, …) cut to the layers kept — one layer of each kind the
full model has, 2 to 4 layers in all — and sub-configs (``text_config``, ``vision_config``)
shrunk the same way. ``OVERRIDES`` holds the few per-type corrections where that shrink alone
does not give a model that builds and runs on a text batch, each with its reason (``WHY``);
``SKIPS`` the types that cannot run on a text batch at all. No weights are downloaded."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

#: the special tokens every small config uses (as the hand-written configs do)
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
VOCAB = 256
#: other special token ids (image, audio, separator tokens beyond the small vocabulary) are
#: moved to the top of it; the batch's ids stay below ``TEXT_IDS`` so none of them occurs
TEXT_IDS = 224

LAYERS = {
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "num_decoder_layers",
    "decoder_layers",
    "encoder_layers",
    "depth",
    "conf_num_hidden_layers",
    "num_blocks",
}
HIDDEN = {"hidden_size", "n_embd", "d_model", "hidden_size_global", "dim", "embed_dim", "input_size"}
HEADS = {
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "attention_heads",
    "decoder_attention_heads",
    "encoder_attention_heads",
    "swa_num_attention_heads",
    "conf_num_attention_heads",
    "linear_num_value_heads",
    "linear_num_heads",
    "index_n_heads",
    "indexer_n_heads",
    "heads_per_ngram",
}
KV_HEADS = {
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "kv_n_heads",
    "swa_num_key_value_heads",
    "linear_num_key_heads",
    "multi_query_group_num",
    "indexer_kv_heads",
}
HEAD_DIM = {
    "head_dim",
    "kv_channels",
    "dim_head",
    "d_kv",
    "swa_head_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_head_dim",
    "index_head_dim",
    "indexer_head_dim",
    "attention_head_dim",
    "mamba_d_head",
    "mamba_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "attention_head_size",
}
FFN = {
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "decoder_ffn_dim",
    "encoder_ffn_dim",
    "d_ff",
    "dff",
    "dim_ff",
    "ffn_hidden_size",
    "intermediate_size_mlp",
    "mlp_dim",
    "shared_intermediate_size",
    "first_dense_intermediate_size",
    "prefix_dense_intermediate_size",
    "mamba_d_ssm",
    "attention_hidden_size",
    "feed_forward_size",
}
MOE_FFN = {
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "shared_experts_intermediate_size",
    "expert_intermediate_size",
    "moe_ffn_hidden_size",
}
EXPERTS = {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"}
TOP_K = {
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_top_k",
    "moe_k",
    "top_k_experts",
    "num_selected_experts",
}
SHARED_EXPERTS = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
#: ranks and widths of low-rank and state-space parts: (names, size)
SMALL = [
    ({"q_lora_rank", "kv_lora_rank", "o_lora_rank", "laurel_rank", "hc_lowrank", "gated_norm_rank"}, 16),
    ({"qk_rope_head_dim", "rotary_dim"}, 4),
    ({"qk_head_dim"}, 12),  # qk_nope_head_dim + qk_rope_head_dim
    ({"state_size", "ssm_state_size", "d_state", "mamba_d_state", "time_step_rank", "mamba_dt_rank"}, 8),
    ({"mamba_n_heads", "n_mamba_heads"}, 4),
    ({"n_groups", "mamba_n_groups", "n_group", "num_expert_group", "topk_group", "o_groups"}, 1),
    ({"hidden_size_per_layer_input", "ple_embed_dim", "embedding_size"}, 16),
    ({"vocab_size_per_layer_input", "ngram_vocab_size_base", "encoder_hash_byte_group_vocab"}, VOCAB),
    ({"chunk_size", "mamba_chunk_size"}, 4),
    ({"index_topk", "indexer_budget"}, 4),
    ({"num_centroids"}, 8),
]
POSITIONS = {
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "original_max_position_embeddings",
    "rel_extent",
    "log_scaling_n_floor",
}
WINDOWS = {
    "sliding_window",
    "sliding_window_size",
    "attention_window",
    "local_attention_window_len",
    "attention_chunk_size",
    "keep_window_size",
}
#: "one layer in every N" style settings: at most 2 so that both kinds occur in the small model
_PERIOD = re.compile(r"(period|interval|every_n|_pattern|sparse_step|_step)$")
_OFFSET = re.compile(
    r"((?<!vocab_)offset|first_k_dense_replace|num_dense_layers|num_dense_blocks|moe_layer_start_index)$"
)
_TOKEN = re.compile(r"_token_(id|index)$")
#: at most this many layers when the full model has several kinds of layers
MAX_LAYERS = 4


def _set_small(key: str, value: Any, target: int, out: dict[str, Any]) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > target:
        out[key] = target


def _layer_count(d: Mapping[str, Any]) -> int | None:
    for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _per_layer(d: Mapping[str, Any], n: int) -> dict[str, list[Any]]:
    """The list attributes with one entry per layer (few distinct values: kinds of layers)."""
    return {
        k: v
        for k, v in d.items()
        if isinstance(v, list) and len(v) == n and n > 1 and len({repr(x) for x in v}) <= MAX_LAYERS
    }


def _index_lists(d: Mapping[str, Any], n: int, per_layer: Mapping[str, Any]) -> dict[str, list[int]]:
    """List attributes of layer indices (``mlp_only_layers``, ``moe_layers``, …)."""
    return {
        k: v
        for k, v in d.items()
        if k not in per_layer
        and isinstance(v, list)
        and v
        and "layer" in k
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in v)
    }


def _per_layer_dicts(d: Mapping[str, Any], n: int) -> dict[str, dict[str, Any]]:
    """Dict attributes keyed by layer index (``per_layer_config``: {"05": {"head_dim": 512}})."""
    return {
        k: v
        for k, v in d.items()
        if isinstance(v, dict) and v and "layer" in k and all(str(i).isdigit() and int(i) < n for i in v)
    }


def _kept_layers(d: Mapping[str, Any], n: int) -> list[int]:
    """The layers the small model keeps: the first layer of every kind a per-layer list or an
    index list names (2 to ``MAX_LAYERS`` layers)."""
    per_layer = _per_layer(d, n)
    keep: set[int] = set()
    for v in per_layer.values():
        seen: set[str] = set()
        for i, x in enumerate(v):
            if repr(x) not in seen:
                seen.add(repr(x))
                keep.add(i)
    for v in [*_index_lists(d, n, per_layer).values(), *([int(i) for i in v] for v in _per_layer_dicts(d, n).values())]:
        keep.add(v[0])
        outside = [i for i in range(n) if i not in v]
        if outside:
            keep.add(outside[0])
    kept = sorted(keep)[:MAX_LAYERS]
    for i in range(n):
        if len(kept) >= 2:
            break
        if i not in kept:
            kept.append(i)
    return sorted(kept)


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` split in proportion to ``parts`` (each ≥ 1): M-RoPE sections for a smaller head."""
    raw = [total * p / sum(parts) for p in parts]
    out = [max(1, int(r)) for r in raw]
    i = 0
    while sum(out) < total:
        out[i % len(out)] += 1
        i += 1
    while sum(out) > total:
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def _rope(rope: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """RoPE parameters for the small head: per-frequency lists and M-RoPE sections resized,
    the original context within the small one."""
    out = dict(rope)
    if all(isinstance(v, dict) for v in rope.values()) and rope:  # one set per layer type
        return {k: _rope(v, head_dim) for k, v in rope.items()}
    partial = rope.get("partial_rotary_factor") or 1.0
    half = max(1, int(head_dim * partial) // 2)
    for k in ("short_factor", "long_factor"):
        if isinstance(rope.get(k), list):
            out[k] = rope[k][:half] + [rope[k][-1]] * max(0, half - len(rope[k]))
    for k in ("mrope_section", "mrope_sections"):
        if isinstance(rope.get(k), list) and rope[k]:
            out[k] = _split(half, rope[k])
    if isinstance(rope.get("original_max_position_embeddings"), int):
        out["original_max_position_embeddings"] = min(rope["original_max_position_embeddings"], 64)
    return out


def _hidden_sizes(d: Mapping[str, Any]) -> set[int]:
    """The hidden sizes of ``d`` and its sub-configs (adapters and projections are sized by them)."""
    found = {v for k, v in d.items() if k in HIDDEN and isinstance(v, int) and v > 64}
    for k, v in d.items():
        if isinstance(v, dict) and k.endswith("_config"):
            found |= _hidden_sizes(v)
    return found


QUERY_HEADS = {"num_attention_heads", "n_head", "n_heads", "num_heads"}

#: sizes given before the key/value heads (which depend on the query heads) and after them,
#: in this order of precedence, then the more specific names of SMALL
LEADING = [(LAYERS, 2), (HIDDEN, 32), (HEADS, 4)]
TRAILING = [
    (HEAD_DIM, 8),
    (FFN, 64),
    (MOE_FFN, 32),
    (EXPERTS, 4),
    (TOP_K, 2),
    (SHARED_EXPERTS, 1),
    (POSITIONS, 64),
    (WINDOWS, 4),
]


def _size_of(key: str, table: list[tuple[set[str], int]]) -> int | None:
    """The small size of the first group of ``table`` that names ``key``, else None."""
    return next((size for names, size in table if key in names), None)


def shrink(
    d: Mapping[str, Any], top: bool = True, layer_lists: bool = True, hidden: set[int] | None = None
) -> dict[str, Any]:
    """The changed attributes of config dict ``d`` (a config's ``to_dict()``), shrunk, sub-config
    dicts likewise (the attributes they change, and their ``model_type``): what the config
    class's constructor takes on top of its defaults, so that what ``__post_init__`` derives from
    them (head size, layer types) is derived anew. With ``layer_lists`` the per-layer lists are
    cut to the layers kept; without, they are left for ``__post_init__`` to derive."""
    out: dict[str, Any] = {}
    hidden = _hidden_sizes(d) if hidden is None else hidden
    # the query heads: the standard names first, then the others in a fixed order (a set's order
    # changes with the hash seed, and a config may name other heads too, e.g. an indexer's)
    heads0 = next(
        (d[k] for k in sorted(HEADS, key=lambda k: (k not in QUERY_HEADS, k)) if isinstance(d.get(k), int)), None
    )
    for key, value in d.items():
        if isinstance(value, dict) and key.endswith("_config"):
            sub = shrink(value, top=False, layer_lists=layer_lists, hidden=hidden)
            if sub:
                out[key] = {**({"model_type": value["model_type"]} if value.get("model_type") else {}), **sub}
            continue
        leading = _size_of(key, LEADING)
        if leading is not None:
            _set_small(key, value, leading, out)
        elif key in KV_HEADS:
            if value is None and heads0 is not None and key == "num_key_value_heads":
                out[key] = 4  # a None the modeling code divides by: as many as the query heads
            elif isinstance(value, int) and heads0 is not None and value < heads0:
                _set_small(key, value, 2, out)
            else:
                _set_small(key, value, 4, out)
        elif _size_of(key, TRAILING) is not None:
            _set_small(key, value, _size_of(key, TRAILING), out)
        elif key == "vocab_size" or (key.endswith("_vocab_size") and "type" not in key):
            _set_small(key, value, VOCAB, out)
        elif _PERIOD.search(key):
            _set_small(key, value, 2, out)
        elif _OFFSET.search(key):
            _set_small(key, value, 1, out)
        elif key.endswith("_layers") and key not in ("mlp_only_layers",):
            n0 = _layer_count(d)
            if value != n0:  # e.g. layers that share another's KV cache: all of them stays all of them
                _set_small(key, value, 1, out)
        elif _size_of(key, SMALL) is not None:
            _set_small(key, value, _size_of(key, SMALL), out)
    for key, value in d.items():  # sized as some hidden size (an adapter's input, a projection's output)
        if key not in out and isinstance(value, int) and value in hidden and ("dim" in key or "size" in key):
            out[key] = 32
    # special tokens: pad/bos/eos as the hand configs; the others at the top of the vocabulary
    spare = iter(range(VOCAB - 1, TEXT_IDS - 1, -1))
    for key, value in d.items():
        if key in TOKENS and (value is not None or key != "pad_token_id"):
            out[key] = TOKENS[key] if not isinstance(value, list) else [TOKENS[key]]
        elif _TOKEN.search(key) or key in ("eod_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            if isinstance(value, int) and not isinstance(value, bool) and value >= TEXT_IDS:
                out[key] = next(spare)
            elif isinstance(value, list) and any(isinstance(v, int) and v >= TEXT_IDS for v in value):
                out[key] = [next(spare)]
    n = _layer_count(d)
    if n is not None and n > 2 and layer_lists:
        kept = _kept_layers(d, n)
        for k in (k for k in LAYERS if k in out or (k in d and isinstance(d[k], int) and d[k] == n)):
            out[k] = len(kept)
        per_layer = _per_layer(d, n)
        for k, v in per_layer.items():
            out[k] = [v[i] for i in kept]
        for k, v in _index_lists(d, n, per_layer).items():
            out[k] = [kept.index(i) for i in v if i in kept]
        for k, v in _per_layer_dicts(d, n).items():
            out[k] = {kept.index(int(i)): {**w, **shrink(w, top=False)} for i, w in v.items() if int(i) in kept}
    elif n is not None and n > 2:  # the lists derived anew from the small layer count
        for k in set(_per_layer(d, n)) | set(_index_lists(d, n, _per_layer(d, n))) | set(_per_layer_dicts(d, n)):
            out[k] = None
    hidden = out.get("hidden_size", d.get("hidden_size"))
    heads = out.get("num_attention_heads", d.get("num_attention_heads"))
    if "head_dim" in d and d["head_dim"] is None and isinstance(hidden, int) and isinstance(heads, int):
        out["head_dim"] = hidden // heads  # a None the modeling code divides by
    if isinstance(d.get("qk_rope_head_dim"), int) and d.get("head_dim") == d["qk_rope_head_dim"]:
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: RoPE is sized by head_dim
    if isinstance(d.get("qk_rope_head_dim"), int) and isinstance(d.get("qk_nope_head_dim"), int):
        qk = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
        for k in HEAD_DIM | {"qk_head_dim"}:
            if d.get(k) == qk:  # MLA: heads sized as the query's no-RoPE + RoPE parts
                out[k] = out.get("qk_rope_head_dim", 4) + out.get("qk_nope_head_dim", 8)
    if any(d.get(k) is not None for k in EXPERTS):
        for k in TOP_K & set(d):
            if d[k] is None:
                out[k] = 2  # a None the router's topk cannot take
    for expand in ("mamba_expand", "expand"):
        if isinstance(d.get(expand), int):  # Mamba heads span expand x hidden
            inner = d[expand] * out.get("hidden_size", d.get("hidden_size", 32))
            for nh, hdim in (("mamba_n_heads", "mamba_d_head"), ("num_heads", "head_dim")):
                if isinstance(out.get(nh, d.get(nh)), int) and hdim in d:
                    out[hdim] = inner // out.get(nh, d[nh])
    hd = out.get("head_dim", d.get("head_dim"))
    if not isinstance(hd, int):
        hd = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else 8
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(d.get(key), dict):
            out[key] = _rope(d[key], hd)
    return out


@functools.cache
def causal_lm_classes() -> dict[str, str]:
    """model type -> its causal-LM class name, as transformers' auto mapping has them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {t: c if isinstance(c, str) else c[0] for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}


#: per-type corrections on top of the generic shrink (deep-merged into its kwargs), each with
#: its reason in ``WHY``: most are defaults of the installed transformers that do not build or
#: run a model at any size, the others constraints between attributes the shrink cannot know
OVERRIDES: dict[str, dict[str, Any]] = {
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "dots3_note": {"text_config": {"head_dim": 12}},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "dory": {"num_hidden_layers": 4, "n_input_layers": 1, "n_recurrent_layers": 2, "n_output_layers": 1}
    | {"layer_types": None},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "kolibri1_1": {"head_dim": 16, "num_hidden_layers": 5, "layer_types": None, "kv_source_layers": None}
    | {"index_layers": None, "mlp_only_layers": None, "index_num_heads": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4}
    | {"indexer_compress_ratio": 2},
    "reformer": {"is_decoder": True, "num_hidden_layers": 2, "attn_layers": ["local", "lsh"]}
    | {"axial_pos_shape": [2, 4], "axial_pos_embds_dim": [16, 16], "num_buckets": 2}
    | {"local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4},
    "xmod": {"default_language": "en_XX"},
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2},
}
OVERRIDES["qwen4_exp"] = {"text_config": OVERRIDES["qwen4_exp_text"]}
_BROKEN_DEFAULT = "the class defaults do not build a model (at any size): "
WHY: dict[str, str] = {
    "cohere_compass_text": _BROKEN_DEFAULT + "`rope_parameters` defaults to {} and the rotary embedding "
    "looks up `rope_parameters['full_attention']` (KeyError)",
    "dbrx": _BROKEN_DEFAULT + "`DbrxAttention` reads `attn_config.rope_theta`, which `DbrxAttentionConfig` lacks, "
    "and clamps to `clip_qkv`, which defaults to None",
    "dots3_note": "the sliding-window layers' head size must be the MLA query's no-RoPE + RoPE parts (8 + 4); "
    "the composite's text defaults give `head_dim` 256 against 128 + 64",
    "dots1": _BROKEN_DEFAULT + "`n_routed_experts`, `num_experts_per_tok`, `n_shared_experts` default to None "
    "and the MoE layers allocate `torch.empty(None, …)`",
    "dory": "input + recurrent + output layers must add up to the layer count: 1 + 2 + 1 of 4",
    "granitemoehybrid": _BROKEN_DEFAULT + "every layer is Mamba (`linear_attention`) and the forward asks the "
    "cache for an attention layer's mask sizes; one Mamba and one attention layer",
    "kolibri1_1": "NVFP4 rounding of keys and values needs a head size that is a multiple of 16; 5 layers so "
    "that the fifth is an indexed-attention layer (the class derives its KV-source lists from the count); "
    "the indexer's heads within the query heads per key head (2)",
    "lfm2_moe": _BROKEN_DEFAULT + "`layer_types` defaults to None and the decoder layer indexes it; one "
    "convolution and one attention layer",
    "qwen4_exp_text": _BROKEN_DEFAULT + "the QSA indexer sizes (`indexer_budget`, …) default to None and the "
    "attention divides them",
    "qwen4_exp": "as qwen4_exp_text, in `text_config`",
    "reformer": "`ReformerModelWithLMHead` requires `is_decoder=True`; the axial position shape must multiply "
    "to the sequence length (2 × 4 = 8) and its embedding sizes add up to the hidden size (16 + 16); "
    "chunk lengths within the 8 tokens",
    "xmod": "the forward needs a language adapter: `default_language` (its only language, en_XX)",
    "zamba": "the shared transformer block is tied across hybrid layers: at least two of them (4 layers, "
    "every second one hybrid)",
}
#: types that cannot run on a text-only batch of token ids: the reason
_ASSISTANT = (
    "a drafting assistant: its forward needs the backbone model's `inputs_embeds` and `shared_kv_states`, not token ids"
)
_MUSICGEN = (
    "a music decoder over codebooks: `AutoModelForCausalLM.from_config` on its composite config fails in "
    "transformers (the decoder reads `dropout` from the composite config), and its forward takes "
    "(batch × num_codebooks, seq) audio-code ids"
)
SKIPS: dict[str, str] = {
    "gemma4_assistant": _ASSISTANT,
    "gemma4_unified_assistant": _ASSISTANT,
    "musicgen": _MUSICGEN,
    "musicgen_melody": _MUSICGEN,
}


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def small_kwargs(model_type: str, layer_lists: bool = True) -> dict[str, Any]:
    """The keyword arguments of ``model_type``'s small config: the generic shrink of the class
    defaults, then ``OVERRIDES``."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    override = OVERRIDES.get(model_type, {})
    try:
        defaults = cls().to_dict()
    except Exception:  # the defaults themselves do not validate: the override must fix them
        defaults = cls(**override).to_dict()
    return _merge(shrink(defaults, layer_lists=layer_lists), override)


def small_config(model_type: str, extra: Mapping[str, Any] | None = None) -> Any:
    """``model_type``'s small config (``extra`` on top): the per-layer lists cut to the layers
    kept, or where the config class refuses that (lists it derives from one another), those
    lists derived anew by the class from the small layer count."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        return cls(**_merge(small_kwargs(model_type), extra or {}))
    except Exception as exc:
        first = exc
    try:
        return cls(**_merge(small_kwargs(model_type, layer_lists=False), extra or {}))
    except Exception:
        raise first from None


__all__ = ["OVERRIDES", "SKIPS", "TEXT_IDS", "WHY", "causal_lm_classes", "shrink", "small_config", "small_kwargs"]
