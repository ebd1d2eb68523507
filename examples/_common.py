"""Shared by ``cifar10_fig4.py`` and ``imagenet_fig5.py``: flags, (distributed) training
loop, per-epoch metrics, CSV, figure and summary.

One run trains every requested rule in turn from the same initial network (one model
built from ``--seed``, converted per rule with ``pfa_fx.convert``), with the same batch
order, and records per epoch:

- ``test_acc``, ``test_acc5``, ``test_loss`` on the whole test/val set (sharded over
  ranks and summed), ``train_loss`` (mean minibatch loss of the epoch, over all ranks),
  ``lr``, ``weight_decay``, ``epoch_time_s``;
- per converted op (``layer`` = op name, ``depth`` = its position in the network, 1 =
  the stem conv): ``angle_deg`` and ``norm_ratio`` between ``W`` and the feedback ``W_b``
  (``pfa_fx.alignment``; path alignment ``B·R`` vs ``W`` for PFA/PFA-o), and
  ``grad_angle_deg``, the angle between the rule's weight update and BP's on one fixed
  batch of test images (``pfa_fx.gradient_alignment``, run in eval mode so BatchNorm
  uses its running statistics and the two passes see the same function).

Epoch 0 is the initial model (no ``train_loss``). Distributed: ``torchrun`` sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the process group is initialised from them (gloo
on CPU, nccl on CUDA), ``--batch-size`` is the *global* batch (divided over ranks), data
is sharded with ``DistributedSampler``, BatchNorm running statistics are averaged over
ranks before each evaluation, and only rank 0 records alignments and writes files (the
gradient-alignment probe runs on every rank, so that ranks stay identical whatever it
does to a rule's state).
Feedback state is drawn from ``(seed, op name)``, so it is identical on every rank
without communication; DDP is built without per-forward buffer broadcasts.

Checkpoints and ``--resume``. At the end of every epoch (and every ``--checkpoint-every``
steps) rank 0 writes ``--out/checkpoint.pt``: the model's ``state_dict`` (feedback state
included: brSF's draw counter and any rule's counters live in its extra state), optimizer
and LR scheduler, every rank's torch/CUDA/numpy/python RNG states and partial epoch sums,
the position (rule, epoch, step), the rules already finished and every curve row so far.
It is written to a temporary file, fsynced and renamed over the old one, and starts with
a header (magic, payload length, SHA-256), so a crash mid-write leaves the previous
checkpoint intact and a truncated or damaged file is refused by name. The data stream is
a pure function of ``(seed, epoch, sample)``: the sampler's order comes from ``(seed,
epoch)`` and each training sample's random augmentation runs under torch's RNG seeded by
``(seed, epoch, index)`` (then restored), whatever process or DataLoader worker loads it.
A resumed run therefore skips the steps already taken without loading them and continues
bit for bit as the uninterrupted run would have (on the CPU; tested for every rule, with
one and two gloo processes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import random
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

import pfa_fx
from pfa_fx.theory import predicted_path_angle

#: display and default order of the rules; any rule pfa_fx registers that is not listed
#: here follows in registry order, so a new rule is trainable without editing this file
RULE_ORDER = ("bp", "fa", "dfa", "sf", "kp", "wm", "pal", "pfa", "pfa-o")
RULES: tuple[str, ...] = tuple(r for r in RULE_ORDER if r in pfa_fx.RULES) + tuple(
    r for r in pfa_fx.RULES if r not in RULE_ORDER
)
_PALETTE = {
    "bp": "black",
    "fa": "tab:red",
    "dfa": "tab:pink",
    "sf": "tab:orange",
    "kp": "tab:green",
    "wm": "tab:olive",
    "pal": "tab:cyan",
    "pfa": "tab:blue",
    "pfa-o": "tab:purple",
}
_SPARE = ("tab:brown", "tab:gray", "gold", "navy", "teal", "maroon")
COLORS: dict[str, str] = _PALETTE | {
    rule: _SPARE[i % len(_SPARE)] for i, rule in enumerate(r for r in RULES if r not in _PALETTE)
}
CSV_HEADER = ("seed", "rule", "epoch", "metric", "layer", "depth", "value")
CHECKPOINT = "checkpoint.pt"  # in --out
# torch.compile modes --compile accepts (``--compile`` alone: "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
Row = tuple[int, str, int, str, str, str, float]


# ----------------------------------------------------------------------------- arguments
@dataclass
class Defaults:
    """Per-script defaults for the shared flags (the paper's recipe for that figure)."""

    out: str
    epochs: int
    lr: float
    batch_size: int
    milestones: list[int]
    workers: int
    align_batch: int = 128


def add_common_args(p: argparse.ArgumentParser, d: Defaults) -> None:
    p.add_argument("--rules", nargs="+", choices=RULES, default=None, help="rules to train (default: all of pfa_fx.RULES; smoke: bp pfa)")  # fmt: skip
    p.add_argument("--data", type=Path, default=None, help="dataset root")
    p.add_argument("--out", type=Path, default=Path(d.out), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="initial weights, feedback state, batch order")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs per rule (default {d.epochs}; smoke: 1)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--lr-rule", action="append", default=[], metavar="RULE=LR", help="learning rate for one rule instead of --lr (repeatable; the paper tunes it per rule)")  # fmt: skip
    p.add_argument("--schedule", choices=("step", "cosine", "constant"), default="step", help="lr schedule (per epoch)")
    p.add_argument("--milestones", type=int, nargs="*", default=d.milestones, help="step schedule: epochs where lr *= --gamma")  # fmt: skip
    p.add_argument("--gamma", type=float, default=0.1, help="step schedule factor")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (divided over ranks)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.01, help="weight decay during the first --wd-epochs")
    p.add_argument("--wd-factor", type=float, default=0.01, help="weight decay is multiplied by this afterwards")
    p.add_argument("--wd-epochs", type=int, default=1, help="epochs at the initial weight decay")
    p.add_argument("--expansion", type=float, default=10.0, help="n̄ / n_out for pfa and pfa-o")
    p.add_argument("--explicit-r", action="store_true", help="PFA keeps the explicit R (n̄ x n_in) instead of the compact S (exact under SGD)")  # fmt: skip
    p.add_argument("--sf-variant", choices=("usf", "frsf", "brsf"), default="usf", help="sign-concordant variant")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per process")
    p.add_argument("--align-batch", type=int, default=d.align_batch, help="test images in the fixed gradient-alignment batch")  # fmt: skip
    p.add_argument("--limit-steps", type=int, default=None, help="cap on training steps per epoch (quick trials)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast the training forward to bf16")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and inputs")
    p.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES, metavar="MODE", help=f"torch.compile the training model; MODE: {', '.join(COMPILE_MODES)} (default when left out)")  # fmt: skip
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks (CUDA only), applied before convert")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: torch's; smoke: 1)"
    )
    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        help="TensorBoard dir (needs tensorboard); also writes --out/alignment_<rule>.csv via pfa_fx.AlignmentLogger",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--smoke", action="store_true", help="seconds-long run on generated data (CI)")
    p.add_argument("--resume", action="store_true", help=f"continue from --out/{CHECKPOINT} (starts afresh if there is none)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS", help=f"also write --out/{CHECKPOINT} every STEPS training steps (0: at the end of every epoch only)")  # fmt: skip
    p.add_argument("--no-checkpoint", action="store_true", help=f"write no {CHECKPOINT}")
    # for tests: leave cleanly, right after writing the checkpoint, as a killed job would have left it;
    # epochs and steps count over the rules in turn (rule i's epoch e is epoch i * --epochs + e)
    p.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)


