"""Kolen–Pollack (Akrout et al. 2019): ``W_b = B``, plastic, updated exactly like W.

The op returns ``grad_W`` as B's gradient, so with the same optimizer and weight decay
``B - W`` decays geometrically and ``B -> W``. B starts as FA's draw (same ``scale``
option), as a trainable parameter.
"""

from typing import Any

from torch import Tensor, nn

from .fa import FANode


class KPNode(FANode):
    rule = "kp"
    plastic = True

    def __init__(self, weight: Tensor, **kwargs: Any):
        super().__init__(weight, **kwargs)
        B = self._buffers.pop("B")
        self.B = nn.Parameter(B)
