"""Checkpoints and ``--resume``.

At the end of every epoch (and every ``--checkpoint-every`` steps) rank 0 writes
``--out/checkpoint.pt`` (:class:`Checkpointer`): the model's ``state_dict`` (feedback state
included: brSF's draw counter and any rule's counters live in its extra state), optimizer
and LR scheduler, every rank's torch/CUDA/numpy/python RNG states and partial epoch sums,
the position (rule, epoch, step), the rules already finished and every curve row so far.

The file (:func:`write_checkpoint`, :func:`read_checkpoint`) starts with a header (magic,
payload length, SHA-256 of the payload) followed by the ``torch.save`` payload. It is
written to a temporary file, fsynced and renamed over the old one, so a crash mid-write
leaves the previous checkpoint intact, and a truncated or damaged file is refused by name
(:class:`CheckpointError`).

Under ``--fsdp`` the checkpoint is the folder ``--out/checkpoint.dcp``
(:data:`SHARDED`): the model's and optimizer's state as every rank holds it, written by
every rank with ``torch.distributed.checkpoint`` (``get_model_state_dict``,
``get_optimizer_state_dict``), and ``harness.pt``, rank 0's file as above with everything
else (model and optimizer left out). It is written into a temporary folder, then renamed
into place (:func:`swap_in`); a crash leaves the previous folder whole. A run resumes only
from the kind of checkpoint it writes: one of the other kind is refused by name.

As the data stream is a pure function of ``(seed, epoch, sample)`` (:mod:`.data`), a
resumed run continues bit for bit as the uninterrupted run would have (on the CPU; tested
for every rule, with one and two gloo processes, in ``tests/test_resume.py``; under
``--fsdp`` in ``tests/test_resume_fsdp.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .distributed import Dist, gather
from .outputs import Layer, Recorder

CHECKPOINT = "checkpoint.pt"  # in --out
SHARDED = "checkpoint.dcp"  # in --out under --fsdp: a folder of every rank's shards and STATE
STATE = "harness.pt"  # in SHARDED: rank 0's part (the payload without model and optimizer)


class CheckpointError(SystemExit):
    """A checkpoint that cannot be resumed from (truncated, damaged, another run's); the
    message names the file and what to do."""


_MAGIC = b"PFA_FX-CKPT\x01"  # 12 bytes; the last one is the header's version
_HEADER = struct.Struct("<12sQ32s")  # magic, payload length, SHA-256 of the payload
_FORMAT = 1  # version of the payload's layout
# flags that do not change the trajectory: a run may be resumed with other values
_RESUME_NEUTRAL = {
    "argv", "out", "data", "download", "resume", "checkpoint_every", "no_checkpoint", "stop_after_epoch",
    "stop_after_step", "threads", "workers", "no_progress", "tensorboard",
}  # fmt: skip


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable (POSIX; not on every filesystem)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``payload``: written to a temporary file in the same
    folder, fsynced, renamed over ``path``; a crash at any point leaves the old file whole."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    header = _HEADER.pack(_MAGIC, len(data), hashlib.sha256(data).digest())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def read_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The payload of a checkpoint written by :func:`write_checkpoint`; :class:`CheckpointError`
    if the file is truncated, damaged or not such a checkpoint."""
    hint = f"delete {path} (or move it away) to start afresh"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if len(data) < _HEADER.size or not data.startswith(_MAGIC[:-1]):
        what = "truncated (shorter than its header)" if len(data) < _HEADER.size else "not a pfa_fx checkpoint"
        raise CheckpointError(f"checkpoint {path} is {what}; {hint}")
    magic, length, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CheckpointError(f"checkpoint {path} has header version {magic[-1]}, this script reads {_MAGIC[-1]}")
    body = memoryview(data)[_HEADER.size :]
    if len(body) != length:
        what = "truncated" if len(body) < length else "longer than written"
        raise CheckpointError(f"checkpoint {path} is {what}: {len(body)} of {length} payload bytes; {hint}")
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is damaged (SHA-256 mismatch); {hint}")
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as exc:  # intact bytes torch cannot read: another torch, or not ours
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc}); {hint}") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown layout; {hint}")
    return payload


def _previous(folder: Path) -> Path:
    """Where :func:`swap_in` keeps the previous folder while it renames the new one in."""
    return folder.with_name(f".{folder.name}.old")