def parse_lr_rules(p: argparse.ArgumentParser, items: list[str], rules: Iterable[str]) -> dict[str, float]:
    """``["pfa=0.05", "fa=0.01"]`` -> ``{"pfa": 0.05, "fa": 0.01}``; ``p.error`` on a bad item."""
    out: dict[str, float] = {}
    for item in items:
        rule, sep, value = item.partition("=")
        rule = rule.strip()
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not sep or rule not in rules or not (math.isfinite(lr) and lr > 0):
            p.error(f"--lr-rule {item!r}: expected RULE=LR with RULE one of {', '.join(rules)} and LR > 0")
        out[rule] = lr
    return out


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, defaults: Defaults) -> argparse.Namespace:
    if args.epochs is None:
        args.epochs = 1 if args.smoke else defaults.epochs
    if args.rules is None:
        args.rules = ["bp", "pfa"] if args.smoke else list(RULES)
    args.lr_rule = parse_lr_rules(p, args.lr_rule, RULES)
    if args.threads is None and args.smoke:
        args.threads = 1  # small convs on a shared CPU: more threads only oversubscribe it
    args.rules = list(dict.fromkeys(args.rules))
    for flag in ("epochs", "batch_size", "align_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        print("note: tensorboard is not installed; --tensorboard writes only the alignment_<rule>.csv files")
    if args.wd_epochs < 0 or args.workers < 0:
        p.error("--wd-epochs and --workers must be >= 0")
    if args.limit_steps is not None and args.limit_steps < 1:
        p.error("--limit-steps must be >= 1")
    if args.checkpoint_every < 0:
        p.error("--checkpoint-every must be >= 0")
    if args.no_checkpoint and (args.checkpoint_every or args.stop_after_epoch or args.stop_after_step):
        p.error("--no-checkpoint excludes --checkpoint-every (and stopping to resume)")
    return args


def rule_lr(rule: str, args: argparse.Namespace) -> float:
    """The rule's learning rate: ``--lr-rule RULE=LR`` if given, else ``--lr``."""
    return args.lr_rule.get(rule, args.lr)


def rule_options(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    if rule in ("pfa", "pfa-o"):
        return {"expansion": args.expansion, "compact": not args.explicit_r}
    if rule == "sf":
        return {"variant": args.sf_variant}
    return {}


def xavier_init_(model: nn.Module) -> nn.Module:
    """The paper's recipe: Xavier-uniform weights and zero biases for every conv and linear."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: str) -> Dist:
    """Process group from torchrun's environment variables when WORLD_SIZE is set."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def main_first(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 first (e.g. a download or writing generated data), then on the others."""
    if d.main:
        out = fn()
    d.barrier()
    if not d.main:
        out = fn()
    return out


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(model)`` in ``mode`` (``"default"``: torch's default mode)."""
    return torch.compile(model, mode=None if mode == "default" else mode)


def _ddp(model: nn.Module, d: Dist) -> nn.Module:
    kwargs: dict[str, Any] = {"device_ids": [d.local_rank]} if d.device.type == "cuda" else {}
    # feedback buffers (B, G, ...) are equal on every rank by construction: no per-forward broadcast
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DDP(model, **kwargs)


@torch.no_grad()
def average_bn_stats(model: nn.Module, d: Dist) -> None:
    """Average BatchNorm running statistics over ranks so every rank evaluates the same model."""
    if not d.distributed:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf /= d.world


# ----------------------------------------------------------------------------- data stream
def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers (seed, epoch, index, ...): unrelated streams for
    neighbouring tuples, the same in every process."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SeededItems(Dataset):
    """``dataset[index]`` loaded under torch's RNG seeded by ``(seed, epoch, index)`` and restored after.

    A sample's random augmentation (RandomCrop, flips: torchvision draws from torch's
    RNG) thus depends on nothing else: not on the DataLoader worker that loads it, nor on
    what was drawn before it, nor on the process's own RNG, which stays untouched. That
    is what lets a resumed run skip the steps already taken without loading them, and
    makes results independent of ``--workers``. Keys come from :class:`EpochSampler`.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        # the CPU generator only (torch.manual_seed would also reseed every CUDA device,
        # 40x slower): a few microseconds a sample
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(mix_seed("augment", self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            gen.set_state(saved)


class EpochSampler(Sampler):
    """This rank's shard of the epoch's permutation (``DistributedSampler``, seeded by
    ``(seed, epoch)``, drop_last) as ``(epoch, index)`` keys for :class:`SeededItems`,
    optionally without its first ``skip`` samples (a run resumed mid-epoch)."""

    def __init__(self, dataset: Dataset, d: Dist, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed, drop_last=True)  # fmt: skip
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in itertools.islice(iter(self.inner), self.skip, None))


# ----------------------------------------------------------------------------- checkpoints
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
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; not on every filesystem)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
def _load_rank_buffers(gm: nn.Module, buffers: dict[str, Tensor]) -> None:
    for name, buf in _bn_buffers(gm):
        if name in buffers:
            buf.copy_(buffers[name])


def _gather(obj: Any, d: Dist) -> list[Any]:
    """``obj`` of every rank, in rank order (on every rank)."""
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Writes ``--out/checkpoint.pt`` (rank 0; the RNG states and partial sums of every rank
    are gathered first, so :meth:`save` is collective) and reads it back for ``--resume``.

    Payload: ``format``, ``task``, ``config`` (:func:`run_config`), ``world_size``,
    ``rows`` (every curve row so far), ``done`` (rule -> result of each finished rule) and
    ``current``: the rule in progress (or just finished) with ``epoch`` (epochs completed),
    ``step`` (steps of the next epoch already taken), ``model``/``optimizer``/``scheduler``
    state dicts, ``train_s``, ``epoch_s`` and ``ranks`` (per rank: RNG states, the epoch's
    partial loss sum and sample count, and under DDP its BatchNorm running statistics).
    """

    def __init__(self, args: argparse.Namespace, d: Dist, task: str, rec: Recorder):
        self.args, self.d, self.task, self.rec = args, d, task, rec
        self.path = args.out / CHECKPOINT
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
        ranks = _gather(mine, self.d)
        if finished is not None:
            self.done[rule] = finished
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
                "model": gm.state_dict(),
                "optimizer": opt.state_dict(),
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
                "rows": [list(r) for r in self.rec.rows],
                "done": done,
                "current": current,
            }
            write_checkpoint(self.path, payload)
        self.d.barrier()  # no rank runs ahead (or exits) before the file is in place

    def load(self) -> dict[str, Any] | None:
        """Read the checkpoint for ``--resume`` (every rank): restores the curve rows and the
        finished rules; returns the state of the rule to continue, or None (start it afresh)."""
        if not self.path.exists():
            if self.d.main:
                print(f"--resume: no {self.path} yet; starting afresh", flush=True)
            return None
        ck = read_checkpoint(self.path, self.d.device)
        if ck["task"] != self.task:
            raise CheckpointError(f"checkpoint {self.path} is from {ck['task']}, not {self.task}")
        if ck["world_size"] != self.d.world:
            raise CheckpointError(
                f"checkpoint {self.path} was written by {ck['world_size']} process(es), this run has {self.d.world}: "
                "the per-rank batches and random streams would differ; resume with the same number of processes"
            )
        config = run_config(self.args)
        diff = sorted(k for k in config.keys() | ck["config"].keys() if config.get(k) != ck["config"].get(k))
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
        return current


# ----------------------------------------------------------------------------- task
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


# ----------------------------------------------------------------------------- training
def _to(x: Tensor, d: Dist, channels_last: bool) -> Tensor:
    x = x.to(d.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _autocast(args: argparse.Namespace, d: Dist) -> contextlib.AbstractContextManager:
    if args.amp == "bf16":
        return torch.autocast(d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(args: argparse.Namespace, epoch: int) -> float:
    """Multiplier of --lr during (0-based) epoch ``epoch``."""
    if args.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    if args.schedule == "step":
        return args.gamma ** sum(epoch >= m for m in args.milestones)
    return 1.0


@torch.no_grad()
def evaluate(gm: nn.Module, loader: DataLoader, args: argparse.Namespace, d: Dist) -> tuple[float, float, float]:
    """(mean cross-entropy, top-1, top-5 accuracy) over the whole test set, all ranks together."""
    gm.eval()
    loss, top1, top5, n = 0.0, 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = _to(x, d, args.channels_last), y.to(d.device, non_blocking=True)
        with _autocast(args, d):
            out = gm(x)
        out = out.float()
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        top1 += float((top[:, 0] == y).sum())
        top5 += float((top == y[:, None]).any(1).sum())
        n += len(y)
    loss, top1, top5, n = d.all_sum([loss, top1, top5, n])
    return loss / max(n, 1), top1 / max(n, 1), top5 / max(n, 1)


@dataclass
class Layer:
    name: str
    depth: int
    shape: tuple[int, ...]


def layer_table(gm: nn.Module) -> list[Layer]:
    """Converted ops in network order (depth 1 = first op)."""
    return [Layer(n, i, tuple(node.weight.shape)) for i, (n, node) in enumerate(pfa_fx.feedback_modules(gm), start=1)]


class Recorder:
    """Collects rows; writes the CSV (rank 0 only)."""

    def __init__(self, seed: int, path: Path | None):
        self.seed, self.path, self.rows = seed, path, []

    def scalar(self, rule: str, epoch: int, **metrics: float) -> None:
        for metric, value in metrics.items():
            self.rows.append((self.seed, rule, epoch, metric, "", "", float(value)))

    def layers(self, rule: str, epoch: int, metric: str, values: dict[str, float], layers: list[Layer]) -> None:
        for lay in layers:
            if lay.name in values:
                self.rows.append((self.seed, rule, epoch, metric, lay.name, str(lay.depth), float(values[lay.name])))

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_HEADER)
            w.writerows(self.rows)
        tmp.replace(self.path)


def fixed_batch(dataset: Dataset, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` test images (deterministic transform): the gradient-alignment batch."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def gradient_angles(gm: nn.Module, batch: tuple[Tensor, Tensor], args: argparse.Namespace, d: Dist) -> dict[str, float]:
    """Angle per op between the rule's weight update and BP's on the fixed batch (fp32, eval mode).

    Run on every rank, not only the one that records it, so that whatever the probe does
    to a rule's state stays the same on all ranks (``pfa_fx.gradient_alignment`` puts
    per-batch counters such as brSF's draw index back, so training's streams do not move).
    """
    x, y = _to(batch[0], d, args.channels_last), batch[1].to(d.device)
    gm.eval()
    return pfa_fx.gradient_alignment(gm, lambda: F.cross_entropy(gm(x), y))


def _mean(values: Any) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def train_rule(
    init: nn.Module,
    rule: str,
    task: Task,
    args: argparse.Namespace,
    d: Dist,
    rec: Recorder,
    ckpt: Checkpointer,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert a copy of ``init`` to ``rule``, train it and record its curves; returns timing info.

    ``state`` (``Checkpointer.load``) continues the rule from a checkpoint; the result then
    matches an uninterrupted run's bit for bit on the CPU. ``"stopped"`` in the result: the
    run left early (``--stop-after-epoch``/``--stop-after-step``) after checkpointing.
    """
    torch.manual_seed(args.seed + d.rank)  # model-side randomness (e.g. dropout): same for every rule
    gm = pfa_fx.convert(copy.deepcopy(init), rule, seed=args.seed, **rule_options(rule, args))
    gm.to(d.device)
    if args.channels_last:
        gm.to(memory_format=torch.channels_last)
    layers = layer_table(gm)
    lr = rule_lr(rule, args)
    order = args.rules.index(rule)  # the hidden --stop-after-* flags count epochs and steps over all rules
    opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(args, e))
    if state is not None:  # before DDP (which broadcasts rank 0's weights) and torch.compile
        gm.load_state_dict(state["model"])  # feedback state too, counters included (extra state)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    model = _ddp(gm, d) if d.distributed else gm
    if state is not None:  # after DDP, whose construction copies rank 0's buffers to every rank
        _load_rank_buffers(gm, state["ranks"][d.rank]["buffers"])
    step_model = compile_model(model, args.compile) if args.compile else model

    per_rank = max(1, args.batch_size // d.world)
    sampler = EpochSampler(task.train_set, d, args.seed)
    cuda = d.device.type == "cuda"
    loader = DataLoader(
        SeededItems(task.train_set, args.seed),
        batch_size=per_rank,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=cuda,
        drop_last=True,
        generator=torch.Generator(),  # reseeded per epoch: workers' seeds are a function of (seed, epoch, rank)
    )
    test_loader = DataLoader(
        Subset(task.test_set, range(d.rank, len(task.test_set), d.world)),
        batch_size=per_rank * 2,
        num_workers=args.workers,
        pin_memory=cuda,
    )
    steps = len(loader) if args.limit_steps is None else min(len(loader), args.limit_steps)
    if steps == 0:
        raise SystemExit(f"{len(task.train_set)} training images < one global batch of {args.batch_size}")
    align_batch = fixed_batch(task.test_set, args.align_batch)
    tb = None
    if args.tensorboard is not None and d.main:
        tb = _alignment_logger(args, rule, state)

    def log_epoch(epoch: int, **scalars: float) -> dict[str, Any]:
        test_loss, acc, acc5 = evaluate(gm, test_loader, args, d)
        info: dict[str, Any] = {"test_acc": acc, "test_loss": test_loss}
        grad = gradient_angles(gm, align_batch, args, d)
        if d.main:
            align = pfa_fx.alignment(gm)  # may leave ops out (DFA has no W-shaped feedback)
            rec.scalar(rule, epoch, test_acc=acc, test_acc5=acc5, test_loss=test_loss, **scalars)
            rec.layers(rule, epoch, "angle_deg", {k: a for k, (a, _) in align.items()}, layers)
            rec.layers(rule, epoch, "norm_ratio", {k: r for k, (_, r) in align.items()}, layers)
            rec.layers(rule, epoch, "grad_angle_deg", grad, layers)
            info |= {"angle": _mean(a for a, _ in align.values()), "grad": _mean(grad.values())}
            if tb is not None:
                tb.log(epoch, gm, extra={"test_acc": acc, "test_loss": test_loss, **scalars}, gradient_angles=grad)
            rec.write()
        return info

    start = time.perf_counter()
    first, skip, train_s = 1, 0, 0.0
    if state is None:
        log_epoch(0, lr=lr, weight_decay=args.weight_decay)
    else:  # epoch 0 and every epoch up to state["epoch"] are in the restored rows
        first, skip, train_s = state["epoch"] + 1, state["step"], state["train_s"]
        # last, so nothing above (conversion, data setup) moves the restored streams
        set_rng_state(state["ranks"][d.rank]["rng"], d)
    bar = tqdm(
        total=args.epochs * steps,
        initial=(first - 1) * steps + skip,
        desc=f"{task.name} {rule}",
        unit="step",
        disable=args.no_progress or not d.main,
    )
    diverged, stopped, info, where = False, False, {}, {}
    for epoch in range(first, args.epochs + 1):
        mid = state is not None and epoch == first and skip > 0  # resuming inside this epoch
        if epoch == args.wd_epochs + 1 and not mid:  # (a mid-epoch checkpoint has it applied already)
            for group in opt.param_groups:
                group["weight_decay"] *= args.wd_factor
        lr_now, wd = opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
        sampler.set_epoch(epoch, skip=skip * per_rank)
        loader.generator.manual_seed(mix_seed("loader", args.seed, epoch, d.rank))
        gm.train()
        total = torch.zeros((), dtype=torch.float64, device=d.device)
        seen, epoch_s = 0, 0.0
        if mid:
            mine = state["ranks"][d.rank]
            total += mine["loss_sum"]  # float64 -> float64: exact
            seen, epoch_s = mine["seen"], state["epoch_s"]
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader, start=skip):
            if i == steps:
                break
            x, y = _to(x, d, args.channels_last), y.to(d.device, non_blocking=True)
            with _autocast(args, d):
                loss = F.cross_entropy(step_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(y)
            seen += len(y)
            bar.update()
            if i % 20 == 0 and not args.no_progress and d.main:
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3g}", refresh=False)
            done_steps = (epoch - 1) * steps + i + 1
            stop_here = args.stop_after_step == (order * args.epochs * steps + done_steps)
            if i + 1 < steps and (stop_here or (args.checkpoint_every and done_steps % args.checkpoint_every == 0)):
                now = time.perf_counter()
                ckpt.save(rule, gm, opt, sched, epoch=epoch - 1, step=i + 1, loss_sum=float(total), seen=seen,
                          train_s=train_s, epoch_s=epoch_s + now - t0)  # fmt: skip
                t0 += time.perf_counter() - now  # writing is not training time
                if stop_here:
                    stopped, where = True, {"epoch": epoch - 1, "step": i + 1}
                    break
        skip = 0
        if stopped:
            break
        sched.step()
        loss_sum, n = d.all_sum([float(total), float(seen)])
        train_loss = loss_sum / max(n, 1)
        epoch_s += time.perf_counter() - t0
        train_s += epoch_s
        average_bn_stats(gm, d)
        info = log_epoch(epoch, train_loss=train_loss, lr=lr_now, weight_decay=wd, epoch_time_s=epoch_s)
        bar.set_postfix(epoch=epoch, loss=f"{train_loss:.3g}", acc=f"{info['test_acc']:.3f}", refresh=True)
        diverged = not math.isfinite(train_loss)
        finished = None
        if diverged or epoch == args.epochs:
            finished = {"train_s": train_s, "total_s": time.perf_counter() - start, "diverged": diverged, "layers": layers}  # fmt: skip
        ckpt.save(rule, gm, opt, sched, epoch=epoch, step=0, loss_sum=0.0, seen=0, train_s=train_s, epoch_s=0.0, finished=finished)  # fmt: skip
        if diverged:
            if d.main:
                tqdm.write(f"warning: {rule} diverged at epoch {epoch} (train loss {train_loss}); stopping this rule")
            break
        run_epoch = order * args.epochs + epoch
        if args.stop_after_epoch == run_epoch or args.stop_after_step == run_epoch * steps:
            stopped, where = True, {"epoch": epoch, "step": 0}
            break
    bar.close()
    if tb is not None:
        tb.close()
    if stopped:
        return {"stopped": True, **where}
    if d.main:
        extra = f", mean W-W_b angle {info['angle']:.1f}°, mean grad angle {info['grad']:.1f}°"
        tqdm.write(f"{rule}: test acc {100 * info['test_acc']:.2f}%{extra} ({train_s:.1f} s training)")
    return {"train_s": train_s, "total_s": time.perf_counter() - start, "diverged": diverged, "layers": layers}


def _alignment_logger(args: argparse.Namespace, rule: str, state: dict[str, Any] | None) -> Any:
    """``pfa_fx.AlignmentLogger`` for ``rule``; when resuming, its CSV keeps the rows of the
    epochs the checkpoint covers (the logger itself always starts a new file)."""
    path = args.out / f"alignment_{rule}.csv"
    kept: list[list[str]] = []
    if state is not None and path.exists():
        with path.open(newline="") as f:
            kept = [row for row in itertools.islice(csv.reader(f), 1, None) if row and int(row[0]) <= state["epoch"]]
    tb = pfa_fx.AlignmentLogger(path, tensorboard_dir=args.tensorboard / rule)
    writer = getattr(tb, "_csv", None)  # private, but the only way to append through the open logger
    if kept and writer is not None:
        writer.writerows(kept)
    return tb


# ----------------------------------------------------------------------------- outputs
def curve(rows: list[Row], rule: str, metric: str, layer: str = "") -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r[2], r[6]) for r in rows if r[1] == rule and r[3] == metric and r[4] == layer)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def per_layer(rows: list[Row], rule: str, metric: str, epoch: int) -> dict[str, float]:
    return {r[4]: r[6] for r in rows if r[1] == rule and r[3] == metric and r[2] == epoch and r[4]}


def last_epoch(rows: list[Row], rule: str) -> int:
    return max((r[2] for r in rows if r[1] == rule and r[3] == "test_acc"), default=0)


def mean_over_layers(rows: list[Row], rule: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    by_epoch: dict[int, list[float]] = {}
    for r in rows:
        if r[1] == rule and r[3] == metric and r[4]:
            by_epoch.setdefault(r[2], []).append(r[6])
    epochs = sorted(by_epoch)
    return np.array(epochs), np.array([_mean(by_epoch[e]) for e in epochs])


def pfa_floor(layer: Layer, expansion: float) -> float:
    """Theoretical path angle of converged PFA (W_b = B Bᵀ W) for this layer's shape."""
    n_in = int(np.prod(layer.shape[1:]))
    return predicted_path_angle(expansion, layer.shape[0], n_in)


def plot(
    rows: list[Row], task: Task, args: argparse.Namespace, rules: list[str], layers: list[Layer], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5), constrained_layout=True)
    (ax_acc, ax_loss, ax_mean), (ax_angle, ax_ratio, ax_grad) = axes
    depth = [lay.depth for lay in layers]
    grads = [r[6] for r in rows if r[3] == "grad_angle_deg" and math.isfinite(r[6])]
    for rule in rules:
        c = COLORS[rule]
        e, acc = curve(rows, rule, "test_acc")
        ax_acc.plot(e, 100 * acc, "-o" if len(e) < 15 else "-", ms=3, color=c, label=rule)
        if rule in task.reference_error:
            ax_acc.axhline(100 - task.reference_error[rule], color=c, ls=":", lw=1)
        e, loss = curve(rows, rule, "train_loss")
        ax_loss.plot(e, loss, "-o" if len(e) < 15 else "-", ms=3, color=c, label=rule)
        e, ang = mean_over_layers(rows, rule, "angle_deg")
        ax_mean.plot(e, ang, "-", color=c, label=f"{rule} W vs W_b")
        e, gang = mean_over_layers(rows, rule, "grad_angle_deg")
        ax_mean.plot(e, gang, "--", color=c, lw=1)
        final = last_epoch(rows, rule)
        for ax, metric in ((ax_angle, "angle_deg"), (ax_ratio, "norm_ratio"), (ax_grad, "grad_angle_deg")):
            vals = per_layer(rows, rule, metric, final)
            ax.plot(depth, [vals.get(lay.name, np.nan) for lay in layers], "-o", ms=3, color=c, label=rule)
    if "pfa" in rules:
        ax_angle.plot(depth, [pfa_floor(lay, args.expansion) for lay in layers], ":", color=COLORS["pfa"], lw=1.2, label="PFA theory (converged)")  # fmt: skip
    ax_acc.set(title="Test accuracy (top-1, %)" + (f"\ndotted: published ({task.reference_source})" if task.reference_error else ""), xlabel="epoch")  # fmt: skip
    losses = [r[6] for r in rows if r[3] == "train_loss" and math.isfinite(r[6]) and r[6] > 0]
    ax_loss.set(title="Train loss (epoch mean)", xlabel="epoch")
    if losses and max(losses) > 10 * min(losses):
        ax_loss.set_yscale("log")
    ax_mean.set(title="Mean over layers (°): angle W vs W_b (solid),\nangle of rule's vs BP's weight update, fixed batch (dashed)", xlabel="epoch", ylim=(-2, max([95.0, *grads]) + 3))  # fmt: skip
    ax_angle.set(title="Final angle W vs W_b per layer (°; path alignment for PFA)", ylim=(-2, 95))
    ax_ratio.set(title="Final norm ratio |W_b| / |W| per layer", yscale="log")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_grad.set(title="Final angle, rule's vs BP's weight update per layer (°)", ylim=(-2, max([95.0, *grads]) + 3))
    for ax in (ax_angle, ax_ratio, ax_grad):
        ax.set_xticks(depth, [lay.name for lay in layers], rotation=90, fontsize=6)
        ax.set_xlabel("layer (network order)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax in (ax_acc, ax_loss, ax_mean) and args.wd_epochs < args.epochs:
            ax.axvline(args.wd_epochs, color="grey", lw=0.8, ls=":")
    ax_acc.legend(fontsize=9)
    ax_angle.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"{task.title}: SGD lr {args.lr:g}{_lr_rule_text(args)} ({args.schedule}), batch {args.batch_size}, momentum {args.momentum:g}, "
        f"weight decay {args.weight_decay:g} for {args.wd_epochs} epoch(s) (dotted vertical) then ×{args.wd_factor:g}; "
        f"expansion {args.expansion:g}; seed {args.seed}" + (" [SMOKE: generated data]" if args.smoke else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lr_rule_text(args: argparse.Namespace) -> str:
    return "".join(f", {rule} {lr:g}" for rule, lr in args.lr_rule.items())


def summarize(rows: list[Row], task: Task, args: argparse.Namespace, info: dict[str, Any], d: Dist) -> dict[str, Any]:
    """Final numbers per rule trained so far (the keys of ``info``)."""
    per_rule = {}
    for rule in info:
        final = last_epoch(rows, rule)
        acc = curve(rows, rule, "test_acc")[1]
        angle = per_layer(rows, rule, "angle_deg", final)
        ratio = per_layer(rows, rule, "norm_ratio", final)
        grad = per_layer(rows, rule, "grad_angle_deg", final)
        per_rule[rule] = {
            "epochs_done": final,
            "test_acc": float(acc[-1]) if len(acc) else float("nan"),
            "best_test_acc": float(np.nanmax(acc)) if len(acc) else float("nan"),
            "test_error_pct": 100 * (1 - float(acc[-1])) if len(acc) else float("nan"),
            "published_error_pct": task.reference_error.get(rule),
            "lr": rule_lr(rule, args),
            "mean_angle_deg": _mean(angle.values()),
            "mean_norm_ratio": _mean(ratio.values()),
            "mean_grad_angle_deg": _mean(grad.values()),
            "angle_deg": angle,
            "norm_ratio": ratio,
            "grad_angle_deg": grad,
            "train_s": info[rule]["train_s"],
            "diverged": info[rule]["diverged"],
        }
    first = next(iter(info.values()))["layers"]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"}
    return {
        "figure": task.title,
        "command": f"python examples/{task.name}.py " + " ".join(args.argv),
        "config": config,
        "data": {"source": task.data_source, "n_train": len(task.train_set), "n_test": len(task.test_set)},
        "world_size": d.world,
        "device": str(d.device),
        "layers": [{"name": lay.name, "depth": lay.depth, "shape": list(lay.shape)} for lay in first],
        "reference_error_pct": {"source": task.reference_source, **task.reference_error},
        "rules": per_rule,
        "torch": torch.__version__,
    }


def format_table(summary: dict[str, Any]) -> str:
    head = f"{'rule':<6} | {'test err %':>10} | {'published':>9} | {'best acc %':>10} | {'angle W,W_b':>11} | {'|W_b|/|W|':>9} | {'grad angle':>10} | {'train s':>8}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for rule, r in summary["rules"].items():
        pub = f"{r['published_error_pct']:.2f}" if r["published_error_pct"] is not None else "-"
        lines.append(
            f"{rule:<6} | {r['test_error_pct']:>10.2f} | {pub:>9} | {100 * r['best_test_acc']:>10.2f} | "
            f"{r['mean_angle_deg']:>10.1f}° | {r['mean_norm_ratio']:>9.2f} | {r['mean_grad_angle_deg']:>9.1f}° | {r['train_s']:>8.1f}"
        )
    lines.append("angles and norm ratio: mean over layers at the last epoch; published: " + summary["reference_error_pct"]["source"])  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace, d: Dist, task: Task) -> dict[str, Any] | None:
    """Train every rule, write ``curves.csv``, ``<task.name>.png`` and ``summary.json`` (rank 0).

    Checkpoints to ``--out/checkpoint.pt`` as it goes; ``--resume`` continues from there.
    Returns the summary on rank 0, None elsewhere and when stopped early (hidden
    ``--stop-after-*`` flags)."""
    if d.main:
        args.out.mkdir(parents=True, exist_ok=True)
        print(
            f"{task.name}: data {task.data_source} ({len(task.train_set)} train / {len(task.test_set)} test); "
            f"rules {' '.join(args.rules)}; {args.epochs} epochs; world size {d.world}; device {d.device}",
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
    elif d.main and ckpt.enabled and ckpt.path.exists():  # a forgotten --resume must not cost a long run
        backup = ckpt.path.with_name(ckpt.path.name + ".bak")
        os.replace(ckpt.path, backup)
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
    plot(rec.rows, task, args, list(info), layers, args.out / f"{task.name}.png")
    summary = summarize(rec.rows, task, args, info, d)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


@contextlib.contextmanager
def distributed(args: argparse.Namespace) -> Iterator[Dist]:
    """Process group (under torchrun) and torch threads for the duration of a run.

    A process group that already exists (a caller running several experiments in one
    torchrun launch) is used and left in place; only one created here is destroyed."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    owned = not dist.is_initialized()
    d = setup_distributed(args.device)
    try:
        yield d
    finally:
        if owned:
            cleanup_distributed()
        torch.set_num_threads(threads)


def argv_list(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
