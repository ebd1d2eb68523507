"""What the benchmark scripts share: the converted variants they name, the machine line of
their tables and how a table is printed and appended to ``--out``. Imported as ``_shared`` (the scripts run as
``python benchmarks/<script>.py``, which puts this folder on ``sys.path``) or as
``benchmarks._shared`` (imported from the repository root)."""

from __future__ import annotations

import contextlib
from pathlib import Path

#: variant name -> (rule, options) for pfa_fx.convert; "bp" is BP through the converted ops
RULES: dict[str, tuple[str, dict]] = {
    "bp": ("bp", {}),
    "fa": ("fa", {}),
    "sf": ("sf", {}),
    "kp": ("kp", {}),
    "kp-implicit": ("kp", {"implicit": True}),
    "pfa-compact": ("pfa", {"expansion": 10, "compact": True}),
    "pfa-compact-implicit": ("pfa", {"expansion": 10, "compact": True, "implicit": True}),
    "pfa": ("pfa", {"expansion": 10}),
    "pfa-o": ("pfa-o", {}),
    "dfa": ("dfa", {}),
    "wm": ("wm", {}),
    "pal": ("pal", {}),
}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def emit(text: str, out: str | None) -> str:
    """Print a result table and append it to ``out`` (a markdown file) when given."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)
    return text
