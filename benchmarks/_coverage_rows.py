"""A row of the coverage CSV: its columns (``FIELDS``), its statuses, the pfa_fx revision
it records, and which rows of the CSV count (the latest per model and rule: a retry replaces
a timeout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pfa_fx

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import git_revision
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import git_revision

FIELDS = [
    "source",
    "model",
    "rule",
    "status",
    "reason",
    "input_size",
    "build_kwargs",
    "opts",
    "params_m",
    "weight_modules",
    "ops_converted",
    "conversion_path",
    "eval_equal",
    "train_equal",
    "left_on_bp",
    "grads_finite",
    "build_s",
    "convert_s",
    "check_s",
    "report",
    "pfa_fx_rev",
    "timestamp",
]


class Status:
    """What a row's ``status`` says. A failing check is classified by the first of
    ``CHECK_ERROR``, ``FORWARD_CHANGED``, ``LEFT_ON_BP``, ``NONFINITE_GRAD`` that applies."""

    PASS = "pass"
    BUILD_ERROR = "build_error"  # the model itself cannot be built or run: not pfa_fx's fault
    CONVERSION_ERROR = "conversion_error"
    CHECK_ERROR = "check_error"  # the converted model raised in forward or backward
    FORWARD_CHANGED = "forward_changed"
    LEFT_ON_BP = "left_on_bp"
    NONFINITE_GRAD = "nonfinite_grad"
    TIMEOUT = "timeout"
    CRASH = "crash"  # the worker died (e.g. killed for memory) before writing the row


_REV: list[str] = []  # the revision rows record, read once per process


def revision() -> str:
    """The pfa_fx revision this process's rows record: its git commit (``+dirty`` with
    uncommitted changes), else pfa_fx's version; read once."""
    if not _REV:
        _REV.append(git_revision() or getattr(pfa_fx, "__version__", ""))
    return _REV[0]


def set_revision(rev: str) -> None:
    """This process's rows record ``rev`` (a worker: what its sweep read when it began)."""
    _REV[:] = [rev]


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its revision and timestamp, in ``FIELDS`` (blank where it has none)."""
    row.setdefault("pfa_fx_rev", revision())
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {k: row.get(k, "") for k in FIELDS}


def latest_rows(rows: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """One row per (source, model, rule): the last one written (a retry replaces a timeout)."""
    last: dict[tuple[str, str, str], Mapping[str, str]] = {}
    for row in rows:
        last[(row["source"], row["model"], row["rule"])] = row
    return list(last.values())
