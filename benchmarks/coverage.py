"""Coverage sweep: every torchvision and timm classification model converts.

For each model and rule, the model is built (``pretrained=False``, ``num_classes=10``) at
the smallest input it accepts from a short list of candidates, converted with
``pfa_fx.convert``, and checked:

* conversion succeeds (else the exception type and first message line are recorded);
* the forward is bit-identical (``torch.equal`` on every tensor leaf of tuple / dict /
  namedtuple outputs) in eval mode, and in train mode under the same RNG seed;
* after a train-mode forward, ``weights_on_backprop(loss, gm)`` is empty, with ``loss`` the
  sum of the means of all output tensor leaves, and every gradient is finite.

Each model runs in its own subprocess (``--one``) under a wall-clock ``--timeout``, so a
hang, a crash or an out-of-memory kill costs one model, not the sweep. Results are
appended to a CSV; a restart skips every (source, model, rule) row already there.
``--summary`` writes a markdown summary, which ``--no-run`` regenerates from the CSV alone.

Usage::

    # every torchvision classification model, rules fa and pfa, two workers
    python benchmarks/coverage.py --source tv --rules fa pfa --jobs 2 --summary
    # every 24th timm model, rule pfa, appended to the same CSV
    python benchmarks/coverage.py --source timm --every 24 --rules pfa --jobs 2 --summary
    # a few models by glob; all six rules
    python benchmarks/coverage.py --filter 'resnet*' --limit 5 --rules bp fa sf kp pfa pfa-o
    # one model in this process, rows printed as JSON (what each worker runs)
    python benchmarks/coverage.py --one tv:swin_t --rules pfa
    # regenerate benchmarks/COVERAGE.md from the CSV without rerunning anything
    python benchmarks/coverage.py --no-run --summary

Large models: above ``--big-params`` million parameters the PFA rules get
``--big-opts`` (default ``expansion=1``: PFA's ``R`` is ``expansion`` times the weight, drawn
in float64); above ``--solo-params`` million a model runs with no other worker beside it,
on all ``--jobs × --threads`` threads.
The options a model got are recorded in the CSV (``opts`` column).

The parts, one job each: ``_coverage_models.py`` (which models, at which input sizes),
``_coverage_check.py`` (the checks of one model), ``_coverage_rows.py`` (a CSV row: columns,
statuses), ``_coverage_sweep.py`` (the worker processes), ``_coverage_summary.py`` (the
markdown); this file is the command line, and names what the tests use.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_check import check_model, check_rule, compare_outputs, rule_options, tensor_leaves
    from _coverage_models import Built, build_model, list_model_names, timm_candidates, tv_candidates
    from _coverage_rows import FIELDS, Status, latest_rows
    from _coverage_summary import repo_path, summary_status, write_summary
    from _coverage_sweep import parse_opts, run_one, sweep
    from _shared import read_rows
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_check import check_model, check_rule, compare_outputs, rule_options, tensor_leaves
    from benchmarks._coverage_models import Built, build_model, list_model_names, timm_candidates, tv_candidates
    from benchmarks._coverage_rows import FIELDS, Status, latest_rows
    from benchmarks._coverage_summary import repo_path, summary_status, write_summary
    from benchmarks._coverage_sweep import parse_opts, run_one, sweep
    from benchmarks._shared import read_rows

__all__ = [  # what this module offers beside the command line (the tests use these)
    "FIELDS",
    "NONFINITE_GRAD",
    "PASS",
    "TIMEOUT",
    "Built",
    "Status",
    "build_model",
    "build_parser",
    "check_model",
    "check_rule",
    "compare_outputs",
    "latest_rows",
    "list_model_names",
    "main",
    "parse_opts",
    "read_rows",
    "rule_options",
    "summary_status",
    "tensor_leaves",
    "timm_candidates",
    "tv_candidates",
    "write_summary",
]

# the statuses the tests name
PASS, TIMEOUT, NONFINITE_GRAD = Status.PASS, Status.TIMEOUT, Status.NONFINITE_GRAD

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "coverage.csv"
DEFAULT_SUMMARY = HERE / "COVERAGE.md"
ALL_RULES = ("bp", "fa", "sf", "kp", "pfa", "pfa-o")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", choices=("tv", "timm", "both"), default="both")
    p.add_argument("--filter", help="fnmatch glob on model names, e.g. 'resnet*'")
    p.add_argument("--every", type=int, default=1, help="keep every N-th name (after --filter)")
    p.add_argument("--limit", type=int, help="at most this many models")
    p.add_argument("--rules", nargs="+", choices=ALL_RULES, default=["fa", "pfa"])
    p.add_argument("--opt", nargs="*", default=[], help="rule options key=value, passed to the rules that take them")
    p.add_argument("--big-params", type=float, default=60.0, help="millions of parameters above which --big-opts apply")
    p.add_argument("--big-opts", nargs="*", default=["expansion=1"], help="PFA options for models above --big-params")
    p.add_argument(
        "--solo-params", type=float, default=150.0, help="millions of parameters above which a model runs alone"
    )
    p.add_argument(
        "--lean-params",
        type=float,
        default=300.0,
        help="millions of parameters above which a model is checked lean (bfloat16, one copy fewer)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model (all its rules)")
    p.add_argument("--jobs", type=int, default=1, help="models checked at once, one worker process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument(
        "--retry", nargs="*", default=[], metavar="STATUS", help="rerun rows with these statuses (e.g. timeout crash)"
    )
    p.add_argument(
        "--no-new", action="store_true", help="check only models already in the CSV (with --retry: a retry pass)"
    )
    p.add_argument(
        "--summary",
        nargs="?",
        const=str(DEFAULT_SUMMARY),
        help=f"write a markdown summary (default {repo_path(DEFAULT_SUMMARY)})",
    )
    p.add_argument("--no-run", action="store_true", help="only (re)write the summary from the CSV")
    p.add_argument("--one", metavar="SOURCE:MODEL", help="check one model in this process (what each worker runs)")
    p.add_argument("--out", help="with --one: append JSON rows to this file instead of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        return run_one(args)
    if not args.no_run:
        t0 = time.perf_counter()
        sweep(args)
        print(f"sweep took {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    if args.summary:
        write_summary(Path(args.csv), Path(args.summary))
        print(f"wrote {args.summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
