"""The ablation's models: a spec ``name[:key=value,...]`` (a timm model, a glob over
timm's models, or a dotted model class) parsed (``parse_spec``), built with 10 classes and 3
channels at the run's input size (``create_model``), and named in the tables (``label``)."""

from __future__ import annotations

import ast
import functools
import importlib
from typing import Any

import timm
from torch import nn

try:  # run as python benchmarks/<script>.py: this folder is on sys.path
    from _shared import timm_model
except ImportError:  # imported as benchmarks.<module> from the repository root
    from benchmarks._shared import timm_model


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``name[:k=v,...]`` -> [(model name, create_model kwargs)]; a glob name expands over timm's list."""
    name, _, opts = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad model option {item!r} in {spec!r} (expected key=value)")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    if any(c in name for c in "*?["):
        names = timm.list_models(name)
        if not names:
            raise ValueError(f"no timm model matches {name!r}")
        return [(n, dict(kwargs)) for n in names]
    if "." in name:
        model_class(name)  # fails early, naming the spec
        return [(name, kwargs)]
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}")
    return [(name, kwargs)]


def model_class(path: str) -> type[nn.Module]:
    """The ``nn.Module`` class a dotted spec name (``package.module.Class``) names."""
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model class {path!r} not found ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path!r} is not an nn.Module class")
    return cls


def create_model(name: str, kwargs: dict[str, Any], size: int) -> nn.Module:
    """timm model with 10 classes and 3 channels, at ``img_size=size`` where it takes one."""
    if "." in name:
        create, base = model_class(name), dict(num_classes=10, in_chans=3, **kwargs)
    else:
        create, base = functools.partial(timm_model, name), dict(in_chans=3, **kwargs)  # untrained, 10 classes
    if "img_size" not in kwargs:
        try:
            return create(img_size=size, **base)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return create(**base)


def label(name: str, kwargs: dict[str, Any]) -> str:
    """Row label: the spec, with a model class by its own name (``MlpMixer:...``)."""
    name = name.rpartition(".")[2]
    return name + (":" + ",".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")
