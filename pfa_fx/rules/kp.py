"""Kolen–Pollack (Akrout et al. 2019): ``W_b = B``, plastic, updated exactly like W.

The op returns ``grad_W`` as B's gradient, so with the same optimizer and weight decay
``B - W`` decays geometrically and ``B -> W``.
"""

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import FeedbackNode, feedback_std


class KPNode(FeedbackNode):
    rule = "kp"
    plastic = True
    options: ClassVar[dict[str, Any]] = {"scale": "xavier"}

    def __init__(
        self,
        weight: Tensor,
        *,
        groups: int,
        generator: torch.Generator,
        transposed: bool = False,
        scale: str | float = "xavier",
    ):
        super().__init__(weight, groups=groups, generator=generator, transposed=transposed)
        self.scale = scale
        init = self.draw(tuple(weight.shape), generator, weight, feedback_std(weight, scale, self.rule))
        self.B = nn.Parameter(init)

    def state(self) -> tuple[Tensor, ...]:
        return (self.B,)

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return state[0]
