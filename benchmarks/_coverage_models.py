"""The coverage sweep's models: which (``list_model_names``), the input sizes tried for each
(``tv_candidates``, ``timm_candidates``), and the model built at the first size it runs at
(``build_model``) or its parameter count without building it (``estimate_params``)."""

from __future__ import annotations

import fnmatch
import gc
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torchvision
from torch import Tensor, nn

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import timm_model, tv_model
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import timm_model, tv_model

SOURCES = ("tv", "timm")
BATCH = 2  # the batch every model is probed and checked at


def list_model_names(
    source: str, pattern: str | None = None, every: int = 1, limit: int | None = None
) -> list[tuple[str, str]]:
    """``(source, name)`` pairs: torchvision's classification models and/or timm's models,
    filtered by an ``fnmatch`` glob, then every ``every``-th name, then the first ``limit``."""
    out: list[tuple[str, str]] = []
    for src in SOURCES if source == "both" else (source,):
        if src == "tv":
            names = sorted(torchvision.models.list_models(module=torchvision.models))
        else:
            names = sorted(timm.list_models())
        if pattern:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        out += [(src, n) for n in names[:: max(1, every)]]
    return out[:limit] if limit is not None else out


@dataclass
class Candidate:
    """One way to build a model and the input size to feed it."""

    size: int
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Built:
    model: nn.Module
    size: int
    channels: int
    kwargs: dict[str, Any]
    build_s: float
    params: int
    dtype: torch.dtype = torch.float32


class BuildError(RuntimeError):
    """No candidate size builds and runs the (unconverted) model."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()


def tv_candidates(name: str) -> list[Candidate]:
    """Small inputs first. ViT and MaxViT fix their input size at construction
    (``image_size`` / ``input_size``); the others accept any size above a minimum
    (inception_v3's training-mode aux head needs its native 299)."""
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[-1])
        small = patch * math.ceil(64 / patch)
        return [Candidate(s, {"image_size": s}) for s in dict.fromkeys((small, 224))]
    if name.startswith("maxvit_"):
        return [Candidate(s, {"input_size": (s, s)}) for s in (64, 112, 224)]
    return [Candidate(s) for s in (64, 75, 96, 128, 160, 224, 299)]


def timm_candidates(name: str) -> tuple[list[Candidate], int]:
    """Candidates for a timm model, and its input channels: ``img_size=...`` at small
    sizes (models with position embeddings or fixed windows take it), the same sizes
    without the kwarg unless the pretrained config says the input size is fixed, then
    the model's own default input size."""
    cfg = timm.get_pretrained_cfg(name)
    input_size = tuple(getattr(cfg, "input_size", None) or (3, 224, 224))
    fixed = bool(getattr(cfg, "fixed_input_size", False))
    channels, native = int(input_size[0]), int(input_size[-1])
    small = [s for s in (64, 96, 128) if s < native]
    cands = [Candidate(s, {"img_size": s}) for s in small]
    if not fixed:
        cands += [Candidate(s) for s in small]
    cands.append(Candidate(native))
    return cands, channels


def model_factory(source: str, name: str) -> Callable[..., nn.Module]:
    """``**kwargs -> model``: ``name`` untrained, 10 classes."""
    build = tv_model if source == "tv" else timm_model
    return lambda **kw: build(name, **kw)


def _probe(model: nn.Module, x: Tensor) -> None:
    """Run the unconverted model in eval and train mode (no autograd): the size works."""
    with torch.no_grad():
        model.eval()
        model(x)
        model.train()
        model(x)


def build_model(source: str, name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Built:
    """The model at the first candidate (kwargs, size) that builds and runs in both modes,
    with parameters in ``dtype`` (bfloat16 lets the largest models fit this machine)."""
    t0 = time.perf_counter()
    if source == "tv":
        cands, channels = tv_candidates(name), 3
    else:
        cands, channels = timm_candidates(name)
    factory = model_factory(source, name)
    errors: list[str] = []
    model: nn.Module | None = None
    model_key: str | None = None
    kw_unsupported = False
    for cand in cands:
        key = json.dumps(cand.kwargs, sort_keys=True)
        if cand.kwargs and kw_unsupported:
            continue
        if key != model_key:
            model = None
            gc.collect()
            try:
                torch.manual_seed(seed)
                torch.set_default_dtype(dtype)
                try:
                    model = factory(**cand.kwargs)
                finally:
                    torch.set_default_dtype(torch.float32)
                model_key = key
            except Exception as exc:
                model_key = None
                errors.append(f"build {cand.kwargs or 'default'}: {first_line(exc)}")
                if isinstance(exc, TypeError) and "unexpected keyword" in str(exc):
                    kw_unsupported = True
                continue
        assert model is not None
        x = torch.randn(BATCH, channels, cand.size, cand.size, generator=torch.Generator().manual_seed(seed))
        try:
            _probe(model, x.to(dtype))
        except Exception as exc:
            errors.append(f"{cand.size}px {cand.kwargs or ''}: {first_line(exc)}".replace("  ", " "))
            continue
        params = sum(p.numel() for p in model.parameters())
        return Built(model, cand.size, channels, cand.kwargs, time.perf_counter() - t0, params, dtype)
    raise BuildError("; ".join(errors[-3:]) or "no candidate input size")


def estimate_params(source: str, name: str) -> int | None:
    """Parameter count from a build on the meta device (no memory, no init), or None."""
    factory = model_factory(source, name)
    kw = tv_candidates(name)[0].kwargs if source == "tv" else {}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = factory(**kw)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None
