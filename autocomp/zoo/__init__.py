"""A small zoo of reference architectures in plain torch, for trying compression methods on.

``build(name, **kwargs)`` makes a model from its name; ``ARCHITECTURES`` lists the names.
``tiny_kwargs(name)`` gives settings for a tiny version (for tests) and
``example_input(name)`` an input of the shape the model expects.

Every residual block class has ``is_shape_preserving()``: True when the block maps its input to
a tensor of the same shape, so removing it leaves a runnable model.

This package imports torch at import time; import it only where torch is needed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .facenet import mobilefacenet
from .mobilenet import mobilenet_v2
from .resnet import cifar_resnet, resnet18, resnet20, resnet34, resnet50, resnet56
from .transformer import vit

__all__ = [
    "ARCHITECTURES",
    "build",
    "tiny_kwargs",
    "example_input",
    "input_shape",
    "resnet18",
    "resnet34",
    "resnet50",
    "cifar_resnet",
    "resnet20",
    "resnet56",
    "mobilenet_v2",
    "vit",
    "mobilefacenet",
]

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenet_v2": mobilenet_v2,
    "vit": vit,
    "mobilefacenet": mobilefacenet,
}

# Settings that shrink each architecture to a few thousand to a few tens of thousands of
# parameters while keeping its layout (every stage and block type is still there).
_TINY_KWARGS: dict[str, dict[str, Any]] = {
    "resnet18": {"num_classes": 10, "width": 4},
    "resnet34": {"num_classes": 10, "width": 4},
    "resnet50": {"num_classes": 10, "width": 4},
    "resnet20": {"num_classes": 10, "width": 4},
    "resnet56": {"num_classes": 10, "width": 4},
    "mobilenet_v2": {"num_classes": 10, "width_mult": 0.1, "round_nearest": 2, "last_channels": 32},
    "vit": {"image_size": 16, "patch_size": 4, "num_classes": 10, "dim": 32, "depth": 2, "heads": 2},
    "mobilefacenet": {"embedding_size": 16, "width": 8, "input_size": 32},
}

# Input height and width each architecture expects at its default settings, and at the tiny ones.
_IMAGE_SIZE: dict[str, tuple[int, int]] = {
    "resnet18": (224, 32),
    "resnet34": (224, 32),
    "resnet50": (224, 32),
    "resnet20": (32, 16),
    "resnet56": (32, 16),
    "mobilenet_v2": (224, 32),
    "vit": (32, 16),
    "mobilefacenet": (112, 32),
}


def _check_name(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known architectures: {', '.join(ARCHITECTURES)}")


def build(name: str, **kwargs: Any) -> nn.Module:
    """A freshly initialised model of architecture ``name``, built with ``kwargs``.

    Raises ValueError for an unknown name (the message lists the known ones) or an invalid
    setting, and TypeError for a keyword the architecture does not take.
    """
    _check_name(name)
    return ARCHITECTURES[name](**kwargs)


def tiny_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments for :func:`build` that make a tiny version of ``name`` (a new dict each call).

    Raises ValueError for an unknown name.
    """
    _check_name(name)
    return dict(_TINY_KWARGS[name])


def input_shape(name: str, batch: int = 1, tiny: bool = False) -> tuple[int, int, int, int]:
    """The N x C x H x W input shape ``name`` expects at its default (or, with ``tiny``, tiny) settings.

    Raises ValueError for an unknown name.
    """
    _check_name(name)
    size = _IMAGE_SIZE[name][1 if tiny else 0]
    return (batch, 3, size, size)


def example_input(name: str, batch: int = 1, tiny: bool = False) -> torch.Tensor:
    """A random 3-channel input of the shape ``name`` expects at its default (or, with ``tiny``, tiny) settings.

    The values come from a fixed seed, so the same call gives the same tensor; the global
    random state is left untouched. Raises ValueError for an unknown name.
    """
    generator = torch.Generator().manual_seed(0)
    return torch.randn(input_shape(name, batch, tiny), generator=generator)
