"""Kolen–Pollack (Akrout et al. 2019): ``W_b = B``, plastic, updated exactly like W.

The op returns ``grad_W`` as B's gradient, so with the same optimizer and weight decay
``B - W`` decays geometrically and ``B -> W``. B starts as FA's draw (same ``scale``
option), as a trainable parameter.

Implicit form (``pfa_fx.convert(model, "kp", implicit=True)``, opt-in)
--------------------------------------------------------------------------
Under ``torch.optim.SGD`` with B in W's parameter group, ``D = B - W`` receives the
gradient ``grad_B - grad_W + wd·(B - W) = wd·D`` (``maximize`` negates both gradients
before the decay is added, so it cancels too): nothing data-dependent reaches ``D``, and
every entry of it follows one scalar recurrence, ``D(t) = α(t)·D0`` with ``D0 = B0 - W0``
and the momentum buffer ``buf_D = β(t)·D0``. Per optimizer step that updates W (W has a
gradient), with the hyperparameters of W's group at that step, as
``torch.optim.sgd._single_tensor_sgd`` computes them::

    g = wd·α
    momentum μ != 0:  β = g                       (W's momentum buffer not created yet)
                      β = μ·β + (1 - dampening)·g (otherwise)
                      d = g + μ·β if nesterov else β
    momentum μ == 0:  d = g
    α = α - lr·d                                  (α starts at 1, β at 0)

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

import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import ConversionTypeError
from .base import FeedbackNode
from .fa import FANode

_implicit: weakref.WeakSet = weakref.WeakSet()  # implicit KP nodes alive in this process
# optimizer id -> [(node, param group, momentum buffer absent before the step)]
_pending: dict[int, list[tuple[KPNode, dict, bool]]] = {}
_hook_handles: tuple | None = None

SGD_ONLY = (
    "the implicit Kolen–Pollack form (kp, implicit=True) equals explicit KP only under torch.optim.SGD, "
    "whose update is linear in the gradient: other optimizers rescale B's and W's gradients apart, so B - W "
    "is no longer a multiple of D0. Use pfa_fx.convert(model, 'kp') (implicit=False) with this optimizer"
)


def _implicit_in(optimizer: torch.optim.Optimizer) -> list[tuple[KPNode, dict]]:
    """The implicit KP nodes whose weight this optimizer holds, with the weight's group."""
    if not _implicit:
        return []
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return [(node, groups[id(node._weight_ref[0])]) for node in list(_implicit) if id(node._weight_ref[0]) in groups]


def _before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Refuse non-SGD optimizers; note, per op about to be updated, whether W's momentum
    buffer exists yet (SGD initialises it to the gradient on its first step)."""
    found = _implicit_in(optimizer)
    if not found:
        return
    if not isinstance(optimizer, torch.optim.SGD):
        names = ", ".join(sorted({n.op_name or "?" for n, _ in found})[:4])
        raise ConversionTypeError(f"{type(optimizer).__name__} is stepping the weights of ops {names}: {SGD_ONLY}.")
    pending = []
    for node, group in found:
        weight = node._weight_ref[0]
        if weight.grad is None:  # SGD skips it: neither W nor (explicit) B moves
            continue
        st = optimizer.state.get(weight)
        pending.append((node, group, st is None or st.get("momentum_buffer") is None))
    _pending[id(optimizer)] = pending


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Advance ``α``/``β`` of every implicit op whose weight this step updated."""
    pending = _pending.pop(id(optimizer), None)
    if not pending:
        return
    found_inf = getattr(optimizer, "found_inf", None)  # fused SGD under GradScaler skips the step
    if found_inf is not None and bool(found_inf.item()):
        return
    hyper: dict[int, tuple] = {}
    nodes, alphas, betas = [], [], []
    for node, group, fresh in pending:
        h = hyper.get(id(group))
        if h is None:
            h = hyper[id(group)] = (
                float(group["lr"]),
                float(group["momentum"]),
                float(group["dampening"]),
                bool(group["nesterov"]),
                float(group["weight_decay"]),
            )
        a, b = node._advance(*h, fresh)
        nodes.append(node)
        alphas.append(a)
        betas.append(b)
    # the buffers written in a few foreach calls (one launch each on a GPU, not three per op)
    for name, values in (("alpha", alphas), ("beta", betas)):
        tensors = [n._buffers[name] for n in nodes]
        torch._foreach_zero_(tensors)
        torch._foreach_add_(tensors, values)
    torch._foreach_add_([n._buffers["steps"] for n in nodes], 1)


