"""Feedback alignment (Lillicrap et al. 2016): ``W_b = B``, fixed random at W's init scale."""

import torch
from torch import Tensor

from .base import FeedbackNode, xavier_std


class FANode(FeedbackNode):
    rule = "fa"

    def __init__(self, weight: Tensor, *, groups: int, generator: torch.Generator, transposed: bool = False):
        super().__init__(weight, groups=groups, generator=generator, transposed=transposed)
        self.register_buffer("B", self.draw(tuple(weight.shape), generator, weight, xavier_std(weight.shape)))

    def state(self) -> tuple[Tensor, ...]:
        return (self.B,)

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return state[0]
