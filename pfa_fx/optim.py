"""Optimizer groups and the weight-decay schedule that align the plastic rules.

Why decay aligns feedback. Each plastic rule's state ``P`` receives a gradient tied to
W's own: Kolen–Pollack's ``B`` and compact PFA's ``S`` get ``grad_W`` itself, PFA's ``R`` gets
``Bᵀ·grad_W``. Under SGD (any momentum, lr schedule) with ``P`` and W in one group, the
data-driven parts of their updates cancel in ``D = P - W`` (for ``R``: in ``R - Bᵀ·W``, the
range of ``Bᵀ``), which then only decays: ``D_t = D_0·∏(1 - lr_s·wd_s)``. Under AdamW the
same holds when ``P``'s and W's updates are equal, which they are for ``B`` and ``S``
(identical gradients from the first step, identical moments, hence identical updates;
AdamW's decoupled decay multiplies both by ``1 - lr·wd``). So with W and the state in one
group, at one learning rate and weight decay, the state's distance from its fixed point
shrinks by exactly ``1 - lr·wd`` per step: ``B -> W`` (KP), ``G·S -> B·Bᵀ·W`` (compact PFA,
the rule's floor). Explicit ``R`` under Adam is the exception: Adam normalises each of
``R``'s ``n̄`` rows apart, so ``B·R`` no longer moves like ``W`` — the form
:func:`param_groups` leaves to users who ask for it.

The decay that does this also pulls W toward zero, and at the usual ``wd = 0.1`` and
``lr = 1e-3`` it needs ~10⁴ steps to matter. The PFA authors (Li & Benna's code, mode
``tfa``) use a short *burst* of very strong decay at the start and then anneal it;
:class:`DecayBurst` is that schedule, applied to the groups that hold W and the feedback
state. For a pretrained model, :func:`pfa_fx.mirror` aligns the state without touching W
at all, and is the better first step; the burst is for training from scratch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ConversionError
from .params import feedback_parameters

#: the ``pfa_group`` tag of each group :func:`param_groups` returns
GROUPS = ("weights", "no_decay", "feedback")


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float = 0.0,
    no_weight_decay: Iterable[str] = (),
    feedback_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a converted model, each tagged ``pfa_group``:

    - ``"weights"``: the model's own parameters with two or more dimensions (matrices,
      kernels, embeddings), at ``weight_decay``;
    - ``"no_decay"``: biases, normalisation parameters (fewer than two dimensions) and
      parameters named in ``no_weight_decay`` or in the model's own ``no_weight_decay()``
      (timm's convention: position embeddings, class tokens), without decay;
    - ``"feedback"``: the trainable feedback state (KP's ``B``, PFA's ``R`` or ``S``), at
      ``feedback_weight_decay`` (default ``weight_decay``), with every other hyperparameter
      of the ``"weights"`` group: one learning rate and one decay for W and its state is
      what pulls the state to its fixed point (module docstring).

    Groups with no parameter are left out; pass the list to any ``torch.optim`` optimizer
    (extra keys are kept in ``optimizer.param_groups``), e.g.
    ``torch.optim.AdamW(pfa_fx.param_groups(model, weight_decay=0.1), lr=1e-3)``. Works on an
    unconverted model too (no ``"feedback"`` group), so one training script serves BP.
    """
    for name, value in (("weight_decay", weight_decay), ("feedback_weight_decay", feedback_weight_decay)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConversionError(f"param_groups: {name} must be a number >= 0, got {value!r}")
    skip = set(no_weight_decay)
    own_skip = getattr(model, "no_weight_decay", None)
    if callable(own_skip):
        skip |= set(own_skip())
    feedback = feedback_parameters(model)
    feedback_ids = {id(p) for p in feedback}
    weights, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) in feedback_ids or not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip or name.rsplit(".", 1)[-1] in skip else weights).append(p)
    wd_feedback = weight_decay if feedback_weight_decay is None else feedback_weight_decay
    groups = [
        {"params": weights, "weight_decay": weight_decay, "pfa_group": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "pfa_group": "no_decay"},
        {"params": feedback, "weight_decay": wd_feedback, "pfa_group": "feedback"},
    ]
    return [g for g in groups if g["params"]]


class DecayBurst:
    """A burst of strong weight decay for the first ``steps`` optimizer steps, then each
    group's own decay (the PFA authors' alignment recipe; module docstring).

    Applies to the groups tagged ``"weights"`` and ``"feedback"`` by :func:`param_groups`
    (``groups=`` names others; untagged optimizers: every group with nonzero decay). Call
    :meth:`step` once after each ``optimizer.step()``, as with a learning-rate scheduler;
    ``state_dict``/``load_state_dict`` resume it.

    >>> opt = torch.optim.AdamW(pfa_fx.param_groups(model, weight_decay=0.1), lr=1e-3)  # doctest: +SKIP
    >>> burst = pfa_fx.DecayBurst(opt, weight_decay=10.0, steps=300)  # doctest: +SKIP

    Under AdamW the decay per step is ``lr·weight_decay`` (decoupled); under SGD it enters
    the gradient as ``weight_decay·W``. Size the burst so that ``∏(1 - lr·wd)`` over it is
    small (KP's ``B - W`` and compact PFA's ``S - W`` shrink by exactly that factor) but W's
    gradients can still hold it up: the authors use AdamW lr 1e-3 with decay 10 for two
    epochs, SGD lr 0.1 with 5e-4 for one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weight_decay: float,
        steps: int,
        groups: Iterable[str] = ("weights", "feedback"),
    ):
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ConversionError(f"DecayBurst: weight_decay must be a number >= 0, got {weight_decay!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConversionError(f"DecayBurst: steps must be an int >= 0, got {steps!r}")
        names = tuple(groups)
        unknown = [n for n in names if n not in GROUPS]
        if unknown:
            raise ConversionError(f"DecayBurst: unknown group(s) {unknown}; valid groups: {', '.join(GROUPS)}")
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self.steps = steps
        tagged = any("pfa_group" in g for g in optimizer.param_groups)
        self._groups = [
            g
            for g in optimizer.param_groups
            if (g.get("pfa_group") in names if tagged else g.get("weight_decay", 0.0) > 0)
        ]
        self._base = [g.get("weight_decay", 0.0) for g in self._groups]
        self.last_step = 0
        self._apply()

    @property
    def active(self) -> bool:
        """Whether the next optimizer step runs with the burst's decay."""
        return self.last_step < self.steps

    def _apply(self) -> None:
        for g, base in zip(self._groups, self._base):
            g["weight_decay"] = self.weight_decay if self.active else base

    def step(self) -> None:
        """Count one optimizer step; the groups' own decay returns after ``steps`` of them."""
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "weight_decay": self.weight_decay, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.weight_decay, self.steps = state["last_step"], state["weight_decay"], state["steps"]
        self._apply()


__all__ = ["GROUPS", "DecayBurst", "param_groups"]
