"""Kolen–Pollack (Akrout et al. 2019): ``W_b = B``, plastic, updated exactly like W.

The op returns ``grad_W`` as B's gradient, so with the same optimizer and weight decay
``B - W`` decays geometrically and ``B -> W``. B starts as FA's draw (same ``scale``
option), as a trainable parameter. Being learned, it is always stored: ``store_feedback=False``
(FA's redraw-per-backward) is refused with a :class:`~pfa_fx.ConversionError`.

Implicit form (``pfa_fx.convert(model, "kp", implicit=True)``, opt-in)
--------------------------------------------------------------------------
Under ``torch.optim.SGD`` with B in W's parameter group, ``D = B - W`` only receives weight
decay, so ``B(t) = W(t) + α(t)·D0`` with ``D0 = B0 - W0`` and a scalar ``α`` following SGD's
recurrence (:mod:`pfa_fx.rules.sgd_implicit` states the math and holds the machinery).
The implicit node keeps ``D0`` (W-shaped, ``B0 - W`` at conversion, ``B0`` being FA's
draw as for the explicit rule) and 0-dim float64 buffers ``alpha``, ``beta`` and ``steps``
(updates applied). No parameter: nothing W-sized is accumulated, clipped or stepped, and
the optimizer keeps no momentum buffer for it. The backward builds ``W_b = W + α·D0``, one
fused pointwise op (``addcmul``) per op per backward, and returns no state gradient.
``alpha``/``beta`` stay float64 under ``model.float()``/``.half()`` (``D0`` follows W's dtype).

Exactness. Identical (up to rounding, ~1e-16 relative per step in float64) to explicit KP
with B in W's group under ``torch.optim.SGD`` or a subclass that keeps its update rule:
any lr schedule (per step, read from the group), momentum, dampening, nesterov, L2
``weight_decay``, ``maximize``, foreach or fused, gradient accumulation, ops that get no
gradient in a step (neither W nor B moves). The momentum-buffer state is read from the
optimizer itself (before the step, by a step pre-hook), so a fresh optimizer started on a
loaded checkpoint continues as explicit KP's would. Where the forms differ:

- ``torch.nn.utils.clip_grad_norm_(model.parameters())`` sees only the model's own
  gradients here, i.e. it matches explicit KP clipped with ``pfa_fx.clip_grad_norm_``.
- Any other optimizer (Adam, AdamW, RMSprop, ...) rescales B's and W's gradients apart,
  so ``D`` is no longer a multiple of ``D0``: a step of such an optimizer over W of an
  implicit op raises :class:`~pfa_fx.errors.ConversionTypeError` before anything is updated (use
  ``implicit=False`` with it). ``pfa_fx.step_feedback`` cannot know the step's
  hyperparameters either; loops that apply SGD by hand call :meth:`KPNode.sgd_step`.
- A frozen W (``requires_grad=False`` or not in the optimizer) leaves ``α`` where it is;
  explicit KP would keep moving B.
- A computed weight (weight standardization): ``D0`` is taken against the computed weight
  so that ``W_b`` starts at ``B0``, after which ``W_b - W`` relaxes at the rate weight
  decay sets, as the explicit rule's would only for a weight used as is.

When to use it: KP under SGD on models where the optimizer's per-parameter work (one
more W-sized gradient, momentum buffer and update per op) matters, e.g. large models,
CPU training, or memory-bound steps. Its state is ``|W|`` numbers per op (explicit KP:
``|W|`` parameter + ``|W|`` gradient + ``|W|`` momentum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RuleConfig, check_bool, check_scale
from ..draws import DEFAULT_SCALE
from ..node import FeedbackNode
from .align import relax
from .fa import FANode
from .sgd_implicit import SGDImplicit


@dataclass(frozen=True)
class KP(RuleConfig):
    """Kolen–Pollack: ``B`` starts as FA's draw and is stepped with W's gradient.

    Args:
        scale: ``B``'s initial scale, as :class:`FA`'s.
        implicit: keep ``B = W + α·D0`` implicitly (SGD only; see the module docstring).
    """

    rule = "kp"
    learned_feedback = "kp's feedback B is learned (it receives W's gradient and is stepped like W)"
    scale: str | float = DEFAULT_SCALE
    implicit: bool = False

    def validate(self) -> None:
        check_scale(self.scale, self.rule)
        check_bool(self.implicit, "implicit", self.rule)


class KPNode(SGDImplicit, FANode):
    rule = "kp"
    config_type = KP
    implicit_form = "the implicit Kolen–Pollack form (kp, implicit=True)"
    explicit_conversion = "pfa_fx.convert(model, 'kp')"
    implicit_of = "B"
    plastic = True

    def __init__(self, weight: Tensor, **kwargs: Any):
        super().__init__(weight, **kwargs)
        self.implicit = implicit = self.rule_config.implicit
        B = self._buffers.pop("B")
        if not implicit:
            self.B = nn.Parameter(B)
            return
        with torch.no_grad():
            self.init_implicit(B - weight.detach())

    # -- the op ------------------------------------------------------------------------
    def state(self) -> tuple[Tensor, ...]:
        return (self.D0, self.alpha) if self.implicit else (self.B,)

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        if len(state) == 1:
            return state[0]
        return self.implicit_state(weight, *state)  # W + α·D0

    def mirror_update(self, estimate: Tensor, rate: float) -> None:
        """:func:`pfa_fx.mirror`'s update: ``B`` toward ``Ŵ``, the op's noisy estimate of W
        (the implicit form: ``α <- (1 - rate)·α``)."""
        if self.implicit:
            self.relax_implicit(rate)
        else:
            relax(self.B, estimate, rate)

    # -- bookkeeping -------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> None:
        cls.rebase_on_computed_weights(node for _, node in nodes)
