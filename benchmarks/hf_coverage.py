"""Coverage across Hugging Face architectures: causal LMs, masked LMs, sequence and image
classifiers, encoder-decoders, speech models and CLIP, each built from a small config of its
model type (no weights downloaded), converted by ``pfa_fx.convert`` with its own training
batch as ``example_inputs=``, and checked. Besides the hand-configured models, every causal-LM
class of the installed transformers (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) runs, on a config
derived generically from its config class (``_hf_causal_lm.py``; ``--hand-only`` leaves them out).
The checks:

1. eval- and train-mode forwards ``torch.equal`` to the native model's on every output tensor;
2. ``weights_on_backprop`` empty on a scalar of the outputs (and no ≥ 2-D parameter behind a
   matrix-product autograd node that audit does not list);
3. one training step (loss, backward, ``torch.optim.SGD``, a forward after it) finite;
4. under ``bp``: every gradient equal to the native model's on the same batch;
5. recorded: the front end of each converted op (``node.conversion_path``), ops converted,
   convert time, and a failure's first line and where it came from.

Every model runs FA (the main row) and BP (the gradient check); the ``--sample`` models run
all nine rules. Each model runs in a worker process of its own under ``--timeout`` (the
coverage sweep's worker machinery), so a hang or a crash costs one model. Rows go to
``coverage_hf.csv`` (a rerun skips the (model, rule) pairs already there; ``--retry STATUS``
reruns those), then ``COVERAGE_HF.md`` is written from the CSV.

Usage::

    python benchmarks/hf_coverage.py                      # every model: FA, BP; the sample: all rules
    python benchmarks/hf_coverage.py --rules fa --timeout 120   # FA only, as the causal-LM sweep ran
    python benchmarks/hf_coverage.py --hand-only          # only the hand-configured models
    python benchmarks/hf_coverage.py --fresh              # the same, rerunning rows already in the CSV
    python benchmarks/hf_coverage.py --quick              # one model per head, FA and BP
    python benchmarks/hf_coverage.py --models 'gpt*' 'llama' --rules fa pfa
    python benchmarks/hf_coverage.py --one mixtral        # one model in this process, rows as JSON
    python benchmarks/hf_coverage.py --models resnet --capture export --csv /tmp/x.csv --summary /tmp/X.md
    python benchmarks/hf_coverage.py --no-run             # COVERAGE_HF.md from the CSV alone

The parts: ``_hf_models.py`` (the configs and inputs), ``_hf_causal_lm.py`` (the generic
small configs of every causal-LM class, the per-type overrides and skips), ``_hf_check.py`` (the checks of one
model), ``_hf_sweep.py`` (the worker processes), ``_hf_summary.py`` and ``_hf_diagnoses.py``
(the markdown); this file is the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_rows import Status
    from _coverage_summary import repo_path
    from _hf_check import FIELDS, GRAD_MISMATCH, check_rule, check_spec, unlisted_products
    from _hf_models import QUICK, SAMPLE, SPECS, build, select
    from _hf_summary import summary_numbers, write_summary
    from _hf_sweep import ALL_RULES, ran_rows, run_one, sweep
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_rows import Status
    from benchmarks._coverage_summary import repo_path
    from benchmarks._hf_check import FIELDS, GRAD_MISMATCH, check_rule, check_spec, unlisted_products
    from benchmarks._hf_models import QUICK, SAMPLE, SPECS, build, select
    from benchmarks._hf_summary import summary_numbers, write_summary
    from benchmarks._hf_sweep import ALL_RULES, ran_rows, run_one, sweep

__all__ = [  # what this module offers beside the command line (the tests use these)
    "ALL_RULES",
    "FIELDS",
    "GRAD_MISMATCH",
    "QUICK",
    "SAMPLE",
    "SPECS",
    "Status",
    "build",
    "build_parser",
    "check_rule",
    "check_spec",
    "main",
    "ran_rows",
    "select",
    "summary_numbers",
    "unlisted_products",
    "write_summary",
]

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE / "coverage_hf.csv"
DEFAULT_SUMMARY = HERE / "COVERAGE_HF.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", metavar="GLOB", help="fnmatch globs on model names or model types")
    p.add_argument(
        "--rules", nargs="+", choices=ALL_RULES, help="rules for every model (default: fa bp; all nine on --sample)"
    )
    p.add_argument("--sample", nargs="*", default=list(SAMPLE), help="models that run every rule by default")
    p.add_argument("--quick", action="store_true", help=f"one model per head ({', '.join(QUICK)}), FA and BP")
    p.add_argument(
        "--hand-only",
        action="store_true",
        help="only the hand-configured models, not every other causal-LM class of transformers",
    )
    p.add_argument(
        "--capture",
        choices=("auto", "fx", "export", "eager"),
        default="auto",
        help="pfa_fx.convert's front end (a diagnosis: the sweep's numbers are for auto; use another --csv)",
    )
    p.add_argument("--opt", nargs="*", default=[], help="rule options key=value, passed to the rules that take them")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model (all its rules)")
    p.add_argument("--jobs", type=int, default=1, help="models checked at once, one worker process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--summary", default=str(DEFAULT_SUMMARY), help="the markdown written after the sweep")
    p.add_argument(
        "--retry", nargs="*", default=[], metavar="STATUS", help="rerun rows with these statuses (e.g. timeout crash)"
    )
    p.add_argument("--fresh", action="store_true", help="rerun every selected (model, rule), even those in the CSV")
    p.add_argument("--no-run", action="store_true", help="only (re)write the summary from the CSV")
    p.add_argument("--one", metavar="MODEL", help="check one model in this process (what each worker runs)")
    p.add_argument("--out", help="with --one: append JSON rows to this file instead of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        return run_one(args)
    minutes = "" if args.no_run else f"{sweep(args):.1f}"
    csv_path, out = Path(args.csv), Path(args.summary)
    rows = ran_rows(csv_path)
    if rows:
        write_summary(rows, out, csv_path, minutes)
        n = summary_numbers(rows)
        print(
            f"wrote {repo_path(out)}: {n['types']} model types, {n['fa_clean']}/{n['models']} clean under FA "
            f"({n['fa_clean_pct']:.1f} %)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
