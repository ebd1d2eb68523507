"""Sign-concordant feedback: ``W_b = sign(W) * M`` (Liao et al. 2016; Xiao et al. 2018).

Variants (``variant=``): ``"usf"`` one constant per layer (W's own root-mean-square,
``scale="weight"``, the default; ``"xavier"``: Xavier's std for W's shape; or a number), ``"frsf"``
fixed random magnitudes, ``"brsf"`` magnitudes redrawn at every forward (batch) from a
generator seeded by ``(seed, op name, step)``, so every process draws the same.

``store_feedback=False`` (frsf; usf and brsf hold nothing W-sized anyway) holds no ``M``:
every backward redraws it from the op's seeded generator, bit for bit the ``M`` of
``store_feedback=True`` with the same seed (cast as the stored buffer would have been).
Cost per op and backward: ``|W|`` Gaussian draws on the CPU (plus a copy to W's device),
and one more W-sized tensor alive while the op's backward runs.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import RuleConfig, check_choice, check_scale, check_store_feedback
from ..draws import DEFAULT_SCALE, feedback_std, generator_key
from ..node import FeedbackNode

VARIANTS = ("usf", "frsf", "brsf")


@dataclass(frozen=True)
class SF(RuleConfig):
    """Sign-concordant feedback ``W_b = sign(W)·M``.

    Args:
        variant: ``"usf"`` (one magnitude per op), ``"frsf"`` (fixed random magnitudes) or
            ``"brsf"`` (magnitudes redrawn every batch).
        scale: the magnitudes' scale, as :class:`FA`'s.
        store_feedback: frSF's ``M`` held (True) or redrawn in every backward.
    """

    rule = "sf"
    variant: str = "usf"
    scale: str | float = DEFAULT_SCALE
    store_feedback: bool = True

    def validate(self) -> None:
        check_choice(self.variant, VARIANTS, "variant", self.rule)
        check_scale(self.scale, self.rule)
        check_store_feedback(self.store_feedback, self.rule)


class SFNode(FeedbackNode):
    rule = "sf"
    config_type = SF

    def __init__(self, weight: Tensor, *, generator: torch.Generator, **kwargs: Any):
        super().__init__(weight, generator=generator, **kwargs)
        self.store_feedback = self.rule_config.store_feedback
        self.variant = variant = self.rule_config.variant
        scale = self.rule_config.scale
        self.scale = scale
        self.std = feedback_std(weight, scale, self.rule)
        if variant == "frsf" and self.store_feedback:
            self.register_buffer("M", self.draw(tuple(weight.shape), generator, weight, self.std).abs())
        elif variant == "frsf":
            self.keep_redraw(weight, M=generator_key(generator))  # the last draw: no need to skip past it
        elif variant == "brsf":
            self.step = 0  # batches drawn so far; saved through get_extra_state
            self._base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    @property
    def draws_from_seed(self) -> bool:
        # brSF: magnitudes redrawn per batch from (seed, op name, step); frSF unstored: M redrawn
        return self.variant == "brsf" or bool(self.fixed_draws and not self.store_feedback)

    @property
    def fixed_draws(self) -> tuple[str, ...]:
        return ("M",) if self.variant == "frsf" else ()

    def redraw(self, name: str) -> Tensor:
        if name != "M" or self.variant != "frsf" or self.store_feedback:
            return super().redraw(name)
        return self.redrawn_gaussian("M", self.std).abs_()

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
        if self.variant == "frsf" and self.store_feedback:
            return (self.M,)
        return ()

    def inspect_state(self) -> tuple[Tensor, ...]:
        if self.variant == "brsf":
            return (torch.tensor(max(self.step - 1, 0)),)
        return self.state()

    def backward(self, family, e, x, weight, state, need):
        if self.store_feedback or self.variant != "frsf":
            return super().backward(family, e, x, weight, state, need)
        return self.backward_input_first(family, e, x, weight, state, need)  # M and grad_W never both alive

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        # in place on the fresh sign tensor: one W-sized pass, no second allocation
        sign = torch.sign(weight)
        if self.variant == "usf":
            return sign.mul_(self.std)
        if self.variant == "brsf":
            return sign.mul_(self._batch_magnitudes(weight, int(state[0])))
        if self.store_feedback:
            return sign.mul_(state[0])
        # frSF unstored: M redrawn in sign's dtype (W's, as autocast would cast a stored M)
        return sign.mul_(self.redrawn_gaussian("M", self.std, sign).abs_())
