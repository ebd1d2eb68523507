"""Hugging Face ``Trainer`` integration: one line makes its gradient clipping exact.

A converted model trains under ``transformers.Trainer`` with its default
``TrainingArguments``: the converted forward presents the original forward's signature
(so ``remove_unused_columns`` keeps the dataset's columns), and WM's and PAL's feedback
updates follow every ``torch.optim`` step by themselves. What the defaults get wrong is
clipping: ``max_grad_norm=1.0`` makes Trainer call
``accelerator.clip_grad_norm_(model.parameters(), 1.0)``, whose norm counts the feedback
state's gradients (KP's ``B``, PFA's ``R``/``S``: parameters of the converted model). The
clip factor then differs from native BP's, and differs between forms of one rule
(compact PFA's ``S`` has another gradient norm than explicit PFA's ``R``). Hence::

    trainer = Trainer(model=pfa_fx.convert(model, "kp"), args=args, train_dataset=data)
    pfa_fx.hf.exact_clipping(trainer)  # before trainer.train()
    trainer.train()

after which Trainer's clipping is :func:`pfa_fx.clip_grad_norm_`: the factor from the
model's own gradients only, as without conversion, and the feedback gradients scaled by
that same factor. The ``grad_norm`` Trainer logs is the model's own gradient norm, as
native BP's run logs it.

Why a function applied to the trainer, and not a ``TrainerCallback`` or a model change:

- No callback event falls between the backward and the clipping
  (``on_pre_optimizer_step`` comes after it), and callbacks are not handed the trainer
  or its accelerator. A callback could only hide the feedback gradients during the
  backward (a post-accumulate-grad hook) and hand them back before the step, which
  misses DDP's gradient reduction and still lacks the pre-clip norm to scale them by.
- The converted model cannot make counting its feedback gradients harmless: the
  optimizer needs them in ``.grad`` at the step, and the norm counts whatever is there.
- Trainer's own ``_clip_grad_norm`` is private; ``Accelerator.clip_grad_norm_`` is the
  public call it makes (also when ``max_grad_norm=0``, to log the norm), after the
  gradients are reduced across processes and, under fp16, unscaled. Replacing it on this
  trainer's accelerator alone keeps all of that: the model's own gradients go through
  the accelerator's own clipping, then the feedback gradients get its factor.

Not covered, with a warning where it can be told: DeepSpeed (clips inside its engine),
FSDP1 (its flat parameters mix feedback state with weights), and Trainer's path for
gradients on several device meshes (tensor parallelism with FSDP2), which bypasses the
accelerator.

``transformers`` is imported by nothing here: ``pfa_fx`` imports without it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

from .params import _feedback_ids, scale_as_clipped

if TYPE_CHECKING:  # pragma: no cover
    from transformers import Trainer

#: marks a clip_grad_norm_ (and a create_accelerator_and_postprocess) already replaced
_EXACT = "_pfa_exact_clipping"


def exact_clipping(trainer: Trainer) -> Trainer:
    """Make ``trainer``'s gradient clipping exact for a converted model, and return it.

    ``trainer.accelerator.clip_grad_norm_`` (what ``Trainer`` clips and measures gradients
    with) is replaced, on this trainer's accelerator only, by one that computes the norm
    and the clip factor from the model's own gradients (:func:`pfa_fx.model_parameters`),
    clips them through the accelerator's own method (cross-process reduction, fp16
    unscaling and DTensor handling kept), and scales the feedback state's gradients by the
    same factor — :func:`pfa_fx.clip_grad_norm_`'s semantics. It returns, and Trainer logs
    as ``grad_norm``, the norm of the model's own gradients. A model without trainable
    feedback state (BP, FA, or any unconverted model) clips exactly as before. Calling it
    twice changes nothing; an accelerator that Trainer makes anew (hyperparameter search)
    is replaced too.

    >>> trainer = transformers.Trainer(model=pfa_fx.convert(model, "pfa"), args=args,  # doctest: +SKIP
    ...                                train_dataset=data)
    >>> pfa_fx.hf.exact_clipping(trainer).train()  # doctest: +SKIP
    """
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None:
        raise TypeError(f"exact_clipping takes a transformers.Trainer, got {type(trainer).__qualname__}")
    _replace_clipping(trainer)
    recreate = trainer.create_accelerator_and_postprocess
    if not getattr(recreate, _EXACT, False):

        def create_accelerator_and_postprocess() -> None:
            recreate()
            _replace_clipping(trainer)

        setattr(create_accelerator_and_postprocess, _EXACT, True)
        trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    return trainer


def _replace_clipping(trainer: Trainer) -> None:
    accelerator = trainer.accelerator
    native: Callable[..., Any] = accelerator.clip_grad_norm_
    if getattr(native, _EXACT, False):
        return
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", "")
    if kind == "DEEPSPEED" or (kind == "FSDP" and not getattr(accelerator, "is_fsdp2", False)):
        warnings.warn(
            f"pfa_fx.hf.exact_clipping: under {kind} the gradient clipping happens where it "
            "cannot be reached, and its norm counts the feedback state's gradients; set max_grad_norm=0 and clip "
            "with pfa_fx.clip_grad_norm_ if that matters",
            UserWarning,
            stacklevel=3,
        )
        return

    def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2) -> Any:
        """``Accelerator.clip_grad_norm_`` with :func:`pfa_fx.clip_grad_norm_`'s factor."""
        params = list(parameters)
        feedback_ids = _feedback_ids(trainer.model)
        feedback = [p for p in params if id(p) in feedback_ids]
        if not feedback:
            return native(params, max_norm, norm_type=norm_type)
        total = native([p for p in params if id(p) not in feedback_ids], max_norm, norm_type=norm_type)
        grads = [p for p in feedback if p.grad is not None]
        if total is not None and grads and not math.isinf(max_norm):
            scale_as_clipped(grads, max_norm, total)
        return total

    setattr(clip_grad_norm_, _EXACT, True)
    accelerator.clip_grad_norm_ = clip_grad_norm_


__all__ = ["exact_clipping"]
