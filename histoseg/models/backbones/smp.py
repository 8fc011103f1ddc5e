"""Any segmentation_models_pytorch architecture + encoder, by name.

``encoder_weights`` defaults to ``None``: pretrained weights cannot be downloaded on offline machines.
Set it to ``imagenet`` (or another name smp knows) where a network is available.
"""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn

from histoseg.models.registry import check_input_shape, register_backbone


@register_backbone("smp")
class SMPModel(nn.Module):
    """Wraps ``smp.create_model(arch, encoder_name, ...)``.

    Args:
        arch: smp architecture name (``Unet``, ``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``, ...).
        encoder_name: smp encoder name (``resnet34``, ``efficientnet-b0``, ...).
        encoder_weights: ``None`` (random init, default) or a weights name smp can fetch.
        encoder_depth: encoder stages (3-5).
        decoder_channels: decoder widths (length ``encoder_depth``), smp's default when ``None``.
        extra: further keyword arguments passed to the smp constructor.
    """

    scale = 1

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        decoder_channels: list[int] | None = None,
        extra: dict | None = None,
    ):
        super().__init__()
        kwargs = dict(extra or {})
        if decoder_channels is not None:
            kwargs["decoder_channels"] = list(decoder_channels)
        try:
            self.model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=encoder_weights,
                encoder_depth=encoder_depth,
                in_channels=in_channels,
                classes=num_classes,
                **kwargs,
            )
        except KeyError as e:  # smp lists the valid names in its message
            raise ValueError(f"smp could not build arch={arch!r} encoder={encoder_name!r}: {e}") from None
        self.in_channels, self.num_classes = in_channels, num_classes
        self.divisor = int(getattr(self.model.encoder, "output_stride", 2**encoder_depth))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(self, x.shape[-2], x.shape[-1])
        return self.model(x)
