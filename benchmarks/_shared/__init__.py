"""What the benchmark scripts share, one job per module:

- ``machine``: the lines a report starts with (machine, pfa_fx revision, command);
- ``models``: the untrained torchvision and timm models they build by name;
- ``csv_store``: the CSV files their rows go to;
- ``markdown``: markdown tables, and a table printed and appended to ``--out``;

and, here, the converted variants they name (``RULES``) and the pfa_fx internals they use.

A benchmark module imports this as ``_shared`` when its script runs as ``python
benchmarks/<script>.py`` (which puts this folder on ``sys.path``), else as
``benchmarks._shared`` (imported from the repository root, as the tests do): a ``try`` of the
first, ``except ImportError`` the second, one import line per module in each.
"""

from __future__ import annotations

import pfa_fx

# pfa_fx internals (not its public API) the benchmarks use: imported here only
from pfa_fx.audit import weights_on_backprop
from pfa_fx.registry import NAMESPACE
from pfa_fx.weights import WEIGHT_MODULES, hidden_weights

from .csv_store import append_rows, read_rows, write_rows
from .machine import command_line, cpu_name, git_revision, host_line, threads_line
from .markdown import emit, md_cell, md_row, md_table
from .models import CLASSIFIERS, timm_model, tv_model

__all__ = [
    "CLASSIFIERS",
    "NAMESPACE",
    "RULES",
    "WEIGHT_MODULES",
    "append_rows",
    "command_line",
    "cpu_name",
    "emit",
    "git_revision",
    "hidden_weights",
    "host_line",
    "md_cell",
    "md_row",
    "md_table",
    "read_rows",
    "threads_line",
    "timm_model",
    "tv_model",
    "weights_on_backprop",
    "write_rows",
]

#: variant name -> the rule config pfa_fx.convert takes: each rule's defaults ("pfa": expansion
#: 10), then the library's presets ("kp-implicit", "pfa-compact", ...); "bp" is BP through the
#: converted ops
RULES: dict[str, pfa_fx.RuleConfig] = {
    **{name: cls.config_type() for name, cls in pfa_fx.RULES.items()},
    **pfa_fx.PRESETS,
}
