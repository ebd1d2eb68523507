"""The lines a benchmark report starts with: the machine it ran on, the pfa_fx revision it
measured, the command that ran it."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import timm
import torch

import pfa_fx


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def threads_line() -> str:
    """CPU, torch threads and library versions (op_overhead.py, compiled_graphs.py)."""
    return f"{cpu_name()}, {torch.get_num_threads()} thread(s) (torch {torch.__version__}, timm {timm.__version__})"


def host_line() -> str:
    """CPU, cores and operating system (timm_ablation.py)."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def command_line() -> str:
    """This process's command line, as ``python <script> <arguments>``."""
    return " ".join(["python", *sys.argv])


def git_revision() -> str | None:
    """The git commit of the pfa_fx source imported (``+dirty`` with uncommitted changes
    under ``pfa_fx/``); None outside a git checkout."""
    root = Path(pfa_fx.__file__).resolve().parent

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True, timeout=10)
        return done.stdout.strip()

    try:
        rev, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")
