"""Backprop: ``W_b = W``. The control; reproduces autograd's gradients exactly."""

from torch import Tensor

from ..node import FeedbackNode


class BPNode(FeedbackNode):
    rule = "bp"

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return weight
