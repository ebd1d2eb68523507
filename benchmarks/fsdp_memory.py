"""Per-rank memory of FSDP2 training, every rule against native FSDP2, measured.

Runs ``examples/fsdp_finetune.py`` under ``torchrun`` once per rule (and once for the
native, unconverted model), each in fresh processes — a process's peak memory only
grows, so rules cannot share one — and reads each rank's report: the numbers it holds
(its shards of the weights and of the feedback state) and its peak memory (CUDA: peak
allocated; CPU: peak resident set, taken as the growth from before the model was built,
so the interpreter and libraries are left out). The table gives each rule's growth as a
ratio to native FSDP2's on the same ranks.

    python benchmarks/fsdp_memory.py                                   # 2 gloo processes, CPU
    python benchmarks/fsdp_memory.py --nproc 8 --model llama --width 1024 --layers 8   # GPUs

The run's numbers differ from the meta-device accounting (``memory_at_scale.py``) by
activations, the gathered block, the allocator's caching and, on CPU, everything the
process maps (hence ratios of growth, on the same configuration).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

try:
    from _shared import command_line, emit, git_revision, host_line, md_table
except ImportError:  # imported as benchmarks.fsdp_memory (tests)
    from benchmarks._shared import command_line, emit, git_revision, host_line, md_table

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "fsdp_finetune.py"
RULES = ("native", "bp", "fa", "dfa", "sf", "kp", "wm", "pal", "pfa", "pfa-o")
_ROW = re.compile(r"^\s*(\d+)\s+([\d,]+)/([\d,]+)\s+(?:([\d,]+)/([\d,]+)|-)\s+([\d.]+)\s+\(([-\d.]+)\)", re.M)


def parse_report(out: str) -> list[dict[str, float]]:
    """The per-rank rows the example prints at its end."""
    rows = []
    for m in _ROW.finditer(out):
        num = [int(g.replace(",", "")) if g else 0 for g in m.groups()[:5]]
        rows.append(
            {
                "rank": num[0],
                "weights_local": num[1],
                "weights_total": num[2],
                "feedback_local": num[3],
                "feedback_total": num[4],
                "peak_mib": float(m.group(6)),
                "growth_mib": float(m.group(7)),
            }
        )
    return rows


def run_rule(args: argparse.Namespace, rule: str, store: str) -> tuple[list[dict[str, float]], float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd += [str(SCRIPT), "--model", args.model, "--rule", rule, "--steps", str(args.steps)]
    cmd += ["--width", str(args.width), "--layers", str(args.layers), "--batch-size", str(args.batch_size)]
    cmd += ["--context", str(args.context), "--corpus", args.corpus, "--store-feedback", store]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{rule}: the run failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return parse_report(done.stdout), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", choices=("llama", "vit"), default="llama")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--store-feedback", nargs="+", default=["yes", "no"], choices=("yes", "no"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--corpus", default="pydoc", help="llama's text (see examples/fsdp_finetune.py)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)

    table, native = [], None
    for rule in args.rules:
        fixed = rule in ("fa", "sf", "dfa", "pfa", "pfa-o")  # rules with fixed random feedback
        for store in args.store_feedback if fixed else ["yes"]:
            if rule == "sf" and store == "no":
                continue  # usf holds no W-sized state: nothing to redraw
            rows, seconds = run_rule(args, rule, store)
            growth = max(r["growth_mib"] for r in rows)
            native = growth if rule == "native" else native
            w = max(r["weights_local"] / r["weights_total"] for r in rows)
            fb = max((r["feedback_local"] / r["feedback_total"] for r in rows if r["feedback_total"]), default=0)
            label = rule if not fixed else f"{rule} ({'stored' if store == 'yes' else 'redrawn'})"
            ratio = f"{growth / native:.2f}" if native else "–"
            table.append([label, f"{w:.2f}", f"{fb:.2f}" if fb else "–", f"{growth:.0f}", ratio, f"{seconds:.0f}"])
            print(" | ".join(table[-1]), flush=True)
    lines = [
        f"`{command_line()}` ({time.strftime('%Y-%m-%d')}, {host_line()}, pfa_fx at {git_revision()}): "
        f"{args.nproc} ranks, {args.model} width {args.width}, {args.layers} blocks, global batch {args.batch_size}, "
        f"{args.steps} AdamW steps; *held*: the largest fraction of the unsharded weights / feedback numbers one rank "
        "holds; *growth*: the largest rank's peak memory (CUDA: allocated; CPU: resident set) over its value before "
        "the model was built.",
        "",
        *md_table(["rule", "weights held", "feedback held", "growth MiB", "× native FSDP2", "wall s"], table, "lrrrrr"),
    ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