def _watch_optimizers() -> None:
    global _hook_handles
    if _hook_handles is None:
        _hook_handles = (
            register_optimizer_step_pre_hook(_before_optimizer_step),
            register_optimizer_step_post_hook(_after_optimizer_step),
        )


class KPNode(FANode):
    rule = "kp"
    plastic = True
    options: ClassVar[dict[str, Any]] = {"scale": "xavier", "implicit": False}

    def __init__(self, weight: Tensor, *, implicit: bool = False, **kwargs: Any):
        super().__init__(weight, **kwargs)
        if not isinstance(implicit, bool):
            raise ConversionTypeError(f"{self.rule}: implicit must be True or False, got {implicit!r}")
        self.implicit = implicit
        B = self._buffers.pop("B")
        if not implicit:
            self.B = nn.Parameter(B)
            return
        self.plastic = False  # W_b = W + α·D0: no state receives a gradient
        with torch.no_grad():
            self.register_buffer("D0", B - weight.detach())
        self.register_buffer("alpha", torch.ones((), dtype=torch.float64, device=weight.device))
        self.register_buffer("beta", torch.zeros((), dtype=torch.float64, device=weight.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=weight.device))
        self.__dict__["_ab"] = (1.0, 0.0)  # host copy of (alpha, beta): no device sync per step
        _implicit.add(self)
        _watch_optimizers()

    # -- the op ------------------------------------------------------------------------
    def state(self) -> tuple[Tensor, ...]:
        return (self.D0, self.alpha) if self.implicit else (self.B,)

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        if len(state) == 1:
            return state[0]
        D0, alpha = state  # alpha: 0-dim float64, used in D0's dtype (no promotion)
        return torch.addcmul(weight, D0, alpha)

    # -- the implicit form's update ----------------------------------------------------
    def sgd_step(
        self,
        lr: float,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        first: bool = False,
    ) -> None:
        """Advance ``α``/``β`` by one SGD step of W (module docstring); ``first``: W's
        momentum buffer did not exist before this step. Called after every
        ``torch.optim.SGD`` step that updates W; loops that apply SGD by hand call it with
        their hyperparameters after each update of W."""
        if not self.implicit:
            raise RuntimeError(f"{self.rule}: sgd_step belongs to the implicit form (implicit=True)")
        alpha, beta = self._advance(lr, momentum, dampening, nesterov, weight_decay, first)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        self.steps.add_(1)

    def _advance(
        self, lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, first: bool
    ) -> tuple[float, float]:
        """The recurrence on the host copy of ``(α, β)``; returns the new values (the
        caller writes them to the buffers)."""
        ab = self.__dict__.get("_ab")
        alpha, beta = ab if ab is not None else (float(self.alpha), float(self.beta))
        g = weight_decay * alpha
        if momentum != 0:
            beta = g if first else momentum * beta + (1 - dampening) * g
            d = g + momentum * beta if nesterov else beta
        else:
            d = g
        alpha = alpha - lr * d
        self.__dict__["_ab"] = (alpha, beta)
        return alpha, beta

    # -- bookkeeping -------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> None:
        for _, node in nodes:
            if isinstance(node, KPNode) and node.implicit and node._weight_fn:
                # a computed weight: D0 against it, so that W_b starts at FA's draw B0
                with torch.no_grad():
                    raw = node._weight_ref[0].detach().reshape(node.weight_shape)
                    node.D0.add_(raw - node.weight.to(node.D0.dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self.__dict__["_ab"] = None  # re-read from the loaded buffers at the next step

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # alpha/beta stay float64 under model.float()/.half() (only their device follows)
        keep = {k: self._buffers[k] for k in ("alpha", "beta") if k in self._buffers}
        out = super()._apply(fn, recurse)
        for k, t in keep.items():
            moved = self._buffers[k]
            if moved is not None and moved.dtype != torch.float64:
                self._buffers[k] = t.to(moved.device)
        return out

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle
        super().__setstate__(state)
        if self.__dict__.get("implicit"):
            self.__dict__["_ab"] = None
            _implicit.add(self)
            _watch_optimizers()

    def extra_repr(self) -> str:
        if not self.implicit:
            return super().extra_repr()
        return super().extra_repr() + f", alpha={float(self.alpha):.6g}, steps={int(self.steps)}"
