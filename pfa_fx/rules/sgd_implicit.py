"""State that differs from W only by weight decay, tracked by two scalars under SGD.

Some plastic rules keep a W-shaped state ``P`` whose gradient is W's own gradient,
``grad_P = grad_W``: Kolen–Pollack's ``B`` (``W_b = B``) and compact PFA's ``S``
(``W_b = G·S``). Under ``torch.optim.SGD`` with ``P`` in W's parameter group, the
difference ``D = P - W`` then receives the gradient ``grad_P - grad_W + wd·(P - W) = wd·D``
(``maximize`` negates both gradients before the decay is added, so it cancels too):
nothing data-dependent reaches ``D``, and every entry of it follows one scalar
recurrence, ``D(t) = α(t)·D0`` with ``D0 = P0 - W0`` and the momentum buffer
``buf_D = β(t)·D0``. Per optimizer step that updates W (W has a gradient), with the
hyperparameters of W's group at that step, as ``torch.optim.sgd._single_tensor_sgd``
computes them::

    g = wd·α
    momentum μ != 0:  β = g                       (W's momentum buffer not created yet)
                      β = μ·β + (1 - dampening)·g (otherwise)
                      d = g + μ·β if nesterov else β
    momentum μ == 0:  d = g
    α = α - lr·d                                  (α starts at 1, β at 0)

so ``P(t) = W(t) + α(t)·D0`` exactly (up to rounding, ~1e-16 relative per step in
float64), and the rule's *implicit* form keeps ``D0`` as a buffer instead of ``P`` as a
parameter. :class:`SGDImplicit` is that machinery, shared by the rules that offer it
(``kp`` and compact ``pfa``/``pfa-o`` with ``implicit=True``): the buffers ``D0`` (W-shaped,
W's dtype), ``alpha``, ``beta`` (0-dim float64, kept float64 under ``.float()``/``.half()``)
and ``steps`` (int64, the updates applied); global optimizer step hooks that find the
implicit nodes whose weight an optimizer holds, refuse any optimizer that is not
``torch.optim.SGD`` (:class:`~pfa_fx.errors.ConversionTypeError`, before anything is
updated) and advance ``α``/``β`` after each step; :meth:`SGDImplicit.sgd_step` for loops
that apply SGD by hand; re-reading ``α``/``β`` after ``load_state_dict``; re-registration
of copies (``copy.deepcopy``, pickle).

The momentum-buffer state is read from the optimizer itself (before the step, by a step
pre-hook), so a fresh optimizer started on a loaded checkpoint continues as the explicit
form's would. A frozen W (``requires_grad=False`` or not in the optimizer) leaves ``α``
where it is, whereas the explicit form would keep moving ``P``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import ConversionTypeError

_implicit: weakref.WeakSet = weakref.WeakSet()  # implicit nodes alive in this process
# optimizer id -> [(node, param group, momentum buffer absent before the step)]
_pending: dict[int, list[tuple[SGDImplicit, dict, bool]]] = {}
_hook_handles: tuple | None = None


def _implicit_in(optimizer: torch.optim.Optimizer) -> list[tuple[SGDImplicit, dict]]:
    """The implicit nodes whose weight this optimizer holds, with the weight's group."""
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
        raise ConversionTypeError(
            f"{type(optimizer).__name__} is stepping the weights of ops {names}: {found[0][0].sgd_only_message()}."
        )
    pending = []
    for node, group in found:
        weight = node._weight_ref[0]
        if weight.grad is None:  # SGD skips it: neither W nor (explicit) P moves
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


class SGDImplicit:
    """Mixin for a :class:`~pfa_fx.node.FeedbackNode` with an implicit form (module
    docstring). The node sets ``self.implicit`` and, when it is True, calls
    :meth:`init_implicit` with ``D0``; its ``state()`` returns ``(self.D0, self.alpha)`` and
    its ``feedback_from`` builds ``P = W + α·D0`` with :meth:`implicit_state`."""

    implicit: bool = False
    #: what the refusal of a non-SGD optimizer calls this form, and the conversion to use instead
    implicit_form: str = "this implicit form"
    explicit_conversion: str = "implicit=False"
    #: the explicit state ``P`` this form replaces (named in messages)
    implicit_of: str = "P"

    def sgd_only_message(self) -> str:
        p = self.implicit_of
        return (
            f"{self.implicit_form} equals the explicit form only under torch.optim.SGD, whose update is linear "
            f"in the gradient: other optimizers rescale {p}'s and W's gradients apart, so {p} - W is no longer a "
            f"multiple of D0. Use {self.explicit_conversion} (implicit=False) with this optimizer"
        )

    def init_implicit(self, D0: Tensor) -> None:
        """Register ``D0`` and the scalars ``α = 1``, ``β = 0``, ``steps = 0``; watch optimizers."""
        device = D0.device
        self.plastic = False  # P = W + α·D0: no state receives a gradient
        self.register_buffer("D0", D0)
        self.register_buffer("alpha", torch.ones((), dtype=torch.float64, device=device))
        self.register_buffer("beta", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        self.__dict__["_ab"] = (1.0, 0.0)  # host copy of (alpha, beta): no device sync per step
        _implicit.add(self)
        _watch_optimizers()

    @staticmethod
    def implicit_state(weight: Tensor, D0: Tensor, alpha: Tensor) -> Tensor:
        """``P = W + α·D0``: one fused pointwise op (alpha, 0-dim float64, is used in D0's dtype)."""
        return torch.addcmul(weight, D0, alpha)

    # -- the update ----------------------------------------------------------------------
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

    @torch.no_grad()
    def relax_implicit(self, rate: float) -> None:
        """``P <- (1 - rate)·P + rate·W`` in the implicit form: ``α <- (1 - rate)·α`` (the
        expected value of :func:`pfa_fx.mirror`'s relaxation toward its noisy estimate of W)."""
        self.alpha.mul_(1.0 - rate)
        self.__dict__["_ab"] = None  # re-read from the buffer at the next step

    # -- bookkeeping -----------------------------------------------------------------------
    @staticmethod
    def rebase_on_computed_weights(nodes: Any) -> None:
        """For implicit nodes whose op computes its weight (weight standardization): ``D0``
        against the computed weight, so that ``P`` starts at the explicit form's ``P0``."""
        for node in nodes:
            if isinstance(node, SGDImplicit) and node.implicit and node._weight_fn:
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
