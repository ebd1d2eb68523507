"""The Hugging Face coverage sweep's processes: each model checked in a worker process of its
own under a wall-clock timeout, forked from a server that imported torch, transformers and
pfa_fx once; its rows appended to the CSV as the worker ends, the (model, rule) pairs already
there skipped. The job record and the timeout/crash rows are the coverage sweep's
(``_coverage_sweep.Job``, ``_collect``)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_rows import latest_rows, revision, set_revision
    from _coverage_sweep import Job, _collect, finished_jobs, parse_opts
    from _hf_check import FIELDS, SOURCE, check_spec, dumps, finish_row
    from _hf_models import SAMPLE, SPEC_BY_NAME, select
    from _shared import append_rows, read_rows, weights_on_backprop
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_rows import latest_rows, revision, set_revision
    from benchmarks._coverage_sweep import Job, _collect, finished_jobs, parse_opts
    from benchmarks._hf_check import FIELDS, SOURCE, check_spec, dumps, finish_row
    from benchmarks._hf_models import SAMPLE, SPEC_BY_NAME, select
    from benchmarks._shared import append_rows, read_rows, weights_on_backprop

#: the paper's Table 1, in its order
ALL_RULES = ("bp", "fa", "dfa", "sf", "kp", "wm", "pal", "pfa", "pfa-o")
#: every model's rules unless --rules says otherwise: FA (the main row) and BP (the gradient check)
DEFAULT_RULES = ("fa", "bp")


def rules_for(name: str, args: argparse.Namespace) -> list[str]:
    """``--rules`` where given; else FA and BP, and all nine rules for the ``--sample`` models
    (not with ``--quick``)."""
    if args.rules:
        return list(args.rules)
    if name in args.sample and not args.quick:
        return ["fa", "bp", *(r for r in ALL_RULES if r not in ("fa", "bp"))]
    return list(DEFAULT_RULES)


def _quiet() -> None:
    """A worker's torch and transformers: one thread, no transformers log noise."""
    import transformers

    transformers.logging.set_verbosity_error()


def _check_to_file(
    name: str, rules: Sequence[str], out: str, opts: dict[str, Any], seed: int, capture: str = "auto"
) -> None:
    """One JSON row per rule appended to ``out``, flushed as each finishes (a timeout then
    keeps the rules already done)."""
    with open(out, "a") as f:
        for row in check_spec(name, rules, opts, seed, capture):
            f.write(dumps(row) + "\n")
            f.flush()


def _worker(name: str, rules: list[str], out: str, err: str, args: dict[str, Any]) -> None:
    """Entry point of a worker process: output to ``err``, rows to ``out``."""
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(args["threads"])
    set_revision(args["rev"])
    _quiet()
    _check_to_file(name, rules, out, args["opts"], args["seed"], args["capture"])


def run_one(args: argparse.Namespace) -> int:
    """``--one NAME``: check one model in this process; JSON rows to ``--out`` or stdout."""
    torch.set_num_threads(args.threads)
    _quiet()
    rules = rules_for(args.one, args)
    if args.out:
        _check_to_file(args.one, rules, args.out, parse_opts(args.opt), args.seed, args.capture)
    else:
        for row in check_spec(args.one, rules, parse_opts(args.opt), args.seed, args.capture):
            print(dumps(row), flush=True)
    return 0


def _context() -> multiprocessing.context.BaseContext:
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "transformers", "pfa_fx", weights_on_backprop.__module__])
    except ValueError:  # no forkserver on this platform
        ctx = multiprocessing.get_context("spawn")
    return ctx


def _identify(row: dict[str, Any]) -> dict[str, Any]:
    """A worker's row as it is; a timeout/crash row (the coverage sweep's ``_collect`` writes
    it in that sweep's columns) in this CSV's columns, with the model's type and head."""
    if "where" in row:
        return row
    keep = {k: row[k] for k in ("source", "model", "rule", "status", "reason", "pfa_fx_rev") if row.get(k)}
    spec = SPEC_BY_NAME.get(row["model"])
    if spec is not None:
        keep.update(model_type=spec.model_type, head=spec.head, **({"class": spec.cls} if spec.cls else {}))
    return finish_row(keep)


def sweep(args: argparse.Namespace) -> float:
    """Run every selected (model, rule) not yet in the CSV; the minutes it took."""
    t0 = time.perf_counter()
    csv_path = Path(args.csv)
    latest = latest_rows(read_rows(csv_path))
    done = {
        (r["model"], r["rule"])
        for r in latest
        if r["source"] == SOURCE and r["status"] not in args.retry and not args.fresh
    }
    jobs = []
    for spec in select(args.models, args.quick, every_causal_lm=not getattr(args, "hand_only", False)):
        rules = [r for r in rules_for(spec.name, args) if (spec.name, r) not in done]
        if rules:
            jobs.append(Job(SOURCE, spec.name, rules))
    if not jobs:
        print(f"nothing to run: every selected (model, rule) is in {csv_path}", file=sys.stderr)
        return 0.0
    ctx = _context()
    worker_args = {
        "threads": args.threads,
        "opts": parse_opts(args.opt),
        "seed": args.seed,
        "capture": args.capture,
        "rev": revision(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="pfa_hf_coverage_"))
    counts: Counter[str] = Counter()
    pending, running = list(jobs), []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                job = pending.pop(0)
                job.out, job.err = tmp / f"{job.name}.jsonl", tmp / f"{job.name}.log"
                job.proc = ctx.Process(
                    target=_worker, args=(job.name, job.rules, str(job.out), str(job.err), worker_args), daemon=True
                )
                job.proc.start()
                job.started = time.monotonic()
                running.append(job)
            time.sleep(0.2)
            for job, timed_out, elapsed in finished_jobs(running, args.timeout):
                rows = [_identify(r) for r in _collect(job, timed_out, elapsed)]
                append_rows(csv_path, rows, FIELDS)
                running.remove(job)
                counts.update(r["status"] for r in rows)
                for row in rows:
                    note = f" {row['reason'][:150]}" if row["status"] != "pass" else ""
                    print(f"[{elapsed:5.0f} s] {job.name} [{row['rule']}] {row['status']}{note}", file=sys.stderr)
    finally:
        for job in running:
            job.proc.kill()
            job.proc.join()
    minutes = (time.perf_counter() - t0) / 60
    summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    print(f"sweep took {minutes:.1f} min ({len(jobs)} models): {summary}", file=sys.stderr)
    return minutes


def ran_rows(csv_path: Path) -> list[dict[str, str]]:
    """The latest row per (model, rule) of this sweep in ``csv_path``."""
    return [dict(r) for r in latest_rows(read_rows(csv_path)) if r.get("source") == SOURCE]


__all__ = ["ALL_RULES", "DEFAULT_RULES", "SAMPLE", "ran_rows", "rules_for", "run_one", "sweep"]
