"""Alignment between the forward weights and the feedback weights of a converted model."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .convert import feedback_modules


def angle_and_norm_ratio(weight: Tensor, weight_b: Tensor) -> tuple[float, float]:
    """Angle in degrees between two tensors seen as vectors, and ``|W_b| / |W|``."""
    a = weight.detach().double().flatten()
    b = weight_b.detach().double().flatten().to(a.device)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan"), float(nb / na) if na != 0 else float("nan")
    cos = torch.clamp(a.dot(b) / (na * nb), -1.0, 1.0)
    return math.degrees(math.acos(float(cos))), float(nb / na)


def alignment(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{op name: (angle_degrees, norm_ratio)}`` between W and ``W_b`` for each converted op.

    For FA/SF/KP this is the paper's backward–forward weight alignment; for PFA and
    PFA-o, with ``W_b = B·R``, it is the path alignment.
    """
    return {name: angle_and_norm_ratio(node.weight, node.feedback_weight()) for name, node in feedback_modules(model)}
