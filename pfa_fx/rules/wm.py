"""Weight mirror (Akrout et al. 2019): ``W_b`` plastic, learned from noise, with no data.

One *mirror step* of an op (no grad; nothing else of the model runs, so BatchNorm
statistics and every other module are untouched):

    ξ ~ N(0, σ²),  y = L_W(ξ)  (no bias),  ΔW_b = η (KGrad(ξ, y) / N − λ W_b)

with ``N`` noise samples and ``KGrad`` the op's ordinary weight gradient. Since
``E[KGrad(ξ, L_W ξ)] / N = σ² W``, the fixed point is ``W_b* = (σ²/λ)·W``; the default
``decay=None`` takes ``λ = σ²``, so ``W_b → W`` itself. Noise shape: ``(N, n_in)`` for a
linear op; for a convolution, ``(N, C_in, *kernel)`` — the op's input at the size of one
receptive field (for a transposed convolution a 1×1 input), where every kernel tap acts
on each noise sample exactly once. ``KGrad/N`` then estimates ``σ²W`` tap by tap, without
the border bias zero padding would add on a larger input, for ``2N·|W|`` multiply-adds.
Stride and dilation only place the taps, so they do not enter.

Schedule: one mirror step per op after every ``torch.optim`` optimizer step that updates
the op's weight (an optimizer step post-hook: the training loop does not change, and
gradient accumulation gives one mirror step per update), as the authors run it, plus
:func:`mirror` (``pfa_fx.mirror(model, steps=N)``) for their initial mirror pass before
training; loops that update weights without a ``torch.optim`` optimizer call
:func:`step_feedback` (``pfa_fx.step_feedback(model)``) after each update.

Noise is drawn per op from a generator on the weight's device seeded by ``(seed, op
name, mirror step)``: independent between ops, identical on every DDP rank (so ``W_b``
stays in sync without communication); the step count travels in ``state_dict``.

Defaults: ``sigma=1``, ``decay=σ²`` (fixed point ``W``), ``mirror_lr = 0.005/decay``
(``W_b`` relaxes 0.5 % of the way to its target per step), ``mirror_batch=64`` noise
samples: the estimate's noise leaves ``W_b`` about ``sqrt(η λ n_in / 2N)`` of ``|W|`` off
the fixed point (≈ 6° for ``n_in = 256``). ``W_b`` starts as FA's draw (``scale``).
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .base import FeedbackNode, feedback_std

#: default relaxation per step, ``learning rate × decay``
RATE = 0.005

_mirroring: weakref.WeakSet = weakref.WeakSet()  # WM nodes that ran a training forward
_hook_handle = None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The feedback update of every WM/PAL op whose weight this optimizer just updated."""
    if not _mirroring:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for node in list(_mirroring):
        if id(node._weight_ref[0]) in ids:
            node.after_optimizer_step()


