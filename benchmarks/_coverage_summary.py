"""The coverage sweep's markdown summary, from the CSV alone: counts per source and rule
(failures for lack of this machine's memory apart), every failing row with its reason,
then every row."""

from __future__ import annotations

import platform
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
import torchvision

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_models import BATCH
    from _coverage_rows import Status, latest_rows
    from _shared import md_cell, md_table, read_rows
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_models import BATCH
    from benchmarks._coverage_rows import Status, latest_rows
    from benchmarks._shared import md_cell, md_table, read_rows

ROOT = Path(__file__).resolve().parent.parent

#: the count columns: (summary status, header)
COLUMNS = [
    (Status.PASS, "pass"),
    (Status.FORWARD_CHANGED, "forward changed"),
    (Status.LEFT_ON_BP, "left on BP"),
    (Status.CONVERSION_ERROR, "conversion error"),
    (Status.TIMEOUT, "timeout"),
    ("memory", "out of memory here"),
    ("other", "other"),
]
#: the table of all rows: (CSV column, header)
ROW_COLUMNS = [
    ("source", "source"),
    ("model", "model"),
    ("rule", "rule"),
    ("status", "status"),
    ("input_size", "input"),
    ("build_kwargs", "build kwargs"),
    ("opts", "opts"),
    ("params_m", "params (M)"),
    ("weight_modules", "weight modules"),
    ("ops_converted", "ops converted"),
    ("conversion_path", "path"),
    ("convert_s", "convert s"),
    ("check_s", "check s"),
    ("pfa_fx_rev", "pfa_fx"),
]
NUMERIC = {"input_size", "params_m", "weight_modules", "ops_converted", "convert_s", "check_s"}  # right-aligned
_OOM = ("can't allocate memory", "out of memory", "cannot allocate memory", "memoryerror")


def summary_status(row: Mapping[str, str]) -> str:
    """The summary's column for a row: failures caused by this machine's memory (the
    allocator refusing, or the worker killed) are counted apart from conversion failures."""
    status, reason = row["status"], row.get("reason", "").lower()
    if status != Status.PASS and (status == Status.CRASH or any(k in reason for k in _OOM)):
        return "memory"
    return status if status in dict(COLUMNS) else "other"


def repo_path(path: Path) -> str:
    """``path`` relative to the repository root where it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_summary(csv_path: Path, out_path: Path) -> str:
    """Markdown counts per source and rule, then every failing row with its reason."""
    rows = latest_rows(read_rows(csv_path))
    by: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    paths: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in rows:
        by[(r["source"], r["rule"])][summary_status(r)] += 1
        if r.get("conversion_path"):
            paths[(r["source"], r["rule"])][r["conversion_path"]] += 1
    counts = []
    for (source, rule), c in sorted(by.items()):
        p = paths[(source, rule)]
        path_counts = f"{p.get('traced', 0)} / {p.get('fallback', 0)} / {p.get('eager', 0)}"
        counts.append([source, rule, sum(c.values()), *(c.get(key, 0) for key, _ in COLUMNS), path_counts])
    lines = [
        "# Conversion coverage",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `{repo_path(csv_path)}` by "
        "`benchmarks/coverage.py` (regenerate: `python benchmarks/coverage.py --no-run --summary`). "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"{platform.machine()} CPU.",
        "",
        "Each (model, rule): built with `pretrained=False, num_classes=10` at a small input "
        f"(batch {BATCH}), converted, and passes when the eval- and train-mode forwards are "
        "bit-identical (`torch.equal` on every output tensor), `weights_on_backprop` is empty "
        "after a train-mode forward, and all gradients are finite.",
        "",
        *md_table(
            ["source", "rule", "models", *(label for _, label in COLUMNS), "traced / fallback / eager"],
            counts,
            "llr" + "r" * len(COLUMNS) + "l",
        ),
        "",
    ]
    for (source, rule), c in sorted(by.items()):
        n = sum(c.values())
        fit = n - c.get("memory", 0) - c.get(Status.BUILD_ERROR, 0)
        lines.append(
            f"- {source} / {rule}: {c.get(Status.PASS, 0)} of {n} pass ({100 * c.get(Status.PASS, 0) / n:.1f} %); "
            f"of the {fit} that build and fit this machine's memory, {100 * c.get(Status.PASS, 0) / max(fit, 1):.1f} %."
        )
    revs = Counter(r.get("pfa_fx_rev") or "not recorded" for r in rows)
    lines += ["", "pfa_fx revision per row: " + ", ".join(f"`{k}` {v}" for k, v in sorted(revs.items())) + "."]
    failures = sorted(
        (r for r in rows if r["status"] != Status.PASS), key=lambda r: (r["source"], r["model"], r["rule"])
    )
    lines += ["", f"## Failures ({len(failures)})", ""]
    if failures:
        lines += md_table(
            ["source", "model", "rule", "status", "reason"],
            ([r["source"], r["model"], r["rule"], r["status"], md_cell(r["reason"][:300])] for r in failures),
            "lllll",
        )
    else:
        lines.append("None.")
    times = [float(r[k]) for r in rows for k in ("convert_s", "check_s") if r.get(k)]
    lines += [
        "",
        "## All rows",
        "",
        f"{len(rows)} rows; conversion + check time {sum(times) / 60:.1f} min in all "
        "(build and worker start-up not counted).",
        "",
        "<details><summary>input size, options, ops converted and times per model</summary>",
        "",
        *md_table(
            [header for _, header in ROW_COLUMNS],
            (
                [md_cell(str(r.get(key, ""))) for key, _ in ROW_COLUMNS]
                for r in sorted(rows, key=lambda r: (r["source"], r["model"], r["rule"]))
            ),
            "".join("r" if key in NUMERIC else "l" for key, _ in ROW_COLUMNS),
        ),
        "",
        "</details>",
        "",
    ]
    text = "\n".join(lines)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return text
