"""The parts of product feedback alignment that are not its node: sparse feedback ``B``
and the check that an adaptive optimizer steps compact PFA's ``S`` with its W."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import ConversionError

_SGD_EXACT = (torch.optim.SGD,)
_checked_optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: explicit compact nodes alive (S a parameter)
compact_nodes: weakref.WeakSet = weakref.WeakSet()
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
    for node in list(compact_nodes):
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


def watch_optimizers() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_check_compact_groups)
