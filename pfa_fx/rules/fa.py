"""Feedback alignment (Lillicrap et al. 2016): ``W_b = B``, fixed random at W's init scale
(``scale="xavier"``, the default) or W's own (``scale="weight"``)."""

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..node import FeedbackNode, feedback_std


class FANode(FeedbackNode):
    rule = "fa"
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
        std = feedback_std(weight, scale, self.rule)
        self.register_buffer("B", self.draw(tuple(weight.shape), generator, weight, std))

    def state(self) -> tuple[Tensor, ...]:
        return (self.B,)

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return state[0]
