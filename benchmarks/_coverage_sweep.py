"""The coverage sweep's processes: each model checked in a worker process of its own under
a wall-clock timeout (``sweep``), its rows appended to the CSV as the worker ends, the
models already there skipped; ``--one`` checks one model in this process (``run_one``);
``--opt`` and ``--big-opts`` parsed for both (``parse_opts``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from tqdm import tqdm

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _coverage_check import check_model
    from _coverage_models import estimate_params, list_model_names
    from _coverage_rows import FIELDS, Status, finish_row, latest_rows, revision, set_revision
    from _shared import append_rows, read_rows, weights_on_backprop
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._coverage_check import check_model
    from benchmarks._coverage_models import estimate_params, list_model_names
    from benchmarks._coverage_rows import FIELDS, Status, finish_row, latest_rows, revision, set_revision
    from benchmarks._shared import append_rows, read_rows, weights_on_backprop


def parse_opts(items: Sequence[str]) -> dict[str, Any]:
    """``["expansion=1", "compact=true"]`` -> ``{"expansion": 1, "compact": True}``."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option {item!r} is not key=value")
        try:
            opts[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def _check_to_file(
    source: str,
    name: str,
    rules: Sequence[str],
    out: str,
    opts: Mapping[str, Any],
    big_params: float,
    big_opts: Mapping[str, Any],
    seed: int,
    lean_params: float | None = None,
) -> None:
    """Append one JSON row per rule to ``out``, flushed as each finishes (a timeout then
    keeps the rules already done)."""
    with open(out, "a") as f:
        for row in check_model(source, name, rules, opts, big_params, big_opts, seed, lean_params):
            f.write(json.dumps(row) + "\n")
            f.flush()


def _worker(source: str, name: str, rules: list[str], out: str, err: str, args: dict[str, Any]) -> None:
    """Entry point of a worker process: output to ``err``, rows to ``out``."""
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(args["threads"])
    set_revision(args["rev"])
    _check_to_file(
        source, name, rules, out, args["opts"], args["big_params"], args["big_opts"], args["seed"], args["lean_params"]
    )


def run_one(args: argparse.Namespace) -> int:
    """``--one SOURCE:NAME``: check one model in this process; JSON rows to ``--out`` or stdout."""
    torch.set_num_threads(args.threads)
    source, _, name = args.one.partition(":")
    if not name:
        tv_names = torchvision.models.list_models(module=torchvision.models)
        source, name = ("tv" if source in tv_names else "timm"), source
    opts, big_opts = parse_opts(args.opt), parse_opts(args.big_opts)
    if args.out:
        _check_to_file(source, name, args.rules, args.out, opts, args.big_params, big_opts, args.seed, args.lean_params)
    else:
        rows = check_model(source, name, args.rules, opts, args.big_params, big_opts, args.seed, args.lean_params)
        for row in rows:
            print(json.dumps(row), flush=True)
    return 0


@dataclass
class Job:
    source: str
    name: str
    rules: list[str]
    est: int | None = None  # parameter count estimated on the meta device (0: unknown)
    solo: bool = False
    proc: Any = None  # a multiprocessing Process
    out: Path | None = None
    err: Path | None = None
    started: float = 0.0


def _collect(job: Job, timed_out: bool, elapsed: float) -> list[dict[str, Any]]:
    """The rows the worker wrote, plus a timeout/crash row for each rule it did not reach."""
    assert job.out is not None and job.err is not None
    rows = []
    if job.out.exists():
        for line in job.out.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by the kill
                rows.append(json.loads(line))
    done = {r["rule"] for r in rows}
    missing = [r for r in job.rules if r not in done]
    if missing:
        if timed_out:
            status, reason = Status.TIMEOUT, f"no result within {elapsed:.0f} s"
        else:
            rc = job.proc.exitcode if job.proc is not None else None
            text = job.err.read_text(errors="replace") if job.err.exists() else ""
            tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
            if rc == -signal.SIGKILL:
                why += " (not by the timeout: likely out of memory)"
            status, reason = Status.CRASH, f"worker {why}" + (f": {tail[-1][:200]}" if tail else "")
        rows += [
            finish_row({"source": job.source, "model": job.name, "rule": r, "status": status, "reason": reason})
            for r in missing
        ]
    return rows


def _context() -> multiprocessing.context.BaseContext:
    """Workers fork from a server that has imported torch, torchvision, timm and pfa_fx
    once (seconds saved per model), yet each model gets a fresh process."""
    try:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torchvision", "timm", "pfa_fx", weights_on_backprop.__module__])
    except ValueError:  # no forkserver on this platform
        ctx = multiprocessing.get_context("spawn")
    return ctx


def finished_jobs(running: list[Job], timeout: float) -> list[tuple[Job, bool, float]]:
    """``(job, timed_out, elapsed)`` for each running worker that has ended or overrun
    ``timeout`` (killed), joined; the caller collects its rows and drops it from ``running``."""
    done = []
    for job in list(running):
        elapsed = time.monotonic() - job.started
        timed_out = job.proc.is_alive() and elapsed > timeout
        if timed_out:
            job.proc.kill()
            job.proc.join()
        if not job.proc.is_alive():
            job.proc.join()
            done.append((job, timed_out, elapsed))
    return done


def sweep(args: argparse.Namespace) -> None:
    csv_path = Path(args.csv)
    latest = latest_rows(read_rows(csv_path))
    done = {(r["source"], r["model"], r["rule"]) for r in latest if r["status"] not in args.retry}
    names = list_model_names(args.source, args.filter, args.every, args.limit)
    if args.no_new:  # a retry pass only: models not in the CSV yet are left for the sweep
        seen = {(r["source"], r["model"]) for r in latest}
        names = [n for n in names if tuple(n) in seen]
    jobs = [Job(src, name, [r for r in args.rules if (src, name, r) not in done]) for src, name in names]
    jobs = [j for j in jobs if j.rules]
    if len(names) > len(jobs):
        print(f"resuming: {len(names) - len(jobs)} of {len(names)} model(s) already in {csv_path}", file=sys.stderr)
    if not jobs:
        return
    ctx = _context()
    worker_args = {
        "threads": args.threads,
        "opts": parse_opts(args.opt),
        "big_params": args.big_params,
        "big_opts": parse_opts(args.big_opts),
        "seed": args.seed,
        "lean_params": args.lean_params,
        # read once, here: workers fork from a server that imported pfa_fx when the sweep
        # began, so HEAD at the time a worker checks may be a later commit than the code
        "rev": revision(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="pfa_coverage_"))
    counts: Counter[str] = Counter()
    running: list[Job] = []
    pending = list(jobs)
    bar = tqdm(total=len(jobs), unit="model", dynamic_ncols=True)
    try:
        while pending or running:
            # launch; a solo job waits for an empty machine and keeps it to itself
            while pending and len(running) < args.jobs and not any(j.solo for j in running):
                job = pending[0]
                if args.jobs > 1 and job.est is None:
                    job.est = estimate_params(job.source, job.name) or 0
                    job.solo = job.est > args.solo_params * 1e6
                if job.solo and running:
                    break
                pending.pop(0)
                job.out, job.err = tmp / f"{job.source}_{job.name}.jsonl", tmp / f"{job.source}_{job.name}.log"
                # a solo job has the machine to itself: it gets every worker's threads
                job_args = {**worker_args, "threads": args.threads * args.jobs} if job.solo else worker_args
                job.proc = ctx.Process(
                    target=_worker,
                    args=(job.source, job.name, job.rules, str(job.out), str(job.err), job_args),
                    daemon=True,
                )
                job.proc.start()
                job.started = time.monotonic()
                running.append(job)
                bar.set_postfix_str(" ".join(j.name for j in running)[:60])
            time.sleep(0.2)
            for job, timed_out, elapsed in finished_jobs(running, args.timeout):
                rows = _collect(job, timed_out, elapsed)
                append_rows(csv_path, rows, FIELDS)
                counts.update(r["status"] for r in rows)
                running.remove(job)
                bar.update(1)
                bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
                for row in rows:
                    if row["status"] != Status.PASS:
                        tqdm.write(f"{job.source}:{job.name} [{row['rule']}] {row['status']}: {row['reason'][:150]}")
    finally:
        for job in running:
            job.proc.kill()
            job.proc.join()
        bar.close()
