"""Finding a model's weight ops: the modules whose weight the pass converts, the weights
inside code that tracing keeps opaque, and the parameter a computed weight comes from."""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .registry import attr

TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: the modules whose weight is a weight op's
WEIGHT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_MODULES)
_PLAIN_FORWARDS = {m.forward for m in WEIGHT_MODULES}
#: nn.MultiheadAttention's input projections (bare parameters, no Linear of their own)
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def in_out_linear_modules() -> tuple[type[nn.Module], ...]:
    """Modules that hold a linear map's weight as ``(in, out)`` and apply it as
    ``x @ W (+ b)``: Hugging Face's ``Conv1D`` (GPT-2, GPT, ...). Looked up only where
    transformers is already imported: a model holding one has imported it."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def is_plain_weight_module(m: nn.Module) -> bool:
    """A Linear/Conv whose forward is torch's own (subclasses with their own forward,
    e.g. weight-standardized convs, are traced through instead)."""
    return isinstance(m, WEIGHT_MODULES) and type(m).forward in _PLAIN_FORWARDS


class HiddenWeight(NamedTuple):
    """A weight used inside code the graph does not show, and what its feedback needs."""

    param_path: str
    key: str
    weight: torch.Tensor
    groups: int
    owner: nn.Module
    transposed: bool = False
    bank: torch.Tensor | None = None  # an expert bank's parameter (``weight`` is its kernel view)
    in_out: torch.Tensor | None = None  # an (in, out) parameter (``weight`` is its transpose)
    experts: int | None = None  # a mixture-of-experts bank of this many experts (``bank`` its 3-D parameter)


def hidden_weights(m: nn.Module, path: str) -> list[HiddenWeight]:
    """Weight-op weights inside a module that stays opaque: Linear/Conv weights and
    ``nn.MultiheadAttention``'s input projections."""
    found = []
    in_out = in_out_linear_modules()
    for rel, sub in m.named_modules():
        base = ".".join(p for p in (path, rel) if p)
        prefix = f"{base}." if base else ""
        if (bank := expert_bank_shape(sub)) is not None:
            # a bank of expert kernels (timm's CondConv2d), held as kernels: one feedback
            # state per expert, block-diagonal over experts (and groups) like a grouped conv
            kernels = sub.weight.detach().reshape(bank)
            groups = sub.num_experts * getattr(sub, "groups", 1)
            found.append(HiddenWeight(f"{prefix}weight", base or "weight", kernels, groups, sub, False, sub.weight))
        elif banks := expert_banks(sub, prefix):
            found += banks  # mixture-of-experts banks (3-D parameters applied per expert)
        elif in_out and isinstance(sub, in_out) and isinstance(sub.weight, torch.Tensor) and sub.weight.dim() == 2:
            found.append(HiddenWeight(f"{prefix}weight", base or "weight", sub.weight.t(), 1, sub, in_out=sub.weight))
        elif isinstance(sub, WEIGHT_MODULES) and isinstance(sub.weight, torch.Tensor):
            groups, transposed = getattr(sub, "groups", 1), isinstance(sub, TRANSPOSED_MODULES)
            found.append(HiddenWeight(f"{prefix}weight", base or "weight", sub.weight, groups, sub, transposed))
        if isinstance(sub, nn.MultiheadAttention):
            for name in MHA_WEIGHTS:
                p = getattr(sub, name, None)
                if isinstance(p, torch.Tensor):
                    found.append(HiddenWeight(f"{prefix}{name}", f"{prefix}{name}", p, 1, sub))
    return found


def route_paths(model: nn.Module, h: HiddenWeight) -> list[str]:
    """The parameters the interception recognises ``h``'s weight by: the parameter itself,
    or, for a parametrized weight (``nn.utils.parametrizations.weight_norm``, as wav2vec2's
    positional convolution has), the original tensors it is computed from each call."""
    mod_path, _, name = h.param_path.rpartition(".")
    owner = get_module(model, mod_path)
    if owner is not None and parametrize.is_parametrized(owner, name):
        prefix = f"{mod_path}.parametrizations.{name}" if mod_path else f"parametrizations.{name}"
        return [f"{prefix}.{n}" for n, _ in owner.parametrizations[name].named_parameters()]
    return [h.param_path]


