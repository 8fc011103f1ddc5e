"""Backbone registry: every network file registers itself with ``@register_backbone(name)``.

A backbone is an ``nn.Module`` with the contract below (see ``docs`` in README, "Adding a backbone"):

* constructor takes ``in_channels`` and ``num_classes`` (output channels) plus its own options;
* ``forward(x)`` maps ``(B, in_channels, H, W)`` float to raw logits ``(B, num_classes, scale*H, scale*W)``;
  no activation is applied (losses and post-processing own that);
* class attributes ``scale`` (1 for segmentation, 2/4 for super-resolution) and ``divisor``
  (H and W must be multiples of it); :func:`check_input_shape` names the padding needed otherwise.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_BACKBONES: dict[str, type[nn.Module]] = {}


def register_backbone(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _BACKBONES and _BACKBONES[name] is not cls:
            raise ValueError(f"backbone {name!r} is already registered by {_BACKBONES[name].__qualname__}")
        cls.registry_name = name
        _BACKBONES[name] = cls
        return cls

    return deco


def _load_all() -> None:
    # importing the package registers every backbone file
    import histoseg.models.backbones  # noqa: F401


def available_backbones() -> list[str]:
    _load_all()
    return sorted(_BACKBONES)


def get_backbone_class(name: str) -> type[nn.Module]:
    _load_all()
    try:
        return _BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}") from None


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered backbone by name (errors list the valid names)."""
    return get_backbone_class(name)(**kwargs)


def check_input_shape(net: nn.Module, height: int, width: int) -> None:
    """Raise a ValueError naming the padded shape the network needs, if any."""
    d = int(getattr(net, "divisor", 1))
    if height % d or width % d:
        ph, pw = -(-height // d) * d, -(-width // d) * d
        raise ValueError(
            f"{type(net).__name__} needs H and W divisible by {d}; got {height}x{width}, pad to {ph}x{pw}"
        )