def swap_in(tmp: Path, folder: Path) -> None:
    """Rename the complete folder ``tmp`` to ``folder``: the previous ``folder`` is first
    renamed aside (:func:`_previous`), and removed once the new one is in place. A crash
    between the two renames leaves no ``folder`` but the previous one whole aside, which
    :func:`sharded_folder` finds."""
    old = _previous(folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def sharded_folder(out: Path) -> Path | None:
    """The sharded checkpoint in ``out``: ``SHARDED``, or the previous one a crash in
    :func:`swap_in` left aside; None if there is neither."""
    folder = out / SHARDED
    for candidate in (folder, _previous(folder)):
        if (candidate / STATE).is_file():
            return candidate
    return None


def set_aside(out: Path) -> list[Path]:
    """Rename the checkpoints in ``out`` (either kind) to ``<name>.bak``, replacing older
    ``.bak`` ones, so that a run started afresh neither overwrites nor later resumes them;
    returns the new names."""
    moved = []
    for found in (out / CHECKPOINT if (out / CHECKPOINT).exists() else None, sharded_folder(out)):
        if found is None:
            continue
        backup = out / f"{found.name.lstrip('.').removesuffix('.old')}.bak"
        if backup.is_dir():
            shutil.rmtree(backup)
        os.replace(found, backup)
        moved.append(backup)
    return moved


def save_sharded(folder: Path, gm: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model's and the optimizer's state into ``folder``
    (collective; ``folder`` must not hold another checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(gm), "optimizer": get_optimizer_state_dict(gm, opt)}, checkpoint_id=folder)


def load_sharded(folder: Path, gm: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load the state :func:`save_sharded` wrote into the sharded ``gm`` and ``opt`` (every
    rank, the same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # the optimizer's template first: torch fills a stateless optimizer's with a zero-lr
    # step, whose hooks (implicit forms' alpha/beta) may move feedback state; the model's
    # state, loaded after, puts all of it back
    state = {"optimizer": get_optimizer_state_dict(gm, opt)}
    state["model"] = get_model_state_dict(gm)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(gm, state["model"])  # feedback state too, counters included (extra state)
    set_optimizer_state_dict(gm, opt, state["optimizer"])


def _plain(value: Any) -> Any:
    """Arguments as checkpoint-safe builtins (Path -> str, tuple -> list)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that shape the trajectory: a resumed run must repeat them."""
    return {k: _plain(v) for k, v in sorted(vars(args).items()) if k not in _RESUME_NEUTRAL}


def rng_state(d: Dist) -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and python RNG states."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any], d: Dist) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and d.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), d.device)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _bn_buffers(gm: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, m in gm.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for key, buf in m.named_buffers(recurse=False):
                yield f"{name}.{key}" if name else key, buf


def _rank_buffers(gm: nn.Module, d: Dist) -> dict[str, Tensor]:
    """This rank's BatchNorm running statistics, when they may differ from rank 0's: under
    DDP each rank keeps its own until :func:`average_bn_stats` at the end of the epoch, so a
    mid-epoch checkpoint needs every rank's (rank 0's are in the model's state_dict)."""
    if not d.distributed:
        return {}
    return {name: buf.detach().cpu().clone() for name, buf in _bn_buffers(gm)}


@torch.no_grad()
def load_rank_buffers(gm: nn.Module, buffers: dict[str, Tensor]) -> None:
    for name, buf in _bn_buffers(gm):
        if name in buffers:
            buf.copy_(buffers[name])


class Checkpointer:
    """Writes ``--out/checkpoint.pt`` (rank 0; the RNG states and partial sums of every rank
    are gathered first, so :meth:`save` is collective) and reads it back for ``--resume``;
    under ``--fsdp``, the folder ``--out/checkpoint.dcp`` (module docstring).

    Payload: ``format``, ``task``, ``config`` (:func:`run_config`), ``world_size``,
    ``sharded`` (written under ``--fsdp``), ``rows`` (every curve row so far), ``done``
    (rule -> result of each finished rule) and ``current``: the rule in progress (or just
    finished) with ``epoch`` (epochs completed), ``step`` (steps of the next epoch already
    taken), ``model``/``optimizer`` (None when sharded: they are the folder's DCP part) and
    ``scheduler`` state dicts, ``train_s``, ``epoch_s`` and ``ranks`` (per rank: RNG states,
    the epoch's partial loss sum and sample count, and under DDP or FSDP its BatchNorm
    running statistics, which are not sharded and differ between ranks until averaged).
    """

    def __init__(self, args: argparse.Namespace, d: Dist, task: str, rec: Recorder):
        self.args, self.d, self.task, self.rec = args, d, task, rec
        self.sharded = d.fsdp
        self.path = args.out / (SHARDED if self.sharded else CHECKPOINT)
        self.enabled = not args.no_checkpoint
        self.done: dict[str, dict[str, Any]] = {}

    def save(
        self,
        rule: str,
        gm: nn.Module,
        opt: torch.optim.Optimizer,
        sched: Any,
        *,
        epoch: int,
        step: int,
        loss_sum: float,
        seen: int,
        train_s: float,
        epoch_s: float,
        finished: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint the run after ``epoch`` epochs and ``step`` steps of the next; ``finished``
        (the rule's result) marks the rule as done."""
        if not self.enabled:
            return
        mine = {"rng": rng_state(self.d), "loss_sum": loss_sum, "seen": seen, "buffers": _rank_buffers(gm, self.d)}
        ranks = gather(mine, self.d)
        if finished is not None:
            self.done[rule] = finished
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        if self.sharded:
            if self.d.main:
                shutil.rmtree(tmp, ignore_errors=True)  # what a crash mid-write left
            self.d.barrier()
            save_sharded(tmp, gm, opt)  # returns on rank 0 once every rank's shards are written
        if self.d.main:
            done = {
                r: {**res, "layers": [[lay.name, lay.depth, list(lay.shape)] for lay in res["layers"]]}
                for r, res in self.done.items()
            }
            current = {
                "rule": rule,
                "epoch": epoch,
                "step": step,
                "finished": finished is not None,
                "model": None if self.sharded else gm.state_dict(),
                "optimizer": None if self.sharded else opt.state_dict(),
                "scheduler": sched.state_dict(),
                "train_s": train_s,
                "epoch_s": epoch_s,
                "ranks": ranks,
            }
            payload = {
                "format": _FORMAT,
                "task": self.task,
                "config": run_config(self.args),
                "world_size": self.d.world,
                "sharded": self.sharded,
                "rows": [list(r) for r in self.rec.rows],
                "done": done,
                "current": current,
            }
            if self.sharded:
                write_checkpoint(tmp / STATE, payload)  # last: a folder with STATE is complete
                swap_in(tmp, self.path)
            else:
                write_checkpoint(self.path, payload)
        self.d.barrier()  # no rank runs ahead (or exits) before the file is in place

    def load(self) -> dict[str, Any] | None:
        """Read the checkpoint for ``--resume`` (every rank): restores the curve rows and the
        finished rules; returns the state of the rule to continue, or None (start it afresh).
        Under ``--fsdp`` the returned state's ``sharded`` names the folder whose model and
        optimizer state :func:`load_sharded` loads once the model is sharded."""
        out = self.args.out
        folder = sharded_folder(out)
        if self.sharded and folder is None and (out / CHECKPOINT).exists():
            raise CheckpointError(
                f"--resume --fsdp: {out / CHECKPOINT} was written without --fsdp (whole tensors in one file); "
                "resume it without --fsdp, or start the sharded run afresh in another --out"
            )
        if not self.sharded and not self.path.exists() and folder is not None:
            raise CheckpointError(
                f"--resume: {folder} was written with --fsdp (every rank's shards); resume it with --fsdp, "
                "under torchrun with the same number of processes, or start afresh in another --out"
            )
        found = (folder / STATE if folder is not None else None) if self.sharded else self.path
        if found is None or not found.exists():
            if self.d.main:
                print(f"--resume: no {self.path} yet; starting afresh", flush=True)
            return None
        ck = read_checkpoint(found, self.d.device)
        if ck["task"] != self.task:
            raise CheckpointError(f"checkpoint {self.path} is from {ck['task']}, not {self.task}")
        if ck["world_size"] != self.d.world:
            raise CheckpointError(
                f"checkpoint {self.path} was written by {ck['world_size']} process(es), this run has {self.d.world}: "
                "the per-rank batches and random streams would differ; resume with the same number of processes"
            )
        config = run_config(self.args)
        # a flag newer than the checkpoint is absent from its config: it ran as if off
        diff = sorted(
            k
            for k in config.keys() | ck["config"].keys()
            if config.get(k) != ck["config"].get(k) and not (k not in ck["config"] and config[k] in (False, None))
        )
        if diff:
            pairs = ", ".join(f"{k}: {ck['config'].get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise CheckpointError(
                f"checkpoint {self.path} is from a run with other settings ({pairs}); "
                "resume with the same flags, or use another --out"
            )
        self.rec.rows = [tuple(r) for r in ck["rows"]]
        self.done = {
            rule: {**res, "layers": [Layer(n, dep, tuple(sh)) for n, dep, sh in res["layers"]]}
            for rule, res in ck["done"].items()
        }
        current = ck["current"]
        if self.d.main:
            where = "nothing trained yet"
            if current is not None:
                where = f"{current['rule']} after epoch {current['epoch']}" + (
                    f" and {current['step']} steps" if current["step"] else ""
                )
            print(f"--resume: {self.path} ({where}; finished: {', '.join(self.done) or 'none'})", flush=True)
        if current is None:
            return None
        if current["finished"]:  # the next rule starts afresh; carry numpy/python RNG on as before
            set_rng_state(current["ranks"][self.d.rank]["rng"], self.d)
            return None
        if self.sharded:
            current["sharded"] = folder
        return current
