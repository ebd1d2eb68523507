"""Kolen–Pollack (Akrout et al. 2019): ``W_b = B``, plastic, updated exactly like W.

The op returns ``grad_W`` as B's gradient, so with the same optimizer and weight decay
``B - W`` decays geometrically and ``B -> W``.
"""

import torch
from torch import Tensor, nn

from .base import FeedbackNode, xavier_std


class KPNode(FeedbackNode):
    rule = "kp"
    plastic = True

    def __init__(self, weight: Tensor, *, groups: int, generator: torch.Generator, transposed: bool = False):
        super().__init__(weight, groups=groups, generator=generator, transposed=transposed)
        init = self.draw(tuple(weight.shape), generator, weight, xavier_std(weight.shape))
        self.B = nn.Parameter(init)

    def state(self) -> tuple[Tensor, ...]:
        return (self.B,)

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return state[0]
