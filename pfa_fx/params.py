"""Parameter groups of a converted model: its own parameters apart from the feedback state,
and gradient clipping that keeps the two apart."""

from __future__ import annotations

import torch
from torch import nn

from .node import FeedbackNode


def _feedback_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, FeedbackNode) for p in m.parameters(recurse=False)}


def feedback_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable feedback state of a converted model (KP's ``B``, PFA's ``R`` or ``S``),
    in ``model.parameters()`` order.

    ``model.parameters()`` includes it, so weight-decay groups, ``clip_grad_norm_``,
    parameter counts and EMA copies see it unless told apart: use this and
    :func:`model_parameters`, which together partition ``model.parameters()`` exactly —
    except fixed feedback held as frozen parameters (``capture="modules"``, so that FSDP2
    shards it), which is in neither: nothing trains it.

    >>> opt = torch.optim.SGD(  # doctest: +SKIP
    ...     [{"params": pfa_fx.model_parameters(model)}, {"params": pfa_fx.feedback_parameters(model)}],
    ...     lr=0.1, momentum=0.9, weight_decay=1e-4)
    """
    ids = _feedback_ids(model)
    return [p for p in model.parameters() if id(p) in ids and p.requires_grad]


def model_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``model.parameters()`` without the feedback state: the model's own weights, biases
    and normalisation parameters (the complement of :func:`feedback_parameters`)."""
    ids = _feedback_ids(model)
    return [p for p in model.parameters() if id(p) not in ids]


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a converted model: the clipping factor is
    computed from the model's own gradients only (:func:`model_parameters`), as it would
    be without conversion, and the feedback state's gradients are scaled by that same
    factor. Returns the total norm of the model's own gradients.

    ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` instead counts the feedback
    gradients in the norm, which changes W's factor and makes ``compact=True`` PFA differ
    from explicit PFA (``S``'s gradient has another norm than ``R``'s). With one factor
    from W's gradients alone, compact PFA stays equal to explicit PFA under SGD, and KP's
    ``B`` keeps moving by W's step.
    """
    own = [p for p in model_parameters(model) if p.grad is not None]
    total = torch.nn.utils.clip_grad_norm_(own, max_norm, norm_type, error_if_nonfinite, foreach)
    scale_as_clipped([p for p in feedback_parameters(model) if p.grad is not None], max_norm, total)
    return total


def scale_as_clipped(params: list[nn.Parameter], max_norm: float, total: torch.Tensor) -> None:
    """Scale the gradients of ``params`` by the factor torch's clipping applies for the norm
    ``total``, ``min(1, max_norm / (total + 1e-6))``: the feedback state follows the clip
    its weights got."""
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6, DTensor-aware
    if clip is not None:
        clip(params, max_norm, total)
        return
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p in params:
            p.grad.mul_(coef.to(p.grad.device))


__all__ = ["clip_grad_norm_", "feedback_parameters", "model_parameters"]
