"""Feedback alignment (Lillicrap et al. 2016): ``W_b = B``, fixed random at W's own RMS
(``scale="weight"``, the default: the backward's errors keep backprop's magnitudes) or at
Xavier's std for W's shape (``scale="xavier"``, the paper's recipe).

``store_feedback=False`` holds no ``B``: every backward redraws it from the op's seeded
generator (a CPU float64 Gaussian, cast as the stored buffer would have been: W's dtype at
conversion, then the model's moves), bit for bit the ``B`` of ``store_feedback=True`` with
the same seed. Cost per op and backward: ``|W|`` Gaussian draws on the CPU (plus a copy to
W's device), and one W-sized tensor alive while the op's backward runs.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import RuleConfig, check_scale, check_store_feedback
from ..draws import DEFAULT_SCALE, feedback_std, generator_key
from ..node import FeedbackNode


@dataclass(frozen=True)
class FA(RuleConfig):
    """Feedback alignment: fixed random ``B`` in W's place in the backward.

    Args:
        scale: ``"weight"`` (W's own RMS, the default), ``"xavier"`` (the paper's) or a
            positive standard deviation for ``B``.
        store_feedback: hold ``B`` (True) or redraw it from the seed in every backward.
    """

    rule = "fa"
    scale: str | float = DEFAULT_SCALE
    store_feedback: bool = True

    def validate(self) -> None:
        check_scale(self.scale, self.rule)
        check_store_feedback(self.store_feedback, self.rule)


class FANode(FeedbackNode):
    rule = "fa"
    config_type = FA

    def __init__(self, weight: Tensor, *, generator: torch.Generator, **kwargs: Any):
        super().__init__(weight, generator=generator, **kwargs)
        self.scale = self.rule_config.scale
        # KP, WM and PAL start from this draw and then learn B (their configs hold no store_feedback)
        self.store_feedback = getattr(self.rule_config, "store_feedback", True)
        std = feedback_std(weight, self.scale, self.rule)
        if self.store_feedback:
            self.register_buffer("B", self.draw(tuple(weight.shape), generator, weight, std))
            return
        self._std = std
        # B is the generator's last draw: the subclasses that draw after it (kp, wm, pal) learn
        # their B and refuse store_feedback=False, so nothing needs the generator moved past it
        self.keep_redraw(weight, weight.dim(), B=generator_key(generator))

    @property
    def fixed_draws(self) -> tuple[str, ...]:
        return () if self.learned_feedback else ("B",)

    def redraw(self, name: str) -> Tensor:
        if name != "B" or self.store_feedback:
            return super().redraw(name)
        return self.redrawn_gaussian("B", self._std)

    @property
    def draws_from_seed(self) -> bool:
        return not self.store_feedback  # B redrawn from (seed, op name) in every backward

    def state(self) -> tuple[Tensor, ...]:
        return (self.B,) if self.store_feedback else ()

    def backward(self, family, e, x, weight, state, need):
        if self.store_feedback:
            return super().backward(family, e, x, weight, state, need)
        return self.backward_input_first(family, e, x, weight, state, need)  # B and grad_W never both alive

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        if self.store_feedback:
            return state[0]
        return self.redrawn_gaussian("B", self._std, weight)
