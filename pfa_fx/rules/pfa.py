"""Product feedback alignment (Li & Benna 2024): ``W_b = B·R`` through an error population.

``B`` (``n_out x n̄`` per group, fixed random) sends the error into ``n̄ = expansion x
n_out`` units; ``R`` (``n̄ x n_in``, or a full kernel for a conv; plastic) sends it on to
the layer below. ``R`` learns locally: the op hands ``grad_W`` to ``W_b`` and autograd
through ``B @ R`` gives ``grad_R = B^T grad_W``. For a conv, ``B`` is a 1x1 channel mix,
block-diagonal over groups, so feedback never crosses a group.

``compact=True`` keeps ``S`` (W-shaped) with ``G = B B^T`` instead of ``R`` and uses
``W_b = G·S`` with ``grad_S = grad_W``. Every update to ``R`` lies in the range of ``B^T``,
so under SGD-family optimizers (momentum, nesterov, dampening, L2 weight decay, any
schedule) ``G·S`` equals ``B·R`` at every step, with ``|W| + n_out^2`` memory and no
dependence on the expansion. Under Adam/AdamW/RMSprop it is a different rule, and the one
pfa_fx supports there: with ``S`` in W's parameter group ``S`` and W take equal steps, so
``S - W`` only decays and ``G·S -> B·Bᵀ·W`` (Kolen–Pollack's dynamics seen through ``G``; not a
local rule for an explicit ``R``, which Adam would normalise row by row and drive past W):
docs/alignment.md and docs/design.md, section 'Compact PFA and optimizers'. A step that moves
``S`` with other hyperparameters than its W warns. So it is under ``torch.nn.utils.clip_grad_norm_(model.parameters())``,
whose norm counts ``S``'s gradient (``R``'s has another norm); ``pfa_fx.clip_grad_norm_(model,
max_norm)`` takes the factor from the model's own gradients and applies it to both, which
keeps ``G·S`` equal to ``B·R``.

Two exact routes compute the backward; ``route="auto"`` (default) picks per layer and
shape the one with fewer multiply-adds beyond BP's own backward: ``"product"`` builds
``W_b`` once per step (no batch dimension; cheap where batch x positions is large) and
``"population"`` mixes the error into ``ē`` at every position, as the paper describes
and the reference implementation does (cheap where few positions remain, e.g. the last
stage of a ResNet on small images). Both give the same gradients.

``density`` (default 1.0) makes ``B`` sparse: each error unit of ``ē`` connects to a random
fraction ``density`` of the layer's output units (independent Bernoulli(density) mask over
``B``'s entries, drawn after ``R`` from the same seeded generator, so the Gaussian values of
``B`` and ``R0`` are the same at every density), and the kept entries are scaled by
``1/sqrt(density)`` so that ``E[B B^T] = I`` still. An output unit whose mask row came out
empty (probability ``(1 - density)^n̄`` per unit) is connected to one error unit drawn at
random, so that every unit sends its error somewhere and ``G = B B^T`` has no zero row.
With ``compact=True`` a sparse ``G`` must be well conditioned; conversion refuses (``ConversionError``)
when it is not and asks for a larger ``density`` or ``expansion``. ``density=1.0`` draws
exactly what the dense rule always drew. :mod:`pfa_fx.theory` gives the path alignment:
sparsity adds ``3(1/density - 1)/n̄`` to the effective ratio ``(n_out + 1)/n̄`` of the dense
rule (``tan² θ ≈ λ_eff``), a finite-size effect that fades as the layer grows at fixed density.

``compact=True, implicit=True`` (opt-in, SGD only) drops ``S`` as a parameter. Under
``torch.optim.SGD`` with ``S`` in W's group, ``grad_S = grad_W`` leaves ``S - W`` only weight
decay, so ``S(t) = W(t) + α(t)·(S0 - W0)`` with scalar ``α`` following SGD's recurrence, as
for implicit Kolen–Pollack (:mod:`pfa_fx.rules.sgd_implicit` states the math and holds the
machinery). The node keeps the buffer ``D0 = S0 - W`` (``S0`` the compact state drawn as
for ``compact=True``, any ``density``) and ``alpha``/``beta``/``steps``; the backward uses
``W_b = G·(W + α·D0)`` on the product route, and the kernel ``W + α·D0`` in place of ``S``
for the gradient-input pass of the population route, and returns no state gradient.
Nothing W-sized is a parameter, so nothing W-sized is accumulated, clipped or stepped.
It equals ``compact=True`` (hence explicit PFA) under SGD with any lr schedule, momentum,
dampening, nesterov, L2 weight decay and ``maximize``; a step of any other optimizer over
W raises :class:`~pfa_fx.errors.ConversionTypeError` before anything is updated, and
``implicit=True`` without ``compact=True`` is a :class:`~pfa_fx.ConversionError`. For
``pfa-o`` it falls out as is (``W_b = S = W + α·D0``: implicit Kolen–Pollack started from
``B·R0``) and is allowed. Caveats as for implicit KP: a frozen W leaves ``α`` (and the
feedback) where it is; with a computed weight (weight standardization) ``D0`` is taken
against the computed weight; ``pfa_fx.step_feedback`` refuses these ops (loops that apply
SGD by hand call ``node.sgd_step``).

``store_feedback=False`` (explicit form) holds no ``B``: every backward redraws it from the
op's seeded generator, bit for bit the ``B`` of ``store_feedback=True`` with the same seed
(``B`` is the generator's first draw; at ``density < 1`` its mask, drawn after ``R``, is
redrawn from a snapshot of the generator taken where the mask's draw began: 5 KiB per op).
``R`` is plastic and stays a parameter. Cost per op and backward: ``expansion·n_out²/groups``
Gaussian draws on the CPU (pfa-o: and the QR factorization that orthonormalizes them,
``~2·expansion·n_out³/groups²`` flops, which dominates for wide layers), and ``B`` alive while
the op's backward runs. ``compact=True`` keeps ``G = B B^T``: it is derived state
(``n_out²/groups`` numbers, below ``|W|``), and regenerating it would cost a draw and an
``expansion·n_out³`` product per backward, so it stays stored under ``store_feedback=False``
too; the implicit form's ``D0 = S0 - W0`` depends on the model's initial weights, which no
seed regenerates, so it stays stored as well. For the compact forms the option changes
nothing.

``pfa-o`` draws ``B`` with orthonormal rows (``B B^T = I``), so ``W_b -> W`` with weight
decay at any expansion >= 1; under SGD it is Kolen–Pollack started from ``B·R0``. It accepts
only ``density=1.0``: orthonormalizing the rows of a sparse ``B`` fills it in again.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import ConversionError, ConversionTypeError, did_you_mean
from ..node import (
    DEFAULT_SCALE,
    FeedbackNode,
    check_store_feedback,
    feedback_std,
    generator_at,
    generator_key,
    xavier_std,
)
from .align import relax
from .sgd_implicit import SGDImplicit

ROUTES = ("auto", "product", "population")
_SGD_EXACT = (torch.optim.SGD,)
_checked_optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compact_nodes: weakref.WeakSet = weakref.WeakSet()  # explicit compact nodes alive (S a parameter)
_hook_handle = None


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _hyperparameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "pfa_group")}


def _check_compact_groups(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer step pre-hook, once per optimizer: under an adaptive optimizer compact
    PFA's ``S`` follows W's own updates only when both are stepped with the same
    hyperparameters (module docstring); warn where they are not."""
    if optimizer in _checked_optimizers:
        return
    _checked_optimizers[optimizer] = True
    if isinstance(optimizer, _SGD_EXACT):
        return  # linear in the gradient: G·S equals B·R in any group
    groups = _group_of(optimizer)
    apart = []
    for node in list(_compact_nodes):
        gs, gw = groups.get(id(node.S)), groups.get(id(node._weight_ref[0]))
        if gs is not None and (gw is None or _hyperparameters(gs) != _hyperparameters(gw)):
            apart.append(node.op_name or "?")
    if apart:
        warnings.warn(
            f"{type(optimizer).__name__} steps compact PFA state S of {len(apart)} op(s) ({', '.join(apart[:3])}"
            f"{', ...' if len(apart) > 3 else ''}) with other hyperparameters than (or without) its weight W. "
            "Under an adaptive optimizer compact PFA relies on S and W taking equal steps, so that S - W only "
            "decays (G·S -> B·Bᵀ·W); put S in W's group, e.g. with pfa_fx.param_groups(model, weight_decay=...)",
            UserWarning,
            stacklevel=3,
        )


