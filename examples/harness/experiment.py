"""A whole run (:func:`run`): every requested rule in turn, then the outputs.

A figure script describes its experiment as a :class:`Task` (datasets, model builder,
labels). The run builds one initial network from ``--seed``, converts a copy of it to
each rule with ``pfa_fx.convert`` and trains it on the same batch order (:mod:`.train`),
so curves differ only by the rule. After every rule rank 0 rewrites ``curves.csv``, the
figure and ``summary.json``, so a long run that stops early leaves usable outputs;
``--resume`` continues from the checkpoint (:mod:`.checkpoint`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import figure
from .checkpoint import Checkpointer, set_aside
from .distributed import Dist
from .outputs import Recorder, format_table, summarize
from .train import train_rule


@dataclass
class Task:
    """What a figure script provides: datasets, model builder, labels."""

    name: str  # file stem of the figure, e.g. "cifar10_fig4"
    title: str  # figure title prefix
    train_set: Dataset
    test_set: Dataset
    build_model: Callable[[], nn.Module]  # called after torch.manual_seed(seed)
    data_source: str
    reference_error: dict[str, float] = field(default_factory=dict)  # published top-1 error (%) per rule
    reference_source: str = ""


def run(args: argparse.Namespace, d: Dist, task: Task) -> dict[str, Any] | None:
    """Train every rule, write ``curves.csv``, ``<task.name>.png`` and ``summary.json`` (rank 0).

    Checkpoints to ``--out/checkpoint.pt`` as it goes; ``--resume`` continues from there.
    Returns the summary on rank 0, None elsewhere and when stopped early (hidden
    ``--stop-after-*`` flags)."""
    if d.main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(
            f"{task.name}: data {task.data_source} ({len(task.train_set)} train / {len(task.test_set)} test); "
            f"rules {' '.join(args.rules)}; {args.epochs} epochs; world size {d.world}{' (FSDP)' if d.fsdp else ''}; "
            f"device {d.device}",
            flush=True,
        )
    d.barrier()  # --out exists before any rank looks for a checkpoint in it
    torch.manual_seed(args.seed)
    init = task.build_model()
    if args.sync_bn:
        if d.device.type != "cuda":
            raise SystemExit("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on CPU)")
        init = nn.SyncBatchNorm.convert_sync_batchnorm(init)
    rec = Recorder(args.seed, args.out / "curves.csv" if d.main else None)
    ckpt = Checkpointer(args, d, task.name, rec)
    resume = None
    if args.resume:
        resume = ckpt.load()
    elif d.main and ckpt.enabled:  # a forgotten --resume must not cost a long run
        for backup in set_aside(args.out):  # either kind: a later --resume must not find a stale one
            print(f"note: starting afresh (no --resume); the previous checkpoint is now {backup}", flush=True)
    info: dict[str, Any] = {rule: ckpt.done[rule] for rule in args.rules if rule in ckpt.done}
    summary = None
    for rule in args.rules:
        if rule in info:  # finished before the restart
            continue
        state = resume if resume is not None and resume["rule"] == rule else None
        result = train_rule(init, rule, task, args, d, rec, ckpt, state)
        if result.get("stopped"):
            if d.main:
                where = f"epoch {result['epoch']}" + (f" and {result['step']} steps" if result["step"] else "")
                print(f"stopped in {rule} after {where}; {ckpt.path} holds the run: add --resume", flush=True)
            return None
        info[rule] = result
        if d.main:  # after every rule, so a long run leaves usable outputs if it stops early
            summary = _write_outputs(rec, task, args, info, d, rule)
        d.barrier()
    if not d.main:
        return None
    if summary is None:  # every rule had finished before this (resumed) run
        summary = _write_outputs(rec, task, args, info, d)
    print(format_table(summary))
    print(f"wrote {args.out}/curves.csv, {task.name}.png, summary.json")
    return summary


def _write_outputs(
    rec: Recorder, task: Task, args: argparse.Namespace, info: dict[str, Any], d: Dist, last: str | None = None
) -> dict[str, Any]:
    """curves.csv, the figure and summary.json for the rules in ``info``; returns the summary."""
    rec.write()
    layers = info[last or next(reversed(info))]["layers"]
    # through the module, not a name bound at import: tests replace figure.plot to skip drawing
    figure.plot(rec.rows, task, args, list(info), layers, args.out / f"{task.name}.png")
    summary = summarize(rec.rows, task, args, info, d)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
