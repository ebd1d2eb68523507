"""The untrained models the benchmarks build, by name: torchvision's and timm's
classifiers, and the four the step-time and compiled-graph benchmarks measure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torchvision
from torch import nn


def tv_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """torchvision classification model ``name``, randomly initialised."""
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def timm_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """timm model ``name``, randomly initialised."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


#: step_time.py's models (compiled_graphs.py measures two of them): 100 classes
CLASSIFIERS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: tv_model("resnet18", num_classes=100),
    "resnet50": lambda: tv_model("resnet50", num_classes=100),
    "vit_small": lambda: timm_model("vit_small_patch16_224", num_classes=100, dynamic_img_size=True),
    "convnext_tiny": lambda: tv_model("convnext_tiny", num_classes=100),
}
