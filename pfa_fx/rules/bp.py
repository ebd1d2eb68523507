"""Backprop: ``W_b = W``. The control; reproduces autograd's gradients exactly."""

from dataclasses import dataclass

from torch import Tensor

from ..config import RuleConfig
from ..node import FeedbackNode


@dataclass(frozen=True)
class BP(RuleConfig):
    """Backprop through the converted ops (no options): the control."""

    rule = "bp"


class BPNode(FeedbackNode):
    rule = "bp"
    config_type = BP

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        return weight
