"""The Hugging Face coverage sweep's markdown, from the CSV alone: the summary line (model
types, share clean under FA), counts per rule, every causal-LM class of transformers (attempted,
clean, the per-type config overrides and skips), one table with a row per model (its FA row and
BP's gradient check), the sample's rules, every failing model with its cause and diagnosis,
then every row."""

from __future__ import annotations

import platform
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_rows import Status
    from _coverage_summary import repo_path
    from _hf_causal_lm import OVERRIDES, SKIPS, WHY, causal_lm_classes
    from _hf_check import GRAD_MISMATCH, GRAD_RTOL, SKIPPED
    from _hf_diagnoses import NOTES, diagnose
    from _hf_models import ALL_SPECS, BATCH, DEC_SEQ, IMAGE, SEQ
    from _shared import cpu_name, md_cell, md_table
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_rows import Status
    from benchmarks._coverage_summary import repo_path
    from benchmarks._hf_causal_lm import OVERRIDES, SKIPS, WHY, causal_lm_classes
    from benchmarks._hf_check import GRAD_MISMATCH, GRAD_RTOL, SKIPPED
    from benchmarks._hf_diagnoses import NOTES, diagnose
    from benchmarks._hf_models import ALL_SPECS, BATCH, DEC_SEQ, IMAGE, SEQ
    from benchmarks._shared import cpu_name, md_cell, md_table

#: the count columns: (status, header)
COLUMNS = [
    (Status.PASS, "pass"),
    (Status.FORWARD_CHANGED, "forward changed"),
    (Status.LEFT_ON_BP, "left on BP"),
    (GRAD_MISMATCH, "BP grads differ"),
    (Status.NONFINITE_GRAD, "non-finite"),
    (Status.CONVERSION_ERROR, "conversion error"),
    (Status.CHECK_ERROR, "check error"),
    (Status.TIMEOUT, "timeout"),
    (Status.BUILD_ERROR, "build error"),
    (SKIPPED, "skipped"),
    ("other", "other"),
]
RULE_ORDER = ("fa", "bp", "dfa", "sf", "kp", "wm", "pal", "pfa", "pfa-o")  # FA, the main row, first
#: the all-rows table: (CSV column, header)
ROW_COLUMNS = [
    ("model", "model"),
    ("rule", "rule"),
    ("status", "status"),
    ("ops_converted", "ops"),
    ("front_end", "front end"),
    ("eval_equal", "eval ="),
    ("train_equal", "train ="),
    ("left_on_bp", "left on BP"),
    ("grads_finite", "grads finite"),
    ("step_ok", "step ok"),
    ("grad_max_diff", "BP grad diff"),
    ("convert_s", "convert s"),
    ("check_s", "check s"),
]
NUMERIC = {"ops_converted", "left_on_bp", "grad_max_diff", "convert_s", "check_s"}


