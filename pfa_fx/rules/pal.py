"""Phaseless alignment learning (Max et al. 2022/2024): ``W_b`` learns from noise that is
always present in the network's own activity, with no separate mirror phase.

Implemented: the discrete per-step form of docs/design.md, section 'PAL', for minibatch SGD (static input
within a step, white noise, first order in σ). After every training forward of the
converted model (train mode, grad enabled) a forward hook runs a second, *noisy* pass
over the same batch without grad, whose outputs are discarded: each PAL op adds fresh
noise ``ξ ~ N(0, σ²)`` to its input. The high-passed response of op ``k`` is the change
noise makes to what the next weight op reads from it,

    Δr_k = r_k(noisy pass) − r_k(training pass),   r_k = the input of the op after k,

i.e. ``f(W(h+ξ)+b) − f(Wh+b)`` through the real downstream nonlinearity ``f``
(BatchNorm, activation, residual sums included), and

    ΔW_b = η (KGrad(ξ_k, Δr_k) / N − α W_b)

with ``N`` the noise samples per kernel tap (batch × positions where the tap sees the
input). The update is applied after the optimizer step of the op's weight (as WM's mirror
step; ``pfa_fx.step_feedback(model)`` for loops without ``torch.optim``): the step's
backward uses ``W_b`` as its forward saw it, and a second forward before a backward
(two views of a batch) finds the same ``W_b``. Noise of other ops is independent of ``ξ_k`` and averages out, so the fixed
point is ``W_b* = (σ²/α)·E[f'] ⊙ W``: aligned with W, each output row weighted by its
mean downstream gain (a ReLU unit that is never active gets a zero row). An op whose
output no later weight op reads in its own shape (the classifier; a projection followed
by pooling or a reshape) takes its own response ``Δr = L_W(ξ)``, where PAL reduces to a
weight mirror at the data's operating point: fixed point ``(σ²/α)·W``. The report says
how many ops take which.

The noisy pass restores every buffer (BatchNorm statistics) and the random state
(dropout masks equal the training pass's, and the training stream continues unchanged).
It costs one forward without grad plus one weight-gradient product per op. Under DDP
(``broadcast_buffers=True``, the default) every rank holds rank 0's ``W_b``.

Defaults: ``sigma=0.1`` (small against unit-scale activity: first-order regime),
``decay=None`` → ``α = σ²`` (so ``E[f'] = 1`` gives ``W_b* = W``), ``feedback_lr=None`` →
``0.002/α`` (0.2 % of the way to the fixed point per step, as WM's default). ``W_b`` starts as FA's draw;
being learned, it is always stored (``store_feedback=False`` is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RuleConfig, check_positive, check_scale
from ..draws import DEFAULT_SCALE
from ..node import FeedbackNode
from ..registry import is_feedback_path, op_readers
from ..sharding import local_part, local_tensor, units_gathered
from .wm import RATE, WMNode


@dataclass(frozen=True)
class PAL(RuleConfig):
    """Phaseless alignment learning: ``B`` learned from noise riding on the network's activity.

    Args:
        scale: ``B``'s initial scale, as :class:`FA`'s.
        sigma: the noise's standard deviation.
        feedback_lr: ``B``'s learning rate (None: ``0.002 / decay``).
        decay: ``B``'s decay per step (None: ``sigma**2``).
    """

    rule = "pal"
    learned_feedback = "pal's feedback B is learned (from the noise riding on the network's own activity)"
    scale: str | float = DEFAULT_SCALE
    sigma: float = 0.1
    feedback_lr: float | None = None
    decay: float | None = None

    def validate(self) -> None:
        check_scale(self.scale, self.rule)
        check_positive(self.sigma, "sigma", self.rule)
        check_positive(self.feedback_lr, "feedback_lr", self.rule, optional=True)
        check_positive(self.decay, "decay", self.rule, optional=True)


class PALNode(WMNode):
    rule = "pal"
    config_type = PAL
    records_input = True
    mirrors_after_step = False

    def __init__(self, weight: Tensor, **kwargs: Any):
        super().__init__(weight, **kwargs)
        lr = self.rule_config.feedback_lr
        self.feedback_lr = RATE / self.decay if lr is None else float(lr)
        del self.mirror_lr, self.mirror_batch  # not options of PAL: its noise rides on the data
        self._update: Tensor | None = None  # learned in noisy passes, applied at the optimizer step
        self._clean: Tensor | None = None
        self._pending: tuple | None = None
        self._counts: dict[tuple, Tensor] = {}
        self.__dict__["_consumers"] = []  # ops reading this op's output (set by attach)
        self.__dict__["_producers"] = []

    @property
    def mirror_rate(self) -> float:
        return self.feedback_lr * self.decay

    # -- the op ------------------------------------------------------------------------
    def relax(self, kgrad: Tensor, count: Tensor | float) -> None:
        # the noisy pass runs between the op's forward and its backward, which reads W_b:
        # the update waits for the optimizer step (or pfa_fx.step_feedback), like WM's
        delta = ((kgrad / count).to(self.B.dtype) - self.decay * self.B) * self.feedback_lr
        self._update = delta if self._update is None else self._update + delta

    def after_optimizer_step(self) -> None:
        """Apply the updates of the noisy passes since the last step."""
        if self._update is not None:
            update = self._update
            mesh = getattr(self.B, "device_mesh", None)
            if mesh is not None:
                # sharded under FSDP2: each rank measured its own part of the batch; all take the
                # mean of the ranks' estimates, and each adds its own rows of it
                torch.distributed.all_reduce(update, group=mesh.get_group())
                update = update / mesh.size()
            local_tensor(self.B).add_(local_part(update, self.B))
            self._update = None

    # -- the training pass: remember what each op read ----------------------------------
    def record_input(self, x: Tensor) -> None:
        # the op saves x for its weight gradient: autograd refuses any in-place change to
        # it before the backward, so this reference still holds what the op read
        self._clean = x.detach()

    # -- the noisy pass ----------------------------------------------------------------
    def noisy_forward(self, family: Any, native: Any, x: Tensor, weight: Tensor) -> Tensor:
        clean = self._clean
        if clean is not None and clean.shape == x.shape:
            delta = x - clean  # the response to every earlier op's noise, through f
            for producer in self._producers:
                producer._take_response(delta)
        xi = self.noise(tuple(x.shape), self.steps, x)
        y = native(x + xi, True)
        self._pending = (family, native, xi, weight.detach(), tuple(y.shape))
        return y

    def _take_response(self, delta: Tensor) -> None:
        if self._pending is not None and delta.shape == self._pending[4]:
            self._learn(delta)

    def _learn(self, response: Tensor) -> None:
        family, _, xi, weight, _ = self._pending
        dt = self.B.dtype  # under autocast the pass ran in bfloat16: learn in W_b's dtype
        xi = xi.to(dt)
        kgrad = family.fused(response.to(dt), xi, weight.to(dt), False, True, False)[1]
        self.relax(kgrad, self._samples_per_tap(family, xi, response, weight))
        self._pending = None

    def finish_noisy_pass(self) -> str | None:
        """End of the noisy pass: an op no later op answered learns from its own response.
        Returns ``"own"``/``"downstream"`` for the op's update this step, or None."""
        which = None
        if self._pending is not None:
            _, native, xi, _, _ = self._pending
            self._learn(native(xi, False))  # Δr = L_W(ξ): the weight-mirror form
            which = "own"
        elif self._clean is not None:
            which = "downstream"
        self._clean = None
        self.steps += 1
        self.last_response = which
        return which

    def _samples_per_tap(self, family: Any, xi: Tensor, response: Tensor, weight: Tensor) -> Tensor | float:
        if weight.dim() == 2:
            return xi.numel() // xi.shape[-1]
        # per kernel tap: batch x the output positions at which the tap reads inside the
        # input (fewer at padded borders), so KGrad/N estimates σ²·gain·W tap by tap
        key = (tuple(xi.shape[2:]), tuple(response.shape[2:]), xi.device)
        counts = self._counts.get(key)
        if counts is None:
            from ..ops import ConvFamily

            single = ConvFamily(
                family.stride, family.padding, family.dilation, 1, None, family.transposed, family.output_padding
            )
            ones_in = torch.ones((1, 1, *xi.shape[2:]), device=xi.device, dtype=torch.float64)
            ones_out = torch.ones((1, 1, *response.shape[2:]), device=xi.device, dtype=torch.float64)
            probe = torch.zeros((1, 1, *weight.shape[2:]), device=xi.device, dtype=torch.float64)
            counts = single.fused(ones_out, ones_in, probe, False, True, False)[1].clamp_min(1)
            self._counts[key] = counts
        return (counts * xi.shape[0]).to(xi.dtype)

    def fixed_point(self, gain: Tensor | None = None) -> Tensor:
        """``(σ²/α)·gain ⊙ W`` (``gain``: mean downstream gain per output unit; None: 1)."""
        target = super().fixed_point()
        if gain is None:
            return target
        shape = (-1,) + (1,) * (target.dim() - 1)
        return target * gain.reshape(shape).to(target.dtype)

    # -- model-level hooks -------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> None:
        _link_consumers(model, dict(nodes))
        model.__dict__["_pfa_pal"] = _NoisyPass([node for _, node in nodes])
        model.register_forward_pre_hook(_before_training_forward, with_kwargs=True)
        model.register_forward_hook(_after_training_forward, with_kwargs=True)

    @classmethod
    def report_notes(cls, model: nn.Module, nodes: list[tuple[str, FeedbackNode]]) -> list[str]:
        linked = sum(1 for _, node in nodes if node._consumers)
        return [
            f"pal: {linked} of {len(nodes)} ops measure their noise response at the input of the weight op "
            f"that reads them (through the real nonlinearity); {len(nodes) - linked} use their own response "
            "L_W(ξ) (weight-mirror form), as do linked ops whose reader has another shape"
        ]