def _watch_optimizers() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _positive(rule: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{rule}: {name} must be a positive number, got {value!r}")
    return float(value)


class WMNode(FeedbackNode):
    rule = "wm"
    options: ClassVar[dict[str, Any]] = {
        "scale": "xavier",
        "sigma": 1.0,
        "mirror_lr": None,
        "decay": None,
        "mirror_batch": 64,
    }
    #: whether :func:`mirror` runs mirror steps on this op (PAL learns in its noisy pass)
    mirrors_after_step: ClassVar[bool] = True

    def __init__(
        self,
        weight: Tensor,
        *,
        groups: int,
        generator: torch.Generator,
        transposed: bool = False,
        scale: str | float = "xavier",
        sigma: float = 1.0,
        mirror_lr: float | None = None,
        decay: float | None = None,
        mirror_batch: int = 64,
    ):
        super().__init__(weight, groups=groups, generator=generator, transposed=transposed)
        self.scale = scale
        self.sigma = _positive(self.rule, "sigma", sigma)
        self.decay = self.sigma**2 if decay is None else _positive(self.rule, "decay", decay)
        self.mirror_lr = RATE / self.decay if mirror_lr is None else _positive(self.rule, "mirror_lr", mirror_lr)
        if isinstance(mirror_batch, bool) or not isinstance(mirror_batch, int) or mirror_batch < 1:
            raise ValueError(f"{self.rule}: mirror_batch must be an int >= 1, got {mirror_batch!r}")
        self.mirror_batch = mirror_batch
        std = feedback_std(weight, scale, self.rule)
        self.register_buffer("B", self.draw(tuple(weight.shape), generator, weight, std))
        self._noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._gen: torch.Generator | None = None
        self.steps = 0  # noise draws so far (mirror steps; PAL's noisy passes)
        _watch_optimizers()

    # -- the op ------------------------------------------------------------------------
    def state(self) -> tuple[Tensor, ...]:
        _mirroring.add(self)  # trained from here on: learn after the optimizer's steps
        return (self.B,)

    def after_optimizer_step(self) -> None:
        """What follows an optimizer step of this op's weight: one mirror step."""
        self.mirror_step()

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return state[0]

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    # -- learning from noise -----------------------------------------------------------
    def noise(self, shape: tuple[int, ...], step: int, like: Tensor) -> Tensor:
        """The noise of draw ``step``: ``N(0, σ²)`` in ``shape``, on ``like``'s device."""
        if self._gen is None or self._gen.device != like.device:
            self._gen = torch.Generator(device=like.device)
        self._gen.manual_seed(_seed(self._noise_seed, step))
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        xi = torch.randn(shape, generator=self._gen, device=like.device, dtype=dtype)
        return xi.mul_(self.sigma).to(like.dtype)

    def relax(self, kgrad: Tensor, count: Tensor | float) -> None:
        """``W_b += η (kgrad / count − λ W_b)``, in place (``count``: noise samples per tap)."""
        B = self.B
        B.mul_(1.0 - self.mirror_lr * self.decay).add_((kgrad / count).to(B.dtype), alpha=self.mirror_lr)

    def _mirror_family(self, weight: Tensor):
        from ..ops import ConvFamily, LinearFamily  # the ops import the rules

        n = weight.dim() - 2
        if n <= 0:
            return LinearFamily, (weight.shape[1],)
        family = ConvFamily([1] * n, [0] * n, [1] * n, self.groups, None, self.transposed, [0] * n)
        if self.transposed:
            return family, (weight.shape[0], *([1] * n))
        return family, (weight.shape[1] * self.groups, *weight.shape[2:])

    @torch.no_grad()
    def mirror_step(self) -> None:
        """One mirror step (module docstring); draws fresh noise."""
        weight = self.weight
        family, sample = self._mirror_family(weight)
        xi = self.noise((self.mirror_batch, *sample), self.steps, weight)
        self.steps += 1
        # y = L_W(ξ) with the op's own call (one output position; no bias)
        if weight.dim() == 2:
            y = xi.mm(weight.t())
        else:
            y = self._conv(xi, weight)
        kgrad = family.fused(y, xi, weight, False, True, False)[1]
        self.relax(kgrad, self.mirror_batch)

    def _conv(self, xi: Tensor, weight: Tensor) -> Tensor:
        n = weight.dim() - 2
        if self.transposed:
            conv_t = (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d)[n - 1]
            return conv_t(xi, weight, None, 1, 0, 0, self.groups)
        conv = (torch.conv1d, torch.conv2d, torch.conv3d)[n - 1]
        return conv(xi, weight, None, 1, 0, 1, self.groups)

    def fixed_point(self) -> Tensor:
        """Where mirror steps take ``W_b`` for the current W: ``(σ²/λ)·W``."""
        return self.weight * (self.sigma**2 / self.decay)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", steps={self.steps}"


def step_feedback(model: nn.Module) -> int:
    """What a ``torch.optim`` step triggers for WM and PAL ops, for training loops that
    update weights some other way: one mirror step of every WM op, and PAL's updates from
    the noisy passes since the last one. Returns the number of ops updated."""
    from ..convert import feedback_modules

    nodes = [node for _, node in feedback_modules(model) if isinstance(node, WMNode)]
    for node in nodes:
        node.after_optimizer_step()
    return len(nodes)


def mirror(model: nn.Module, steps: int = 1) -> int:
    """Run ``steps`` mirror steps on every weight-mirror op of ``model`` (no data, no grad,
    nothing else of the model runs): the initial mirror pass before training, or the
    mirror phase of a loop that updates weights without a ``torch.optim`` optimizer.
    Returns the number of ops mirrored. PAL ops learn in their noisy pass instead and are
    left alone.
    """
    from ..convert import feedback_modules

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    nodes = [node for _, node in feedback_modules(model) if isinstance(node, WMNode) and node.mirrors_after_step]
    for _ in range(steps):
        for node in nodes:
            node.mirror_step()
    return len(nodes)