def _order(rows: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """Rows in the order of ``ALL_SPECS``, then rules in Table 1's order."""
    spec_pos = {s.name: i for i, s in enumerate(ALL_SPECS)}
    return sorted(rows, key=lambda r: (spec_pos.get(r["model"], len(spec_pos)), _rule_pos(r["rule"]), r["model"]))


def _rule_pos(rule: str) -> int:
    return RULE_ORDER.index(rule) if rule in RULE_ORDER else len(RULE_ORDER)


def _num(text: str, fmt: str = ".3g") -> str:
    try:
        return format(float(text), fmt)
    except ValueError:
        return text


def _left(r: Mapping[str, str]) -> str:
    """Weights left on BP: the audit's count, plus those behind ops it does not list."""
    unlisted = len(r.get("unlisted_on_bp", "").split(" (")) - 1 if r.get("unlisted_on_bp") else 0
    return f"{r.get('left_on_bp', '')} + {unlisted} unlisted" if unlisted else r.get("left_on_bp", "")


def _evidence(r: Mapping[str, str]) -> str:
    """What a failing row says, for the diagnoses to match: status, reason, where it came from,
    the conversion warning and the parameters left on BP."""
    keys = ("status", "reason", "where", "capture_warning", "left_params", "unlisted_on_bp")
    return " ".join(r.get(k, "") or "" for k in keys)


def summary_numbers(rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Models and model types with an FA row, how many pass (and the share), BP rows whose
    gradients equal the native model's, rows and passes of the sample's other rules."""
    fa = [r for r in rows if r["rule"] == "fa"]
    bp = [r for r in rows if r["rule"] == "bp"]
    other = [r for r in rows if r["rule"] not in ("fa", "bp")]
    clean = sum(r["status"] == Status.PASS for r in fa)
    compared = [float(r["grad_rel_diff"]) for r in bp if r.get("grad_rel_diff", "") != ""]
    grads_equal = sum(d <= GRAD_RTOL for d in compared)
    return {
        "models": len(fa),
        "types": len({r["model_type"] for r in fa}),
        "fa_clean": clean,
        "fa_clean_pct": 100.0 * clean / max(len(fa), 1),
        "bp_rows": len(bp),
        "bp_compared": len(compared),
        "bp_grads_equal": grads_equal,
        "bp_worst": max(compared, default=0.0),
        "other_rows": len(other),
        "other_pass": sum(r["status"] == Status.PASS for r in other),
    }


def _failure_section(rows: Sequence[Mapping[str, str]]) -> list[str]:
    by_model: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for r in rows:
        if r["status"] not in (Status.PASS, SKIPPED):
            by_model[r["model"]].append(r)
    lines = [f"## Failures and their causes ({len(by_model)} models)", ""]
    if not by_model:
        return [*lines, "None.", ""]
    found = {m: diagnose(m, " ".join(_evidence(r) for r in failed)) for m, failed in by_model.items()}
    causes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for model, d in found.items():
        causes[(d.cause, d.fix_at) if d else ("not diagnosed: see the reason below", "")].append(model)
    lines += md_table(
        ["cause", "where it is fixed", "models"],
        ([md_cell(c), md_cell(at), ", ".join(ms)] for (c, at), ms in causes.items()),
        "lll",
    )
    lines.append("")
    for model, failed in by_model.items():
        first = failed[0]
        rules = ", ".join(r["rule"] for r in failed)
        lines.append(
            f"### {model} ({first.get('model_type', '')}, {first.get('head', '')}): {first['status']} under {rules}"
        )
        lines.append("")
        same: dict[tuple[str, str, str], list[str]] = defaultdict(list)  # rules failing alike
        for r in failed:
            same[(r["status"], r["reason"], r.get("where", ""))].append(r["rule"])
        for (status, reason, where), on in same.items():
            at = f" — where: `{where}`" if where else ""
            lines.append(f"- {', '.join(on)}: **{status}**: {md_cell(reason[:400])}{at}")
        if first.get("capture_warning"):
            lines.append(f"- conversion warned: {md_cell(first['capture_warning'][:300])}")
        d = found[model]
        owner = next(m for m, other in found.items() if other is d)
        if d is not None and owner == model and d.text:
            lines += ["", d.text.strip()]
        elif d is not None and d.text:
            lines += ["", f"*Diagnosis: the same cause as {owner}'s, above.*"]
        elif d is not None:
            lines += ["", f"*Cause: {d.cause} ({d.fix_at}).*"]
        lines.append("")
    return lines


def write_summary(csv_rows: Sequence[Mapping[str, str]], out_path: Path, csv_path: Path, minutes: str = "") -> str:
    """``COVERAGE_HF.md`` from the CSV's latest rows of this sweep."""
    import transformers

    rows = _order(csv_rows)
    n = summary_numbers(rows)
    by_rule: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        by_rule[r["rule"]][r["status"] if r["status"] in dict(COLUMNS) else "other"] += 1
    revs = Counter(r.get("pfa_fx_rev") or "not recorded" for r in rows)
    took = sum(float(r[k]) for r in rows for k in ("build_s", "convert_s", "check_s") if r.get(k)) / 60
    lines = [
        "# Coverage across Hugging Face architectures",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{repo_path(csv_path)}` by "
        "`benchmarks/hf_coverage.py` (rerun all: `python benchmarks/hf_coverage.py --fresh`; regenerate this file "
        "from the CSV: `python benchmarks/hf_coverage.py --no-run`). "
        f"transformers {transformers.__version__}, torch {torch.__version__}, {cpu_name()} "
        f"({platform.machine()}), one torch thread per model; pfa_fx "
        + ", ".join(f"`{k}` ({v} rows)" for k, v in sorted(revs.items()))
        + ".",
        "",
        f"**{n['types']} model types ({n['models']} models with their heads): {n['fa_clean']} of {n['models']} "
        f"clean under FA ({n['fa_clean_pct']:.1f} %).** Under BP every gradient equals the native model's in "
        f"{n['bp_grads_equal']} of the {n['bp_compared']} models whose converted forward runs (largest difference "
        f"{n['bp_worst']:.2g} of the largest gradient entry; the bound is {GRAD_RTOL:g}); "
        f"{n['bp_rows'] - n['bp_compared']} do not run."
        + (
            f" The other seven rules on the sample: {n['other_pass']} of {n['other_rows']} rows pass."
            if n["other_rows"]
            else ""
        )
        + (f" The sweep took {minutes} min wall-clock." if minutes else "")
        + f" Build + convert + check time summed over the rows: {took:.1f} min.",
        "",
        "Front ends of the FA rows' converted ops (`node.conversion_path`, models using each): "
        + ", ".join(f"{k} {v}" for k, v in _front_end_counts(rows).most_common())
        + ".",
        "",
        "Each model is built from a small config of its type (2 layers, hidden size 32, vocabulary 256, "
        f"{IMAGE} px images; no weights downloaded) with randomly initialised weights, and given a batch of "
        f"{BATCH}: token ids ({SEQ} tokens, one row right-padded by 2 under its attention mask), decoder ids "
        f"({DEC_SEQ}), pixels, log-mel features (Whisper) or raw audio (wav2vec2, HuBERT). That batch is "
        "`example_inputs=`. A (model, rule) is clean when (1) the eval- and train-mode forwards are "
        "`torch.equal` to the native model's on every output tensor (train mode under the same seed: same "
        "dropout); (2) `weights_on_backprop` on the sum of the train-mode outputs' means is empty, and no ≥ 2-D "
        "parameter is an operand of a matrix-product autograd node that audit does not list (custom ops, "
        "`grouped_mm`; `unlisted_on_bp`); (3) one training step (cross-entropy of the logits, backward, "
        "`torch.optim.SGD`, and a forward with the stepped weights) is finite; (4) under `bp`, every gradient "
        "equals the native model's on the same batch. Embedding lookups are not matrix products and do not count.",
        "",
        "## Per rule",
        "",
        *md_table(
            ["rule", "rows", *(label for _, label in COLUMNS)],
            (
                [rule, sum(by_rule[rule].values()), *(by_rule[rule].get(key, 0) for key, _ in COLUMNS)]
                for rule in sorted(by_rule, key=_rule_pos)
            ),
            "l" + "r" * (len(COLUMNS) + 1),
        ),
        "",
        *_causal_lm_section(rows),
        *_model_table(rows),
        *_sample_table(rows),
        *_failure_section(rows),
        "## Other findings",
        "",
        NOTES.strip(),
        "",
        *_all_rows(rows),
    ]
    text = "\n".join(lines)
    out_path.write_text(text)
    return text


def _causal_fa(rows: Sequence[Mapping[str, str]]) -> dict[str, Mapping[str, str]]:
    """The FA row of each causal-LM model type: its spec's (a variant such as
    mixtral-eager-experts does not replace the type's own row)."""
    fa: dict[str, Mapping[str, str]] = {}
    for r in rows:
        if r["rule"] == "fa" and r.get("head") == "causal-lm":
            own = r["model"] in (r["model_type"], f"{r['model_type']}-clm")
            if own or r["model_type"] not in fa:
                fa[r["model_type"]] = r
    return fa


def causal_lm_numbers(rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """The causal-LM classes of the installed transformers (one per model type of
    ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), how many have an FA row, how many ran (not skipped,
    built), how many of those are clean."""
    classes = causal_lm_classes()
    fa = _causal_fa(rows)
    attempted = [r for t, r in fa.items() if t in classes]
    ran = [r for r in attempted if r["status"] not in (SKIPPED, Status.BUILD_ERROR)]
    clean = sum(r["status"] == Status.PASS for r in attempted)
    return {
        "types": len(classes),
        "classes": len(set(classes.values())),
        "attempted": len(attempted),
        "skipped": sum(r["status"] == SKIPPED for r in attempted),
        "build_error": sum(r["status"] == Status.BUILD_ERROR for r in attempted),
        "ran": len(ran),
        "clean": clean,
        "clean_pct": 100.0 * clean / max(len(attempted), 1),
        "clean_of_ran_pct": 100.0 * clean / max(len(ran), 1),
    }


def _causal_lm_section(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Every causal-LM class: the counts, the statuses, the per-type overrides and skips."""
    n = causal_lm_numbers(rows)
    classes = causal_lm_classes()
    fa = _causal_fa(rows)
    statuses = Counter(fa[t]["status"] for t in classes if t in fa)
    hand = sorted({s.model_type for s in ALL_SPECS if s.head == "causal-lm" and not s.generic})
    missing = [t for t in classes if t not in fa]
    lines = [
        "## Every causal-LM class of transformers",
        "",
        f"transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` has **{n['types']} model types** "
        f"({n['classes']} distinct classes: some types share one, e.g. `LlamaForCausalLM`). "
        f"**{n['attempted']} of {n['types']} attempted under FA**"
        + (
            f" ({len(missing)} not reached yet" + (f": {', '.join(missing)})" if len(missing) <= 20 else ")")
            if missing
            else ""
        )
        + f": {n['clean']} clean (**{n['clean_pct']:.1f} %** of those attempted; "
        f"{n['clean_of_ran_pct']:.1f} % of the {n['ran']} that built and ran — {n['skipped']} skipped as needing "
        f"inputs besides token ids, {n['build_error']} whose small model transformers could not build or run). "
        "By status: " + ", ".join(f"{k} {v}" for k, v in statuses.most_common()) + ".",
        "",
        f"The {len(hand)} types with a hand-written config ({', '.join(hand)}) keep it; every "
        "other one is "
        "`AutoModelForCausalLM.from_config` of a config derived generically from its config class "
        "(`benchmarks/_hf_causal_lm.py`): the class's defaults with every attribute of a known name shrunk "
        "(layers → 2, hidden size → 32, heads → 4, key/value heads → 2, head size → 8, FFN → 64, MoE FFN → 32, "
        "vocabulary → 256, experts → 4 with ≤ 2 per token, positions → 64, windows → 4, MLA ranks → 16, "
        "Mamba state → 8, …), per-layer lists (`layer_types`, `mlp_layer_types`, index lists, "
        "`per_layer_config`) cut to one layer of each kind (2 to 4 layers), sub-configs (`text_config`, "
        "`vision_config`, …) shrunk alike, special tokens beyond the vocabulary moved to its top (the batch's "
        "ids stay below them). Composite (multimodal) types get the same text-only batch as the others.",
        "",
        f"**Per-type overrides ({len(WHY)})**, where the generic shrink alone does not give a model that builds "
        "and runs on a text batch:",
        "",
        *md_table(
            ["type", "override", "why"],
            ([t, md_cell(f"`{OVERRIDES.get(t, {})}`"), md_cell(WHY[t])] for t in sorted(WHY)),
            "lll",
        ),
        "",
        f"**Skipped ({len(SKIPS)})**, not runnable on token ids: "
        + "; ".join(f"{t}: {why}" for t, why in sorted(SKIPS.items()))
        + ".",
        "",
    ]
    return lines


def _front_end_counts(rows: Sequence[Mapping[str, str]]) -> Counter[str]:
    """How many FA rows have ops of each front end (``"9 export graph"`` counts once for export graph)."""
    counts: Counter[str] = Counter()
    for r in rows:
        if r["rule"] == "fa" and r.get("front_end"):
            counts.update({part.split(" ", 1)[1] for part in r["front_end"].split("; ")})
    return counts


def _model_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """One row per model: its FA row, and BP's gradient difference."""
    bp = {r["model"]: r for r in rows if r["rule"] == "bp"}
    table = []
    for r in (r for r in rows if r["rule"] == "fa"):
        b = bp.get(r["model"], {})
        table.append(
            [
                r["model"],
                r.get("model_type", ""),
                r.get("head", ""),
                r.get("class", ""),
                r.get("params_k", ""),
                r.get("weights_2d", ""),
                r.get("ops_converted", ""),
                md_cell(r.get("front_end", "")),
                r["status"],
                _left(r),
                b.get("status", ""),
                _num(b.get("grad_max_diff", "")),
                _num(r.get("convert_s", ""), ".1f"),
                _num(r.get("check_s", ""), ".1f"),
            ]
        )
    header = [
        "model",
        "type",
        "head",
        "class",
        "params (k)",
        "≥2-D params",
        "ops",
        "front end",
        "FA",
        "left on BP (audit)",
    ]
    header += ["BP", "BP grad max diff", "convert s", "check s"]
    return ["## Models (FA row; BP's gradient check)", "", *md_table(header, table, "llllrrrllrlrrr"), ""]


def _sample_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Status per rule for the models that ran more rules than FA and BP."""
    by_model: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        by_model[r["model"]][r["rule"]] = r["status"]
    sample = {m: st for m, st in by_model.items() if set(st) - {"fa", "bp"}}
    if not sample:
        return []
    rules = [r for r in RULE_ORDER if any(r in st for st in sample.values())]
    table = [[m, *(st.get(r, "") for r in rules)] for m, st in sample.items()]
    return ["## Every rule on the sample", "", *md_table(["model", *rules], table, "l" * (len(rules) + 1)), ""]


def _all_rows(rows: Sequence[Mapping[str, str]]) -> list[str]:
    return [
        "## All rows",
        "",
        "<details><summary>every (model, rule)</summary>",
        "",
        *md_table(
            [header for _, header in ROW_COLUMNS],
            ([md_cell(_num(r.get(k, "")) if k in NUMERIC else r.get(k, "")) for k, _ in ROW_COLUMNS] for r in rows),
            "".join("r" if k in NUMERIC else "l" for k, _ in ROW_COLUMNS),
        ),
        "",
        "</details>",
        "",
    ]
