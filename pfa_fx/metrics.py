"""Alignment metrics: feedback vs forward weights, rule updates vs BP's, and a logger."""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .node import gathered
from .registry import feedback_modules


def angle_and_norm_ratio(weight: Tensor, weight_b: Tensor) -> tuple[float, float]:
    """Angle in degrees between two tensors seen as vectors, and ``|W_b| / |W|``.

    The angle is ``nan`` where either tensor is zero (no direction to compare). Sharded
    tensors (FSDP2's DTensors: the weight gradients :func:`gradient_alignment` compares
    under ``fully_shard``) are gathered whole first, a collective every rank must call."""
    a = gathered(weight.detach()).double().flatten()
    b = gathered(weight_b.detach()).double().flatten().to(a.device)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan"), float(nb / na) if na != 0 else float("nan")
    cos = torch.clamp(a.dot(b) / (na * nb), -1.0, 1.0)
    return math.degrees(math.acos(float(cos))), float(nb / na)


def alignment(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{op name: (angle_degrees, norm_ratio)}`` between W and ``W_b`` for each converted op.

    For FA/SF/KP/WM/PAL this is the paper's backward–forward weight alignment; for PFA and
    PFA-o, with ``W_b = B·R``, it is the path alignment. DFA ops have no W-shaped ``W_b``
    (their input error is a projection of the output error) and are left out: compare
    their updates with BP's through :func:`gradient_alignment`.
    """
    return {
        name: angle_and_norm_ratio(node.weight, node.feedback_weight())
        for name, node in feedback_modules(model)
        if node.has_feedback_weight
    }


def floor_alignment(model: nn.Module) -> dict[str, float]:
    """``{op name: angle_degrees}`` between W and ``B·Bᵀ·W`` for each PFA / PFA-o op: the
    lowest path angle the rule can reach with its draw of ``B`` (its fixed point under weight
    decay; ~0 for PFA-o, whose ``B·Bᵀ = I``). Compare with :func:`alignment`'s angle."""
    return {
        name: angle_and_norm_ratio(node.weight, node.floor_feedback())[0]
        for name, node in feedback_modules(model)
        if callable(getattr(node, "floor_feedback", None))
    }


@contextlib.contextmanager
def backprop_mode(model: nn.Module) -> Iterator[None]:
    """Within the block, every converted op of ``model`` backpropagates with ``W`` itself
    (and leaves the rule's state untouched): the BP reference on the same weights."""
    nodes = [node for _, node in feedback_modules(model)]
    try:
        for node in nodes:
            node.as_backprop = True
        yield
    finally:
        for node in nodes:
            node.as_backprop = False


def _weight_grads(model: nn.Module, closure: Callable[[], Tensor]) -> dict[str, Tensor]:
    weights = {name: node._weight_ref[0] for name, node in feedback_modules(model)}
    params = list(model.parameters())
    saved = [p.grad for p in params]  # every .grad, feedback state's included, is restored
    for p in params:
        p.grad = None
    try:
        closure().backward()
        return {name: w.grad.detach().clone() for name, w in weights.items() if w.grad is not None}
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def gradient_alignment(model: nn.Module, closure: Callable[[], Tensor]) -> dict[str, float]:
    """Angle in degrees, per converted op, between the weight update the rule gives and
    the one BP would give on the same batch with the same weights.

    ``closure`` runs the forward and returns the loss (it is called twice; keep it
    deterministic, e.g. put the model in eval mode inside it, or reseed dropout).
    Afterwards every module's train/eval mode, every parameter ``.grad`` and per-batch
    counters (brSF's draw index) are as they were, and plastic feedback state receives no
    gradient from the BP pass. The last layer's angle is 0 by construction: its error is
    the loss gradient itself.

    An op's angle is ``nan`` where its weight gradient is zero under either rule, e.g.
    the convolutions of residual branches whose last BatchNorm starts at zero (timm and
    torchvision ResNets with ``zero_init_last``) at step 0: no error reaches them yet.
    Leave such ops out of averages (``math.isnan``), as ``numpy.nanmean`` does.

    >>> def closure():  # doctest: +SKIP
    ...     model.eval()  # BatchNorm on running statistics: both passes see the same forward
    ...     return F.cross_entropy(model(x), y)
    >>> angles = pfa_fx.gradient_alignment(model, closure)  # model's mode is restored after
    """
    # a probe must not advance per-batch randomness (brSF's draw counter): training, and
    # every DDP rank, continue with the same stream whether or not it was measured
    nodes = [node for _, node in feedback_modules(model)]
    extra = [node.get_extra_state() if _has_extra_state(node) else None for node in nodes]
    modes = [(m, m.training) for m in model.modules()]  # pre-order: parents before children
    try:
        rule = _weight_grads(model, closure)
        with backprop_mode(model):
            bp = _weight_grads(model, closure)
    finally:
        for node, state in zip(nodes, extra):
            if state is not None:
                node.set_extra_state(state)
        _restore_modes(modes)
    return {name: angle_and_norm_ratio(bp[name], rule[name])[0] for name in rule if name in bp}


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put each module back in its mode through ``train()`` (a converted model switches its
    graph there), parents first, so that a child kept in another mode (a frozen BatchNorm
    in eval) is set after its parent."""
    for m, training in modes:
        if m.training != training:
            m.train(training)


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).get_extra_state is not nn.Module.get_extra_state


class AlignmentLogger:
    """Record alignment metrics during training to a CSV file (long format: step, metric,
    op, value), and to TensorBoard when ``tensorboard`` is installed and ``tensorboard_dir``
    is given.

    >>> log = AlignmentLogger("runs/align.csv")                     # doctest: +SKIP
    >>> log.log(step, model, extra={"loss": loss.item()})           # doctest: +SKIP
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(["step", "metric", "op", "value"])
        self._tb: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(
        self,
        step: int,
        model: nn.Module,
        extra: dict[str, float] | None = None,
        gradient_angles: dict[str, float] | None = None,
    ) -> None:
        rows = []
        for op, (angle, ratio) in alignment(model).items():
            rows += [("angle_deg", op, angle), ("norm_ratio", op, ratio)]
        for op, angle in (gradient_angles or {}).items():
            rows.append(("grad_angle_deg", op, angle))
        for key, value in (extra or {}).items():
            rows.append((key, "", value))
        for metric, op, value in rows:
            self._csv.writerow([step, metric, op, value])
            if self._tb is not None:
                self._tb.add_scalar(f"{metric}/{op}" if op else metric, value, step)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> AlignmentLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
