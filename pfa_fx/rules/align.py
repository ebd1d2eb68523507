"""Aligned starts without weight transport: :func:`mirror` for every plastic rule.

A plastic rule's feedback state learns toward a fixed point set by W: Kolen–Pollack's
``B -> W``, weight mirror's and PAL's ``B -> (σ²/λ)·W``, PFA's ``R -> Bᵀ·W`` (so that
``W_b = B·R -> B·Bᵀ·W``, the rule's floor), compact PFA's ``S -> W`` (``G·S -> B·Bᵀ·W``), PFA-o's
``B·R -> W``. Training gets there slowly (under AdamW with weight decay 0.1, KP's ``B - W``
keeps ~98 % of its start after 200 steps), and a pretrained model starts fine-tuning with
feedback unrelated to its weights. :func:`mirror` moves the state there before training,
from noise alone, as the weight mirror of Akrout et al. (2019) does:

    ξ ~ N(0, 1) at the op's input (one receptive field per sample), y = L_W(ξ) (no bias),
    Ŵ = KGrad(ξ, y) / N,  E[Ŵ] = W,

with ``KGrad`` the op's own weight gradient — what the op computes anyway, with ``ξ`` in
place of its input and ``y`` in place of its error. Each op then applies its rule's own
local update with ``Ŵ`` in place of the weight gradient its state receives in training
(:meth:`~pfa_fx.FeedbackNode.state_grads`: ``Ŵ`` for KP's ``B`` and compact ``S``, ``Bᵀ·Ŵ`` for
PFA's ``R``), as a relaxation ``P <- (1 - r)·P + r·target``. Nothing else: no data, no module
of the model runs (BatchNorm statistics untouched), W and every buffer of the model keep
their values, the noise comes from each op's own generator seeded by ``(seed, op name,
draw)`` (the global RNG stream is not touched), and no value of W is copied into the state
— the state only ever sees ``Ŵ``, a noisy correlation.

Schedules: ``"average"`` (default) takes ``r = 1/(t+1)`` at step ``t`` of the call, so the
state ends as the mean of the call's ``steps`` estimates, whatever it started from; each
estimate is off by ``sqrt(fan_in / batch)`` of ``|W|`` in random directions, the mean by
``sqrt(fan_in / (batch·steps))``: ~``atan`` of that in degrees away from the fixed point
(fan_in 256, batch 64, 500 steps: 5°; a 3×3×512 convolution needs ~16× more for the same).
``"constant"`` takes each op's own rate every step (weight mirror's ``mirror_lr·decay``, the
authors' initial mirror pass; 0.002 for the others), a 500-step time constant.

The implicit forms (``kp`` and compact ``pfa`` with ``implicit=True``) hold their state as
``W + α·D0``: the relaxation's expected value keeps that form (``α <- (1 - r)·α``), its noise
term has no place in it and is dropped.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import ConversionError
from ..node import FeedbackNode, gathered, local_part, local_tensor
from ..registry import feedback_modules

SCHEDULES = ("average", "constant")
#: noise samples per op and step where the op has no ``mirror_batch`` of its own
BATCH = 64
#: the relaxation rate per step of ``schedule="constant"`` for ops without one of their own
RATE = 0.002


def as_maps(groups: int, transposed: bool, weight: Tensor) -> Tensor:
    """W as one matrix per group, ``(g, fan_in, fan_out)``, from a receptive field of input
    to the outputs it reaches: ``(C_in/g·k, out/g)`` for a convolution (one output position),
    ``(in/g, out/g·k)`` for a transposed one (one input pixel), ``(in, out)`` for a linear op."""
    if transposed:  # (in, out/g, *k): input channel i reaches out/g·k outputs
        return weight.reshape(groups, weight.shape[0] // groups, -1)
    return weight.reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2)


def noise_response(node: FeedbackNode, weight: Tensor, xi: Tensor) -> Tensor:
    """``KGrad(ξ, L_W ξ)`` in W's layout, for noise ``xi`` of shape ``(g, N, fan_in)``: the op's
    own call at one receptive field per sample and its weight gradient, as batched matrix
    products (``2N·|W|`` multiply-adds)."""
    maps = as_maps(node.groups, node.transposed, weight)
    kgrad = torch.bmm(xi.transpose(1, 2), torch.bmm(xi, maps))  # (g, fan_in, fan_out)
    if node.transposed:
        return kgrad.reshape(weight.shape)
    return kgrad.transpose(1, 2).reshape(weight.shape)


def fan_in(node: FeedbackNode, weight: Tensor) -> int:
    """Inputs of one receptive field per group: the noise's width."""
    return weight.shape[0] // node.groups if node.transposed else weight[0].numel()


