"""Sign-concordant feedback: ``W_b = sign(W) * M`` (Liao et al. 2016; Xiao et al. 2018).

Variants (``variant=``): ``"usf"`` one constant per layer (W's Xavier scale, or
``scale="weight"``: W's own root-mean-square, or a number), ``"frsf"``
fixed random magnitudes, ``"brsf"`` magnitudes redrawn at every forward (batch) from a
generator seeded by ``(seed, op name, step)``, so every process draws the same.
"""

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConversionError, did_you_mean
from ..node import FeedbackNode, feedback_std

VARIANTS = ("usf", "frsf", "brsf")


class SFNode(FeedbackNode):
    rule = "sf"
    options: ClassVar[dict[str, Any]] = {"variant": "usf", "scale": "xavier"}

    def __init__(
        self,
        weight: Tensor,
        *,
        groups: int,
        generator: torch.Generator,
        transposed: bool = False,
        variant: str = "usf",
        scale: str | float = "xavier",
    ):
        super().__init__(weight, groups=groups, generator=generator, transposed=transposed)
        if variant not in VARIANTS:
            raise ConversionError(
                f"sf: unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}{did_you_mean(variant, VARIANTS)}"
            )
        self.variant = variant
        self.scale = scale
        self.std = feedback_std(weight, scale, self.rule)
        if variant == "frsf":
            self.register_buffer("M", self.draw(tuple(weight.shape), generator, weight, self.std).abs())
        elif variant == "brsf":
            self.step = 0  # batches drawn so far; saved through get_extra_state
            self._base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    @property
    def draws_from_seed(self) -> bool:
        return self.variant == "brsf"  # magnitudes redrawn per batch from (seed, op name, step)

    def get_extra_state(self) -> dict:
        return {"step": getattr(self, "step", 0)}

    def set_extra_state(self, state: dict) -> None:
        if self.variant == "brsf":
            self.step = int(state["step"])

    def _batch_magnitudes(self, weight: Tensor, step: int) -> Tensor:
        gen = self.stream(weight.device, self._base_seed, step)
        # drawn in float32 under autocast too: the same magnitudes whatever the compute dtype
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        m = torch.randn(weight.shape, generator=gen, device=weight.device, dtype=dtype)
        return m.abs_().mul_(self.std).to(weight.dtype)

    def state(self) -> tuple[Tensor, ...]:
        if self.variant == "brsf":
            # a new batch: only its draw index travels to the backward (a CPU scalar), and
            # the magnitudes are drawn there, so nothing W-sized is saved between the passes
            step, self.step = self.step, self.step + 1
            return (torch.tensor(step),)
        if self.variant == "frsf":
            return (self.M,)
        return ()

    def inspect_state(self) -> tuple[Tensor, ...]:
        if self.variant == "brsf":
            return (torch.tensor(max(self.step - 1, 0)),)
        return self.state()

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        # in place on the fresh sign tensor: one W-sized pass, no second allocation
        sign = torch.sign(weight)
        if self.variant == "usf":
            return sign.mul_(self.std)
        if self.variant == "brsf":
            return sign.mul_(self._batch_magnitudes(weight, int(state[0])))
        return sign.mul_(state[0])
