"""Backprop: ``W_b = W``. The control; reproduces autograd's gradients exactly."""

from torch import Tensor

from .base import FeedbackNode


class BPNode(FeedbackNode):
    rule = "bp"

    def build(self, weight: Tensor) -> Tensor:
        return weight.detach()