def noise_estimate(node: FeedbackNode, batch: int, weight: Tensor | None = None) -> Tensor:
    """``Ŵ = KGrad(ξ, L_W ξ) / batch`` with unit noise from the op's own stream: ``E[Ŵ] = W``.

    Weight mirror and PAL draw from their own noise stream, whose draw count ``state_dict``
    saves; the other rules from a stream seeded by ``(seed, op name, draw)`` whose count is
    not saved (a reloaded model's next :func:`mirror` starts that count again)."""
    if weight is None:
        weight = gathered(node.weight)  # sharded between steps under FSDP2: every rank draws the same
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    shape = (node.groups, batch, fan_in(node, weight))
    draw = getattr(node, "mirror_noise", None)
    if draw is not None:
        xi = draw(shape, weight).to(dtype)
    else:
        count = node.__dict__.get("_mirror_draws", 0)
        node.__dict__["_mirror_draws"] = count + 1
        gen = node.stream(weight.device, "pfa_fx.mirror", node.seed, node.op_name, count)
        xi = torch.randn(shape, generator=gen, device=weight.device, dtype=dtype)
    return noise_response(node, weight.to(dtype), xi).div_(batch)


def relax(state: Tensor, target: Tensor, rate: float) -> None:
    """``state <- (1 - rate)·state + rate·target`` in place, ``target`` in ``state``'s full
    shape; a sharded state (FSDP2) updates its own rows."""
    target = local_part(target.reshape(state.shape).to(state.dtype), state)
    local_tensor(state).mul_(1.0 - rate).add_(target, alpha=rate)


def _aligns(node: FeedbackNode) -> bool:
    return callable(getattr(node, "mirror_update", None))


@torch.no_grad()
def mirror(model: nn.Module, steps: int = 1, *, schedule: str = "average", batch: int | None = None) -> int:
    """Align every plastic op's feedback with its weight from noise, before training.

    Runs ``steps`` mirror steps on every op of ``model`` whose rule learns its feedback —
    ``kp`` (explicit and implicit), ``wm``, ``pal``, ``pfa`` (explicit, compact, implicit),
    ``pfa-o`` — each a local update of the op's feedback state from noise sent through the
    op itself (module docstring): no data, no grad, nothing else of the model runs, W,
    buffers and the global RNG untouched. Use it before fine-tuning a pretrained model (its
    feedback otherwise starts unrelated to its weights) and before training from scratch
    where the rule's own alignment is slow (adaptive optimizers, few steps).

    Args:
        model: a converted model.
        steps: mirror steps per op (``>= 0``).
        schedule: ``"average"`` (default: the state becomes the mean of the call's
            estimates) or ``"constant"`` (each op's own rate; weight mirror's initial pass
            as its authors run it).
        batch: noise samples per op and step (default: ``wm``'s ``mirror_batch``, else
            :data:`BATCH`); the estimate's error falls as ``1/sqrt(batch·steps)``.

    Returns:
        The number of ops aligned. A model with no plastic op gets a warning naming the
        rules it has.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if schedule not in SCHEDULES:
        raise ConversionError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be an int >= 1 or None, got {batch!r}")
    found = sorted(feedback_modules(model), key=lambda item: item[0])  # op-name order: the same on every rank
    nodes = [node for _, node in found if _aligns(node)]
    if not nodes:
        rules = sorted({node.rule for _, node in found})
        what = f"its ops use {', '.join(rules)}" if rules else "it has no converted op"
        warnings.warn(
            f"pfa_fx.mirror: nothing to align, {what}; mirror aligns the plastic rules kp, wm, pal, pfa, pfa-o "
            "(fixed feedback — fa, dfa, sf — and bp have no state to align)",
            UserWarning,
            stacklevel=2,
        )
        return 0
    for node in nodes:  # op by op (each has its own noise stream): one W-sized accumulator at a time
        if schedule == "constant" and batch is None and getattr(node, "mirrors_after_step", False):
            for _ in range(steps):
                node.mirror_step()  # weight mirror's own step, bit for bit
            continue
        _relax_from_noise(node, steps, schedule, batch if batch is not None else getattr(node, "mirror_batch", BATCH))
    return len(nodes)


def _relax_from_noise(node: FeedbackNode, steps: int, schedule: str, batch: int) -> None:
    """``steps`` relaxations of the node's state toward its rule's target for the step's noise
    estimate, applied at once: every rule's target is linear in the estimate (``Ŵ``, ``Bᵀ·Ŵ``)
    and the relaxation is linear in both, so after the steps ``P = c·P0 + target(M)`` with
    ``c = ∏(1 - r_t)`` and ``M`` the estimates relaxed the same way from zero, which one update
    ``P <- (1 - (1 - c))·P + (1 - c)·target(M / (1 - c))`` gives. The rule's update (for PFA a
    ``Bᵀ`` product ``expansion·n_out`` times the size of W) then runs once, not per step."""
    if steps == 0:
        return
    weight = gathered(node.weight)  # gathered once per op under FSDP2 (every rank, in op order)
    M, keep = None, 1.0
    for t in range(steps):
        rate = 1.0 / (t + 1) if schedule == "average" else getattr(node, "mirror_rate", RATE)
        estimate = noise_estimate(node, batch, weight)
        M = estimate.mul_(rate) if M is None else M.mul_(1.0 - rate).add_(estimate, alpha=rate)
        keep *= 1.0 - rate
    node.mirror_update(M / (1.0 - keep), 1.0 - keep)


__all__ = ["BATCH", "RATE", "SCHEDULES", "as_maps", "fan_in", "mirror", "noise_estimate", "noise_response", "relax"]