#: compact=True with sparse B refuses G = B B^T whose condition number exceeds this: S = G^-1 B R0
#: would then be dominated by rounding, and W_b = G·S (in the weight's dtype) with it
MAX_COMPACT_CONDITION = 1e8


def check_density(density: Any, rule: str) -> float:
    """``density`` as a float in ``(0, 1]``, or :class:`~pfa_fx.ConversionError` (a ``ValueError``)
    naming the valid range."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConversionError(
            f"{rule}: density must be a number in (0, 1] (the fraction of output units each error unit "
            f"connects to), got {density!r}"
        )
    return float(density)


def sparse_feedback_mask(shape: tuple[int, ...], density: float, generator: torch.Generator) -> Tensor:
    """Boolean mask ``(..., n_out, n̄)``: entry kept with probability ``density``, no empty row.

    A row (output unit) left without any connection gets one, to an error unit drawn at
    random: otherwise that unit's error would reach no one and ``G = B B^T`` would be singular.
    """
    mask = torch.rand(shape, generator=generator, dtype=torch.float64) < density
    empty = ~mask.any(dim=-1)
    if empty.any():
        rows = empty.nonzero(as_tuple=True)
        cols = torch.randint(shape[-1], (len(rows[0]),), generator=generator)
        mask[(*rows, cols)] = True
    return mask


def sparsify_feedback(B: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """``B ⊙ mask / sqrt(density)`` (see :func:`sparse_feedback_mask`): ``E[B B^T]`` is unchanged."""
    mask = sparse_feedback_mask(tuple(B.shape), density, generator)
    return B * mask / math.sqrt(density)


def _watch_optimizers() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_check_compact_groups)


class PFANode(SGDImplicit, FeedbackNode):
    rule = "pfa"
    implicit_of = "S"
    plastic = True
    options: ClassVar[dict[str, Any]] = {
        "expansion": 10,
        "compact": False,
        "route": "auto",
        "scale": DEFAULT_SCALE,
        "density": 1.0,
        "implicit": False,
        "store_feedback": True,
    }
    # both routes give the same gradients; B stored or redrawn holds the same values
    compute_only_options: ClassVar[frozenset[str]] = frozenset({"route", "store_feedback"})
    orthonormal = False

    def __init__(
        self,
        weight: Tensor,
        *,
        groups: int,
        generator: torch.Generator,
        expansion: float = 10,
        compact: bool = False,
        route: str = "auto",
        transposed: bool = False,
        scale: str | float = DEFAULT_SCALE,
        density: float = 1.0,
        implicit: bool = False,
        store_feedback: bool = True,
    ):
        super().__init__(weight, groups=groups, generator=generator, transposed=transposed)
        self.store_feedback = check_store_feedback(store_feedback, self.rule)
        if not isinstance(implicit, bool):
            raise ConversionTypeError(f"{self.rule}: implicit must be True or False, got {implicit!r}")
        if implicit and not compact:
            raise ConversionError(
                f"{self.rule}: implicit=True is a form of the compact state (W_b = G·S with S = W + α·D0): "
                f"convert with compact=True as well, i.e. pfa_fx.convert(model, {self.rule!r}, compact=True, "
                "implicit=True), or leave implicit out"
            )
        self.implicit = implicit
        if isinstance(expansion, bool) or not isinstance(expansion, (int, float)):
            raise ConversionTypeError(f"{self.rule}: expansion must be a number, got {expansion!r}")
        if expansion <= 0 or (self.orthonormal and expansion < 1):
            need = ">= 1 (B needs orthonormal rows)" if self.orthonormal else "> 0"
            raise ConversionError(f"{self.rule}: expansion must be {need}, got {expansion}")
        self.expansion = expansion
        self.compact = bool(compact)
        if route not in ROUTES:
            raise ConversionError(
                f"{self.rule}: unknown route {route!r}; valid routes: {', '.join(ROUTES)}{did_you_mean(route, ROUTES)}"
            )
        self.route = route
        self.density = check_density(density, self.rule)
        if self.orthonormal and self.density != 1.0:
            raise ConversionError(
                f"{self.rule}: density must be 1.0, got {density!r}: orthonormalizing the rows of a sparse B "
                "fills it in again, so an orthonormal B cannot keep a chosen sparsity; use rule='pfa' for "
                "sparse feedback"
            )
        g = self.groups
        out_g = self.n_out // g
        nbar_g = max(1, round(expansion * out_g))
        self.nbar = nbar_g * g

        draw_keys = {"B": generator_key(generator)}  # B is drawn first: redrawn from here
        B = self._draw_B(g, out_g, nbar_g, generator)  # (g, out_g, nbar_g), float64
        # R: (n̄, in/g, *k) drawn Xavier-uniform, as the paper's recipe does; for a
        # transposed convolution W's layout, (in, n̄/g, *k), so R is itself a weight of
        # the same op from x to the population
        if self.transposed:
            r_shape = (weight.shape[0], nbar_g, *weight.shape[2:])
        else:
            r_shape = (self.nbar, *weight.shape[1:])
        # R holds expansion x |W| numbers: drawn in float32 (the same values on every
        # device and process) rather than float64, which would double time and memory
        R = torch.empty(r_shape, dtype=torch.float32)
        nn.init.xavier_uniform_(R, generator=generator)
        self.scale = scale
        if scale != "xavier":
            # W_b = B·R has R's entry scale (B B^T ≈ I): rescale R to the asked-for one
            R.mul_(feedback_std(weight, scale, self.rule) / xavier_std(r_shape))
        if self.density < 1.0:
            # drawn last: at density 1 nothing extra is drawn (seeded results stay as they were),
            # and at any density B's Gaussian values and R0 are those of the dense rule
            draw_keys["mask"] = generator.get_state()  # after R: a redraw of B resumes here
            B = sparsify_feedback(B, self.density, generator)
        to = {"device": weight.device, "dtype": weight.dtype}
        if self.compact:
            G = B @ B.transpose(1, 2)
            G = (G + G.transpose(1, 2)) / 2  # exactly symmetric: the error-side mix uses G for G^T
            if nbar_g < out_g and self.density == 1.0:  # rank n̄ < n_out: S0 = G⁻¹·B·R0 does not exist
                raise ConversionError(
                    f"{self.rule}: compact=True needs expansion >= 1 (G = B·Bᵀ is singular with {nbar_g} error "
                    f"units for {out_g} output units per group); raise expansion to 1 or more, or use "
                    "compact=False (explicit R accepts a bottleneck)"
                )
            if self.density < 1.0:
                self._check_conditioning(G, nbar_g)
            BR = torch.bmm(B, self._grouped(R.double()))
            S = self._ungrouped(torch.linalg.solve(G, BR), self.weight_shape)  # G S0 = B R0, in float64
            self.register_buffer("G", G.to(**to))
            if self.implicit:  # S = W + α·D0 (module docstring): D0 in place of the parameter S
                with torch.no_grad():  # S from solve() is column-major: D0 made contiguous
                    self.init_implicit(S.to(**to).contiguous() - weight.detach())
                return
            # solve() returns column-major results: a non-contiguous S would cost a W-sized
            # reorder in every backward call and in every gradient accumulation
            self.S = nn.Parameter(S.to(**to).contiguous())
            _compact_nodes.add(self)
            _watch_optimizers()
        else:
            if self.store_feedback:
                self.register_buffer("B", self._laid_out(B).to(**to))
            else:
                self.keep_redraw(weight, **draw_keys)
            self.R = nn.Parameter(R.to(**to))

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle
        super().__setstate__(state)
        if self.__dict__.get("compact") and not self.__dict__.get("implicit"):
            _compact_nodes.add(self)
            _watch_optimizers()

    @staticmethod
    def _laid_out(B: Tensor) -> Tensor:
        # stored so that B^T (the error-side mix, ē = B^T e) is the contiguous one: the
        # population route then mixes without copying B, and B·R reads it transposed
        return B.transpose(1, 2).contiguous().transpose(1, 2)

    @property
    def fixed_draws(self) -> tuple[str, ...]:
        return () if self.compact else ("B",)

    def redraw(self, name: str, device: torch.device | None = None) -> Tensor:
        """``B`` as the stored buffer would be now (its dtype and layout), on ``device``
        (default: where the stored buffer would be)."""
        if name != "B" or self.compact or self.store_feedback:
            return super().redraw(name)
        g = self.groups
        out_g = self.n_out // g
        B = self._draw_B(g, out_g, self.nbar // g, generator_at(self._draw_keys["B"]))
        if self.density < 1.0:
            B = sparsify_feedback(B, self.density, generator_at(self._draw_keys["mask"]))
        B = self._trail.apply(self._laid_out(B))  # .to() keeps the strides: the stored layout
        return B.to(self._redraw_probe.device if device is None else device)

    @property
    def draws_from_seed(self) -> bool:
        return bool(self.fixed_draws and not self.store_feedback)  # B redrawn from (seed, op name)

    def _check_conditioning(self, G: Tensor, nbar_g: int) -> None:
        """Refuse a sparse ``G`` that the compact state cannot invert reliably."""
        eig = torch.linalg.eigvalsh(G)  # (g, out_g), ascending
        # a singular G can come out with a tiny negative eigenvalue: clamped, its condition is inf
        cond = eig[:, -1] / eig[:, 0].clamp_min(torch.finfo(G.dtype).tiny)
        worst = int(cond.argmax())
        if float(cond[worst]) > MAX_COMPACT_CONDITION:
            raise ConversionError(
                f"{self.rule}: compact=True needs G = B B^T invertible, but with density={self.density} and "
                f"expansion={self.expansion} ({nbar_g} error units for {G.shape[1]} output units per group) "
                f"G has condition number {float(cond[worst]):.2g} (> {MAX_COMPACT_CONDITION:.0e}) in group "
                f"{worst}; raise density or expansion, or use compact=False"
            )

    def _draw_B(self, g: int, out_g: int, nbar_g: int, generator: torch.Generator) -> Tensor:
        # entries N(0, 1/n̄) per group, so that B B^T ≈ I
        return torch.randn((g, out_g, nbar_g), generator=generator, dtype=torch.float64) / nbar_g**0.5

    # -- the op's backward -------------------------------------------------------------
    def state(self) -> tuple[Tensor, ...]:
        if self.implicit:
            return (self.D0, self.alpha)
        return (self.S,) if self.compact else (self.R,)

    def _mixer(self, device: torch.device | None = None) -> Tensor:
        """The fixed channel mix of the feedback path: ``G`` (compact) or ``B`` (redrawn on
        ``device`` under ``store_feedback=False``)."""
        if self.compact:
            return self.held("G")
        return self.held("B") if self.store_feedback else self.redraw("B", device)

    def _state_tensor(self, weight: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        """``S`` or ``R``; the implicit form's ``S = W + α·D0``."""
        return self.implicit_state(weight, *state) if self.implicit else state[0]

    def feedback_from(self, weight: Tensor, state: tuple[Tensor, ...], mixer: Tensor | None = None) -> Tensor:
        T = self._state_tensor(weight, state)  # S or R
        if self.compact and self.orthonormal:
            return T  # G = B B^T = I: W_b = S, KP's cost (G is kept for inspection only)
        M = (self._mixer(weight.device) if mixer is None else mixer).to(T.dtype)
        return self._ungrouped(torch.bmm(M, self._grouped(T)), self.weight_shape)

    def state_grads(
        self, grad_weight: Tensor, state: tuple[Tensor, ...], mixer: Tensor | None = None
    ) -> tuple[Tensor | None, ...]:
        if self.implicit:
            return (None, None)  # D0 and alpha: no gradient (α follows the optimizer's steps)
        if self.compact:
            return (grad_weight,)  # grad_S = grad_W: G·S then moves exactly as B·R would
        B = (self._mixer(grad_weight.device) if mixer is None else mixer).to(grad_weight.dtype)
        grad_R = torch.bmm(B.transpose(1, 2), self._grouped(grad_weight))
        return (self._ungrouped(grad_R, tuple(state[0].shape)),)

    @torch.no_grad()
    def floor_feedback(self) -> Tensor:
        """``B·Bᵀ·W`` (``G·W``): the feedback weight at the rule's fixed point, whose angle to W
        is the floor of PFA's path alignment (:func:`pfa_fx.floor_alignment`)."""
        W = self.weight
        M = self._mixer(W.device)
        G = M if self.compact else M @ M.mT
        return self._ungrouped(torch.bmm(G.to(W.dtype), self._grouped(W)), self.weight_shape)

    @torch.no_grad()
    def mirror_update(self, estimate: Tensor, rate: float) -> None:
        """:func:`pfa_fx.mirror`'s update, the rule's own local update with the op's noisy
        estimate ``Ŵ`` of W in place of ``grad_W``: ``R`` toward ``Bᵀ·Ŵ`` (so ``B·R -> B·Bᵀ·W``),
        compact ``S`` toward ``Ŵ`` (``G·S -> B·Bᵀ·W``); the implicit form: ``α <- (1 - rate)·α``."""
        if self.implicit:
            self.relax_implicit(rate)
            return
        name = "S" if self.compact else "R"
        state = (self.held(name),)
        (target,) = self.state_grads(estimate.to(state[0].dtype), state)
        relax(getattr(self, name), target, rate)

    def choose_route(self, positions: int, call_macs: int = 0) -> str:
        """``"product"`` (build ``W_b`` once, no batch dimension) or ``"population"`` (mix the
        error through the population, per batch position): whichever costs fewer
        multiply-adds beyond BP's own backward for this shape, counting ``call_macs`` for
        the native calls the population route makes beyond the product route's (for a
        convolution: one more backward call and a 1x1 mix, whose fixed cost decides on
        launch-bound shapes)."""
        if self.compact and self.orthonormal:
            return "product"  # W_b = S: nothing to build
        if self.route != "auto":
            return self.route
        n_out = self.n_out
        fan = math.prod(self.weight_shape) // n_out
        width = n_out // self.groups if self.compact else self.nbar // self.groups
        if self.compact:
            # G·S once vs. G^T e at every position
            product = n_out * width * fan
            population = positions * n_out * width
        else:
            product = 2 * n_out * width * fan  # B·R and B^T grad_W
            population = positions * (n_out * width + 2 * self.nbar * fan - n_out * fan)  # ē, then R's conv
        return "population" if population + call_macs < product else "product"

    def backward(self, family, e, x, weight, state, need):
        # the route depends only on the shape and device: chosen once per (positions, device);
        # while compiling, at trace time and kept nowhere (writing the node's __dict__ inside
        # a traced backward would break the graph at every op)
        key = (family.positions(e), e.device.type)
        if torch.compiler.is_compiling():
            route = self.choose_route(key[0], family.population_call_macs(e.device))
        else:
            routes = self.__dict__.setdefault("_routes", {})
            route = routes.get(key)
            if route is None:
                route = routes[key] = self.choose_route(key[0], family.population_call_macs(e.device))
        # under store_feedback=False: B redrawn once for this backward, dropped when it returns
        mixer = None if self.compact or self.store_feedback else self.redraw("B", e.device)
        if route == "product":
            if mixer is None:
                return super().backward(family, e, x, weight, state, need)
            weight_b = self.feedback_from(weight, state, mixer)  # FeedbackNode.backward, with B passed on
            gx, gw, gb = family.fused(e, x, weight_b, need.x, need.w or need.state, need.b)
            return gx, gw, gb, self.state_grads(gw, state, mixer) if need.state else (None,) * len(state)
        # the error population: ē = B^T e (or G^T e), per position and group. mix() applies
        # its argument transposed; G is symmetric, so its transpose view serves (no copy)
        M = (self.held("G").mT if self.compact else self.held("B") if mixer is None else mixer).to(e.dtype)
        ebar = family.mix(e, M)
        if self.implicit:
            gx = family.fused(ebar, x, self.implicit_state(weight, *state), need.x, False, False)[0] if need.x else None
            _, gw, gb = family.fused(e, x, weight, False, need.w, need.b)
            return gx, gw, gb, (None, None)
        (T,) = state
        if self.compact:
            gx = family.fused(ebar, x, T, need.x, False, False)[0]
            _, gw, gb = family.fused(e, x, weight, False, need.w or need.state, need.b)
            return gx, gw, gb, (gw if need.state else None,)
        # R carries ē down and learns from ē ⊗ x: both from one call
        gx, gR, _ = family.fused(ebar, x, T, need.x, need.state, False)
        _, gw, gb = family.fused(e, x, weight, False, need.w, need.b)
        return gx, gw, gb, (gR,)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nbar={self.nbar}"

    @property
    def implicit_form(self) -> str:  # named in the refusal of a non-SGD optimizer
        return f"the implicit compact form ({self.rule}, compact=True, implicit=True)"

    @property
    def explicit_conversion(self) -> str:
        return f"pfa_fx.convert(model, {self.rule!r}, compact=True)"

    @classmethod
    def attach(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> None:
        cls.rebase_on_computed_weights(node for _, node in nodes)


class PFAONode(PFANode):
    """PFA with orthonormal-row ``B`` (``B B^T = I`` exactly)."""

    rule = "pfa-o"
    orthonormal = True

    def _draw_B(self, g: int, out_g: int, nbar_g: int, generator: torch.Generator) -> Tensor:
        gauss = torch.randn((g, nbar_g, out_g), generator=generator, dtype=torch.float64)
        Q, Rq = torch.linalg.qr(gauss)  # Q: (g, nbar_g, out_g), orthonormal columns
        Q = Q * torch.sign(torch.diagonal(Rq, dim1=1, dim2=2)).unsqueeze(1)  # unique Q
        return Q.transpose(1, 2).contiguous()
