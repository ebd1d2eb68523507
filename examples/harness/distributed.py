"""Processes and devices: one process, or several under ``torchrun`` (DDP or FSDP2).

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`process_group` initialises
the process group from them (gloo on CPU, nccl on CUDA) and gives the run its :class:`Dist`.
``--batch-size`` is the *global* batch (divided over ranks), the training data is sharded
(:mod:`.data`), BatchNorm running statistics are averaged over ranks before each
evaluation (:func:`average_bn_stats`), and only rank 0 records alignments and writes files.
Feedback state is drawn from ``(seed, op name)``, so it is identical on every rank without
communication; DDP is therefore built without per-forward buffer broadcasts
(:func:`wrap_ddp`).

``--fsdp`` shards instead (:func:`wrap_fsdp`): the model, converted with
``capture="modules"``, gets ``fully_shard`` per block (:func:`fsdp_blocks`), then at its
root, over a one-dimensional device mesh of all ranks. Between steps every rank holds only
its part of the weights, the feedback state and the optimizer state; whatever reads whole
tensors outside a forward (the alignment metrics) runs inside :func:`full_weights`.
Without torchrun, ``--fsdp`` runs in a one-process group of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import pfa_fx


@dataclass
class Dist:
    """This process's place in the run: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False  # the model is sharded with FSDP2 (--fsdp), not replicated under DDP

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


def setup_distributed(device: str, fsdp: bool = False) -> Dist:
    """Process group from torchrun's environment variables when WORLD_SIZE is set; with
    ``fsdp`` and no torchrun, a one-process group (FSDP2 shards over a device mesh, which
    needs one)."""
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
    elif fsdp and not dist.is_initialized():
        # an in-memory store: a group of one needs no rendezvous (no address, no port)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local_rank, dev, fsdp)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(args: argparse.Namespace) -> Iterator[Dist]:
    """Process group (under torchrun) and torch threads for the duration of a run.

    A process group that already exists (a caller running several experiments in one
    torchrun launch) is used and left in place; only one created here is destroyed."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    owned = not dist.is_initialized()
    d = setup_distributed(args.device, getattr(args, "fsdp", False))
    try:
        yield d
    finally:
        if owned:
            cleanup_distributed()
        torch.set_num_threads(threads)


def main_first(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 first (e.g. a download or writing generated data), then on the others."""
    if d.main:
        out = fn()
    d.barrier()
    if not d.main:
        out = fn()
    return out


def wrap_ddp(model: nn.Module, d: Dist) -> nn.Module:
    kwargs: dict[str, Any] = {"device_ids": [d.local_rank]} if d.device.type == "cuda" else {}
    # feedback buffers (B, G, ...) are equal on every rank by construction: no per-forward broadcast
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DDP(model, **kwargs)


def fsdp_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units :func:`wrap_fsdp` shards one by one: the model's top-level children that hold
    parameters, with plain containers (``nn.Sequential``, ``nn.ModuleList``: a ResNet's
    stages) replaced by their children (its residual blocks). Each must be *called* in the
    forward (FSDP2 gathers a unit's weights in its pre-forward hook); feedback nodes are
    left to their owner's unit, whose forward runs their ops (a node of the root stays with
    the root)."""

    def units(prefix: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, pfa_fx.FeedbackNode) or next(child.parameters(), None) is None:
                continue
            if type(child) in (nn.Sequential, nn.ModuleList) and not child._parameters:
                out += units(path, child)
            else:
                out.append((path, child))
        return out

    return units("", model)


def wrap_fsdp(model: nn.Module, d: Dist) -> nn.Module:
    """``fully_shard`` each of :func:`fsdp_blocks` and then the root (its own parameters and
    any left outside the blocks), in place, over a device mesh of all ranks. ``model``
    must come from ``pfa_fx.convert(..., capture="modules")``: each weight op then runs in
    its owner's forward, inside the owner's unit, with its feedback state in the same unit.
    Every rank builds the same model from the seed, so nothing is broadcast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for _, block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def full_weights(model: nn.Module, d: Dist) -> Iterator[None]:
    """Under ``--fsdp``, every sharded unit of ``model`` holds its whole weights (plain
    tensors) inside the block, and its shards again after: for code that reads parameters
    outside a forward (``pfa_fx.alignment``: ``node.weight``, ``node.feedback_weight()``).
    A collective: every rank enters it, even where only rank 0 reads. Without FSDP, nothing."""
    with pfa_fx.units_gathered(model) if d.fsdp else contextlib.nullcontext():
        yield


def gather(obj: Any, d: Dist) -> list[Any]:
    """``obj`` of every rank, in rank order (on every rank)."""
    if not d.distributed:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


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
