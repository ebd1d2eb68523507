"""Sharded state (FSDP2): gathering whole tensors, taking this rank's part, and state
tensors held squeezed so that dim 0 can be sharded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn


def gathered(t: Tensor) -> Tensor:
    """The whole tensor of a sharded one (an FSDP2 ``DTensor`` between steps: a collective,
    so every rank calls it), else ``t`` itself."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``full`` in ``like``'s sharding (``full`` itself where ``like`` is
    not sharded); every rank holds the same ``full``, so nothing is communicated."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


@contextlib.contextmanager
def units_gathered(model: nn.Module, keep_gathered: tuple[nn.Module, ...] = ()) -> Iterator[None]:
    """Every FSDP2 unit of ``model`` (each module ``fully_shard`` made) holding its whole
    parameters, for code that reads them outside the units' own forward and backward (PAL's
    noisy pass, alignment metrics); resharded after, except ``keep_gathered`` (a unit whose
    forward is running, which reshards by itself). A collective: every rank enters it.
    Without FSDP2, nothing."""
    units = [m for m in model.modules() if callable(getattr(m, "unshard", None)) and hasattr(m, "reshard")]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in reversed(units):
            if not any(m is k for k in keep_gathered):
                m.reshard()


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor, else ``t``: what in-place updates write to."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class HeldShapes:
    """What :class:`~pfa_fx.FeedbackNode` mixes in for state held in another shape: a
    parameter registered squeezed (:meth:`hold_squeezed`) keeps its own shape for the node
    (:meth:`held`), ``state_dict`` and ``load_state_dict``: FSDP2 shards dim 0, which a
    ``(1, out, n̄)`` tensor could not split. The attribute itself stays the registered
    parameter, which FSDP2 reads back with ``getattr`` and replaces. Also the grouped view
    of W-shaped tensors (convolution groups, transposed convolutions)."""

    def held(self, name: str) -> Tensor:
        """State tensor ``name`` in the shape the rule defines it with."""
        t = getattr(self, name)
        shape = self.__dict__.get("_held_shapes", {}).get(name)
        return t if shape is None else t.view(shape)

    def hold_squeezed(self, name: str) -> None:
        """Register tensor ``name`` without its leading size-1 dimensions (a contiguous
        parameter); :meth:`held`, ``state_dict`` and ``load_state_dict`` still see its shape."""
        t = self._parameters[name]
        k = next((i for i, n in enumerate(t.shape) if n != 1), t.dim())
        if k == 0 or k == t.dim():
            return
        self.__dict__.setdefault("_held_shapes", {})[name] = tuple(t.shape)
        self._parameters[name] = nn.Parameter(t.detach().reshape(t.shape[k:]).contiguous(), t.requires_grad)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, shape in self.__dict__.get("_held_shapes", {}).items():
            if prefix + name in destination:
                destination[prefix + name] = destination[prefix + name].view(shape)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        for name in self.__dict__.get("_held_shapes", {}):
            t = state_dict.get(prefix + name)
            if t is not None:
                state_dict[prefix + name] = t.view(self._parameters[name].shape)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _grouped(self, t: Tensor) -> Tensor:
        """A W-shaped (or R-shaped) tensor as ``(groups, rows, rest)``, rows along the
        output axis: axis 0, or axis 1 of a transposed convolution's ``(in, out/g, *k)``."""
        g = self.groups
        if not self.transposed:
            return t.reshape(g, t.shape[0] // g, -1)
        a, r = t.shape[0] // g, t.shape[1]
        return t.reshape(g, a, r, -1).transpose(1, 2).reshape(g, r, -1)

    def _ungrouped(self, m: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`_grouped`: ``(groups, rows, rest)`` back to ``shape``."""
        if not self.transposed:
            return m.reshape(shape)
        g, r = m.shape[0], m.shape[1]
        a = shape[0] // g
        return m.reshape(g, r, a, -1).transpose(1, 2).reshape(shape)
