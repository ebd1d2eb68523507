"""The feedback node every rule builds on, and the shared helpers for drawing state.

A :class:`FeedbackNode` owns one weight op's feedback state and builds ``W_b`` from it.
The feedback op (``pfa_fx.ops``) calls ``node(W)`` inside autograd and hands ``grad_W``
back as the gradient of the returned ``W_b``; autograd through the few lines of
``build`` then gives each plastic rule its local update (DESIGN.md §2).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, name)``: same draws in every process, no communication."""
    digest = hashlib.sha256(f"pfa_fx:{seed}:{name}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def xavier_std(shape: torch.Size | tuple[int, ...]) -> float:
    """Standard deviation of Xavier init for a weight of this shape (the paper's recipe)."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))


class FeedbackNode(nn.Module):
    """Feedback state of one weight op.

    Attributes:
        rule: the rule's registered name (``"fa"``, ``"pfa"``, ...).
        groups: convolution groups; feedback never crosses a group.
    """

    rule: ClassVar[str] = ""
    #: options this rule accepts, with their defaults
    options: ClassVar[dict[str, Any]] = {}
    #: whether W_b depends on trainable state (the op then returns grad_W for it)
    plastic: ClassVar[bool] = False

    def __init__(self, weight: Tensor, *, groups: int, generator: torch.Generator, **options: Any):
        super().__init__()
        self.groups = int(groups)
        self.weight_shape = tuple(weight.shape)
        # A plain reference (not registered): the forward weight stays where the model
        # keeps it; state_dict and parameters() list it once, under its own name.
        self._weight_ref: list[Tensor] = [weight]
        self._last_weight: Tensor | None = None

    # -- what the op calls -------------------------------------------------------------
    def forward(self, weight: Tensor) -> Tensor:
        """Return ``W_b`` for the forward weight ``weight`` (autograd reaches plastic state)."""
        self._last_weight = weight.detach()
        return self.build(weight)

    def build(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public inspection API ---------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The forward weight ``W`` (the last one the op used, e.g. after standardization)."""
        if self._last_weight is not None:
            return self._last_weight
        return self._weight_ref[0].detach()

    @torch.no_grad()
    def feedback_weight(self) -> Tensor:
        """``W_b``, the weight the backward pass uses now; W's shape."""
        return self.build(self.weight).detach()

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        shape = "x".join(map(str, self.weight_shape))
        return f"rule={self.rule!r}, weight={shape}, groups={self.groups}" + (f", {opts}" if opts else "")

    # -- helpers for subclasses ----------------------------------------------------------
    @staticmethod
    def draw(shape: tuple[int, ...], generator: torch.Generator, like: Tensor, std: float) -> Tensor:
        """Gaussian draw on the CPU in float64, then cast: identical values on every device."""
        t = torch.randn(shape, generator=generator, dtype=torch.float64) * std
        return t.to(device=like.device, dtype=like.dtype)

    def _grouped(self, t: Tensor) -> Tensor:
        """View a W-shaped tensor as ``(groups, out/groups, rest)``."""
        return t.reshape(self.groups, t.shape[0] // self.groups, -1)