def expert_bank_shape(m: nn.Module) -> tuple[int, ...] | None:
    """``(experts·out, in/g, *k)`` for a module holding a bank of flattened expert kernels
    ``(experts, out·in/g·k…)`` mixed per sample (timm's CondConv2d), else None."""
    shape, experts, w = getattr(m, "weight_shape", None), getattr(m, "num_experts", None), getattr(m, "weight", None)
    if not (isinstance(shape, tuple) and isinstance(experts, int) and isinstance(w, nn.Parameter)):
        return None
    if w.dim() != 2 or tuple(w.shape) != (experts, math.prod(shape)):
        return None
    return (experts * shape[0], *shape[1:])


def expert_banks(m: nn.Module, prefix: str = "") -> list[HiddenWeight]:
    """The expert banks a mixture-of-experts module holds: its own 3-D parameters with one
    entry per expert (``num_experts`` of them) on axis 0, stored ``(E, out, in)``, or
    ``(E, in, out)`` where the module says ``is_transposed`` (transformers' experts classes)."""
    experts = getattr(m, "num_experts", None)
    if not isinstance(experts, int) or experts < 1:
        return []
    transposed = bool(getattr(m, "is_transposed", False))
    return [
        bank_weight(f"{prefix}{name}", p, m, transposed)
        for name, p in m._parameters.items()
        if isinstance(p, nn.Parameter) and p.dim() == 3 and p.shape[0] == experts
    ]


def bank_weight(path: str, bank: torch.Tensor, owner: nn.Module | None, transposed: bool) -> HiddenWeight:
    """The :class:`HiddenWeight` of a bank ``(E, a, b)``: its node's weight is the bank as
    ``E`` groups, ``(E·a, b)``, as a convolution's (``transposed``: ``(E, in, out)``, held like
    a transposed convolution's ``(in, out/groups)``)."""
    experts = bank.shape[0]
    view = bank.detach().reshape(experts * bank.shape[1], bank.shape[2])
    key = path[: -len(".weight")] if path.endswith(".weight") else path
    return HiddenWeight(path, key, view, experts, owner, transposed, bank, experts=experts)


def weights_passed_to(gm: nn.Module, node: fx.Node) -> list[HiddenWeight]:
    """Weight-op weights handed as arguments to an opaque (FX-wrapped) function."""
    found: list[HiddenWeight] = []
    for arg in node.all_input_nodes:
        if arg.op != "get_attr":
            continue
        mod_path, _, name = arg.target.rpartition(".")
        owner = get_module(gm, mod_path)
        if owner is None:
            continue
        if (isinstance(owner, WEIGHT_MODULES) and name == "weight") or (
            isinstance(owner, nn.MultiheadAttention) and name in MHA_WEIGHTS
        ):
            key = mod_path if name == "weight" else arg.target
            transposed = isinstance(owner, TRANSPOSED_MODULES)
            found.append(
                HiddenWeight(arg.target, key, attr(gm, arg.target), getattr(owner, "groups", 1), owner, transposed)
            )
    return found


def is_param(gm: nn.Module, path: str) -> bool:
    mod_path, _, name = path.rpartition(".")
    return name in get_module(gm, mod_path)._parameters


def get_module(gm: nn.Module, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path) if path else gm
    except AttributeError:
        return None


def source_parameter(gm: nn.Module, w_node: Any, max_depth: int = 12) -> str | None:
    """The parameter a (possibly computed) weight comes from: the ≥2-D tensor attribute
    upstream of it, preferring one named like a weight (e.g. StdConv2d's ``weight``
    over ScaledStdConv2d's ``gain``)."""
    if not isinstance(w_node, fx.Node):
        return None
    found: list[str] = []
    frontier, seen = [w_node], set()
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                t = attr(gm, n.target)
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    found.append(n.target)
                continue
            if n.op == "placeholder":
                continue
            nxt += [a for a in n.all_input_nodes]
        frontier = nxt
        if not frontier:
            break
    if not found:
        return None
    found = list(dict.fromkeys(found))
    named = [p for p in found if p.rsplit(".", 1)[-1].endswith("weight")]
    pool = named or found
    return max(pool, key=lambda p: attr(gm, p).numel())


__all__ = [
    "MHA_WEIGHTS",
    "TRANSPOSED_MODULES",
    "WEIGHT_MODULES",
    "HiddenWeight",
    "bank_weight",
    "expert_bank_shape",
    "expert_banks",
    "get_module",
    "hidden_weights",
    "in_out_linear_modules",
    "is_param",
    "is_plain_weight_module",
    "route_paths",
    "source_parameter",
    "weights_passed_to",
]
