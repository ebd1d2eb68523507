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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RuleConfig, check_bool, check_choice, check_scale, check_store_feedback
from ..draws import DEFAULT_SCALE, feedback_std, gaussian_draw, generator_at, generator_key, xavier_std
from ..errors import ConversionError, ConversionTypeError
from ..node import FeedbackNode
from .align import relax
from .pfa_parts import check_density, compact_nodes, sparsify_feedback, watch_optimizers
from .sgd_implicit import SGDImplicit

ROUTES = ("auto", "product", "population")

#: compact=True with sparse B refuses G = B B^T whose condition number exceeds this: S = G^-1 B R0
#: would then be dominated by rounding, and W_b = G·S (in the weight's dtype) with it
MAX_COMPACT_CONDITION = 1e8


@dataclass(frozen=True)
class PFA(RuleConfig):
    """Product feedback alignment: ``W_b = B·R`` through ``n̄ = expansion·n_out`` error units.

    Args:
        expansion: error units per output unit (``n̄ / n_out``), > 0.
        compact: keep ``S`` (W-shaped) with ``G = B·Bᵀ`` instead of ``R``: exactly
            explicit PFA under SGD, and the form pfa_fx supports under adaptive
            optimizers (needs ``expansion >= 1`` with dense ``B``).
        route: ``"auto"``, ``"product"`` or ``"population"``: how the backward is
            computed (the same numbers).
        scale: ``W_b``'s entry scale, as :class:`FA`'s.
        density: the fraction of output units each error unit connects to, in (0, 1].
        implicit: compact ``S = W + α·D0`` kept implicitly (SGD only; needs ``compact``).
        store_feedback: explicit ``B`` held (True) or redrawn in every backward.
    """

    rule = "pfa"
    compute_only = frozenset({"route", "store_feedback"})  # both routes, held or redrawn: the same numbers
    expansion: float = 10
    compact: bool = False
    route: str = "auto"
    scale: str | float = DEFAULT_SCALE
    density: float = 1.0
    implicit: bool = False
    store_feedback: bool = True

    def validate(self) -> None:
        rule, orthonormal = self.rule, self.rule == "pfa-o"
        check_store_feedback(self.store_feedback, rule)
        check_bool(self.implicit, "implicit", rule)
        check_bool(self.compact, "compact", rule)
        if self.implicit and not self.compact:
            raise ConversionError(
                f"{rule}: implicit=True is a form of the compact state (W_b = G·S with S = W + α·D0): "
                f"convert with compact=True as well, i.e. pfa_fx.convert(model, {rule!r}, compact=True, "
                "implicit=True), or leave implicit out"
            )
        if isinstance(self.expansion, bool) or not isinstance(self.expansion, (int, float)):
            raise ConversionTypeError(f"{rule}: expansion must be a number, got {self.expansion!r}")
        if self.expansion <= 0 or (orthonormal and self.expansion < 1):
            need = ">= 1 (B needs orthonormal rows)" if orthonormal else "> 0"
            raise ConversionError(f"{rule}: expansion must be {need}, got {self.expansion}")
        check_choice(self.route, ROUTES, "route", rule)
        check_scale(self.scale, rule)
        check_density(self.density, rule)
        if orthonormal and self.density != 1.0:
            raise ConversionError(
                f"{rule}: density must be 1.0, got {self.density!r}: orthonormalizing the rows of a sparse B "
                "fills it in again, so an orthonormal B cannot keep a chosen sparsity; use rule='pfa' for "
                "sparse feedback"
            )
        if self.compact and self.expansion < 1 and self.density == 1.0:
            raise ConversionError(
                f"{rule}: compact=True needs expansion >= 1 (G = B·Bᵀ is singular with fewer error units than "
                f"output units, expansion={self.expansion}); raise expansion to 1 or more, or use compact=False "
                "(explicit R accepts a bottleneck)"
            )


@dataclass(frozen=True)
class PFAO(PFA):
    """PFA with orthonormal-row ``B`` (``B·Bᵀ = I`` exactly): ``expansion >= 1``, dense ``B``.
    The options are :class:`PFA`'s."""

    rule = "pfa-o"


class PFANode(SGDImplicit, FeedbackNode):
    rule = "pfa"
    config_type = PFA
    implicit_of = "S"
    plastic = True
    orthonormal = False

    def __init__(self, weight: Tensor, *, generator: torch.Generator, **kwargs: Any):
        super().__init__(weight, generator=generator, **kwargs)
        c = self.rule_config
        self.store_feedback, self.implicit, self.compact = c.store_feedback, c.implicit, c.compact
        self.expansion = expansion = c.expansion
        self.route, self.scale, self.density = c.route, c.scale, float(c.density)
        scale = c.scale
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
            compact_nodes.add(self)
            watch_optimizers()
        else:
            if self.store_feedback:
                self.register_buffer("B", self._laid_out(B).to(**to))
            else:
                self.keep_redraw(weight, **draw_keys)
            self.R = nn.Parameter(R.to(**to))

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle
        super().__setstate__(state)
        if self.__dict__.get("compact") and not self.__dict__.get("implicit"):
            compact_nodes.add(self)
            watch_optimizers()

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
        return gaussian_draw(generator, (g, out_g, nbar_g)) / nbar_g**0.5

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
    config_type = PFAO
    orthonormal = True

    def _draw_B(self, g: int, out_g: int, nbar_g: int, generator: torch.Generator) -> Tensor:
        gauss = gaussian_draw(generator, (g, nbar_g, out_g))
        Q, Rq = torch.linalg.qr(gauss)  # Q: (g, nbar_g, out_g), orthonormal columns
        Q = Q * torch.sign(torch.diagonal(Rq, dim1=1, dim2=2)).unsqueeze(1)  # unique Q
        return Q.transpose(1, 2).contiguous()