def _link_consumers(model: nn.Module, nodes: dict[str, PALNode]) -> None:
    """Link each PAL op to the PAL ops that read its output (as the pass found them)."""
    for key, readers in op_readers(model).items():
        producer = nodes.get(key)
        if producer is None:
            continue
        for reader in readers:
            consumer = nodes.get(reader)
            if consumer is not None and consumer is not producer and consumer not in producer._consumers:
                producer._consumers.append(consumer)
                consumer._producers.append(producer)


class _NoisyPass:
    """Per converted model: its PAL ops, and the random state of the running forward."""

    def __init__(self, nodes: list[PALNode]):
        self.nodes = nodes
        self.running = False
        self.rng: tuple | None = None


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _training_forward(module: nn.Module) -> _NoisyPass | None:
    noisy = module.__dict__.get("_pfa_pal")
    if noisy is None or noisy.running or not (module.training and torch.is_grad_enabled()):
        return None
    return noisy


@torch.compiler.disable  # bookkeeping and a whole second pass: eager, outside any compiled graph
def _before_training_forward(module: nn.Module, args: Any, kwargs: Any) -> None:
    noisy = _training_forward(module)
    if noisy is not None:
        noisy.rng = _rng_state()  # the noisy pass replays the training pass's dropout masks


@torch.compiler.disable
def _after_training_forward(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    noisy = _training_forward(module)
    if noisy is None or noisy.rng is None:
        return
    after = _rng_state()
    # the noisy pass writes BatchNorm statistics into stand-ins: the originals (which the
    # training pass's backward may have saved) are never touched
    saved = [(m, dict(m._buffers)) for name, m in module.named_modules() if m._buffers and not is_feedback_path(name)]
    for m, buffers in saved:
        for k, b in buffers.items():
            if b is not None:
                m._buffers[k] = b.clone()
    noisy.running = True
    try:
        _set_rng_state(noisy.rng)
        for node in noisy.nodes:
            node.noisy = True
        # under FSDP2 the pass runs inside the root's forward, where the blocks' pre-forward
        # hooks do not gather again: every unit is gathered for it (the root, whose forward is
        # running, stays so); and again after it, as the blocks' post-forward hooks freed theirs
        with torch.no_grad(), units_gathered(module, keep_gathered=(module,)):
            module(*args, **kwargs)
        with torch.no_grad(), units_gathered(module, keep_gathered=(module,)):
            for node in noisy.nodes:
                node.finish_noisy_pass()
    finally:
        for node in noisy.nodes:
            node.noisy = False
            node._pending = None
            node._clean = None
        for m, buffers in saved:
            m._buffers.update(buffers)
        _set_rng_state(after)
        noisy.running = False
        noisy.rng = None
