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

Defaults: ``sigma=1``, ``decay=σ²`` (fixed point ``W``), ``mirror_lr = 0.002/decay``
(``W_b`` relaxes 0.2 % of the way to its target per step: a 500-step time constant, so run
``pfa_fx.mirror(model, steps=2000)`` before training), ``mirror_batch=32`` noise samples.
The estimate's noise leaves ``W_b`` about ``sqrt(mirror_lr·decay·fan_in / (2·mirror_batch))``
of ``|W|`` off its fixed point: 5° for ``fan_in = 256``, ~20° for a 3×3×512 convolution;
raise ``mirror_batch`` (cost ``2·mirror_batch·|W|`` multiply-adds per step) or lower
``mirror_lr`` (slower tracking) where that matters. ``W_b`` starts as FA's draw (``scale``);
being learned, it is always stored (``store_feedback=False`` is refused).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..config import RuleConfig, check_positive, check_scale
from ..draws import DEFAULT_SCALE
from ..errors import ConversionError, ConversionTypeError
from ..registry import feedback_modules
from ..sharding import gathered, local_part, local_tensor
from .align import fan_in, noise_response, relax
from .fa import FANode

#: default relaxation per step, ``learning rate × decay``: a time constant of 500 steps
RATE = 0.002

_mirroring: weakref.WeakSet = weakref.WeakSet()  # WM nodes that ran a training forward
_hook_handle = None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The feedback update of every WM/PAL op whose weight this optimizer just updated."""
    if not _mirroring:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # in op-name order: a sharded op's step gathers its weight (a collective), which every
    # rank must reach in the same order (a WeakSet's order is by address)
    for node in sorted(_mirroring, key=lambda n: n.op_name):
        if id(node._weight_ref[0]) in ids:
            node.after_optimizer_step()


def _watch_optimizers() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


@dataclass(frozen=True)
class WM(RuleConfig):
    """Weight mirrors: FA's ``B`` made plastic by mirror steps after each optimizer step.

    Args:
        scale: ``B``'s initial scale, as :class:`FA`'s.
        sigma: the mirror noise's standard deviation.
        mirror_lr: the mirror step's learning rate (None: ``0.002 / decay``).
        decay: ``B``'s decay per mirror step (None: ``sigma**2``).
        mirror_batch: noise samples per mirror step.
    """

    rule = "wm"
    learned_feedback = "wm's feedback B is learned (by a mirror step after every optimizer step)"
    scale: str | float = DEFAULT_SCALE
    sigma: float = 1.0
    mirror_lr: float | None = None
    decay: float | None = None
    mirror_batch: int = 32

    def validate(self) -> None:
        check_scale(self.scale, self.rule)
        check_positive(self.sigma, "sigma", self.rule)
        check_positive(self.mirror_lr, "mirror_lr", self.rule, optional=True)
        check_positive(self.decay, "decay", self.rule, optional=True)
        if isinstance(self.mirror_batch, bool) or not isinstance(self.mirror_batch, int) or self.mirror_batch < 1:
            raise ConversionError(f"{self.rule}: mirror_batch must be an int >= 1, got {self.mirror_batch!r}")


class WMNode(FANode):
    """FA's draw of ``B``, made plastic by mirror steps."""

    rule = "wm"
    config_type: ClassVar[type[RuleConfig]] = WM
    #: whether :func:`mirror` runs mirror steps on this op (PAL learns in its noisy pass)
    mirrors_after_step: ClassVar[bool] = True

    def __init__(self, weight: Tensor, *, generator: torch.Generator, **kwargs: Any):
        super().__init__(weight, generator=generator, **kwargs)
        c = self.rule_config
        self.sigma = float(c.sigma)
        self.decay = self.sigma**2 if c.decay is None else float(c.decay)
        mirror_lr = getattr(c, "mirror_lr", None)  # PAL's config names its rate feedback_lr
        self.mirror_lr = RATE / self.decay if mirror_lr is None else float(mirror_lr)
        self.mirror_batch = getattr(c, "mirror_batch", 32)
        self._noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.steps = 0  # noise draws so far (mirror steps; PAL's noisy passes)
        _watch_optimizers()

    # -- the op ------------------------------------------------------------------------
    def state(self) -> tuple[Tensor, ...]:
        _mirroring.add(self)  # trained from here on: learn after the optimizer's steps
        return (self.B,)

    def after_optimizer_step(self) -> None:
        """What follows an optimizer step of this op's weight: one mirror step."""
        self.mirror_step()

    @property
    def draws_from_seed(self) -> bool:
        return True  # noise drawn from (seed, op name, step); only the step count is saved

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    # -- learning from noise -----------------------------------------------------------
    def noise(self, shape: tuple[int, ...], step: int, like: Tensor) -> Tensor:
        """The noise of draw ``step``: ``N(0, σ²)`` in ``shape``, on ``like``'s device."""
        gen = self.stream(like.device, self._noise_seed, step)
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        xi = torch.randn(shape, generator=gen, device=like.device, dtype=dtype)
        return xi.mul_(self.sigma).to(like.dtype)

    def relax(self, kgrad: Tensor, count: Tensor | float) -> None:
        """``W_b += η (kgrad / count − λ W_b)``, in place (``count``: noise samples per tap)."""
        B = self.B
        step = local_part((kgrad / count).to(B.dtype), B)  # a sharded B (FSDP2) updates its own rows
        local_tensor(B).mul_(1.0 - self.mirror_lr * self.decay).add_(step, alpha=self.mirror_lr)

    @torch.no_grad()
    def mirror_step(self) -> None:
        """One mirror step (module docstring); draws fresh noise."""
        weight = gathered(self.weight)  # sharded between steps under FSDP2: every rank takes the same step
        xi = self.noise((self.groups, self.mirror_batch, fan_in(self, weight)), self.steps, weight)
        self.steps += 1
        self.relax(noise_response(self, weight, xi), self.mirror_batch)

    @property
    def mirror_rate(self) -> float:
        """How far a mirror step moves ``W_b`` toward its fixed point: ``mirror_lr·decay``."""
        return self.mirror_lr * self.decay

    def mirror_noise(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Unit noise for :func:`pfa_fx.mirror` from this op's noise stream (a draw counted in
        ``steps``, which ``state_dict`` saves)."""
        self.steps += 1
        return self.noise(shape, self.steps - 1, like) / self.sigma

    def mirror_update(self, estimate: Tensor, rate: float) -> None:
        """:func:`pfa_fx.mirror`'s update: ``B`` toward ``(σ²/λ)·Ŵ`` (``estimate`` ``Ŵ`` of W)."""
        relax(self.B, estimate * (self.sigma**2 / self.decay), rate)

    def fixed_point(self) -> Tensor:
        """Where mirror steps take ``W_b`` for the current W: ``(σ²/λ)·W``."""
        return self.weight * (self.sigma**2 / self.decay)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", steps={self.steps}"


def step_feedback(model: nn.Module) -> int:
    """What a ``torch.optim`` step triggers for WM and PAL ops, for training loops that
    update weights some other way: one mirror step of every WM op, and PAL's updates from
    the noisy passes since the last one. Returns the number of ops updated."""
    implicit = [name for name, node in feedback_modules(model) if getattr(node, "implicit", False)]
    if implicit:
        # its update needs the step's SGD hyperparameters, which this call does not have
        raise ConversionTypeError(
            f"step_feedback cannot update implicit ops (kp or compact pfa with implicit=True: "
            f"{', '.join(implicit[:3])}{', ...' if len(implicit) > 3 else ''}): they follow torch.optim.SGD's "
            "step by themselves; "
            "a loop that applies SGD by hand calls node.sgd_step(lr, momentum=..., dampening=..., "
            "nesterov=..., weight_decay=..., first=...) on each of them after updating W"
        )
    nodes = [node for _, node in feedback_modules(model) if isinstance(node, WMNode)]
    for node in nodes:
        node.after_optimizer_step()
    return len(nodes)
