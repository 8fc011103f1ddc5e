"""Any segmentation_models_pytorch architecture + encoder, by name.

``encoder_weights`` defaults to ``None``: pretrained weights cannot be downloaded on offline machines.
Set it to ``imagenet`` (or another name smp knows) where a network is available.
"""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torch.nn.functional as F

from histoseg.models.backbones.unet import conv_block
from histoseg.models.registry import check_input_shape, register_backbone


class FullResHead(nn.Module):
    """A full-resolution level in front of the class head.

    smp's encoders start with a stride-2 stem, and the UNet decoder's last block upsamples stride-2 features
    to full resolution without a skip: no feature the head sees was computed at the input's own resolution.
    This head adds one, as the first level of the original UNet and of nnU-Net: two 3x3 convolutions on the
    image at full resolution, concatenated with the decoder output (resized to the input when the architecture
    decodes at a lower stride), one fusing 3x3 convolution, then the 3x3 class convolution.
    """

    def __init__(self, in_channels: int, decoder_channels: int, width: int, classes: int):
        super().__init__()
        self.stem = conv_block(in_channels, width, batch_norm=True, dropout=0.0)  # the UNet backbone's level
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_channels + width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.head = nn.Conv2d(width, classes, 3, padding=1)

    def forward(self, image: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        if decoded.shape[-2:] != image.shape[-2:]:
            decoded = F.interpolate(decoded, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([decoded, self.stem(image)], dim=1)))


@register_backbone("smp")
class SMPModel(nn.Module):
    """Wraps ``smp.create_model(arch, encoder_name, ...)``.

    Args:
        arch: smp architecture name (``Unet``, ``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``, ...).
        encoder_name: smp encoder name (``resnet34``, ``efficientnet-b0``, ...).
        encoder_weights: ``None`` (random init, default) or a weights name smp can fetch.
        encoder_depth: encoder stages (3-5).
        decoder_channels: decoder widths (length ``encoder_depth``), smp's default when ``None``.
        full_res_skip: width of a full-resolution level (:class:`FullResHead`) that replaces smp's class head;
            0 (default) keeps smp's model unchanged.
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
        full_res_skip: int = 0,
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
        if full_res_skip < 0:
            raise ValueError(f"full_res_skip is a channel width >= 0, got {full_res_skip}")
        self.full_res = None
        if full_res_skip:
            if getattr(self.model, "classification_head", None) is not None:
                raise ValueError("full_res_skip does not support smp's aux_params classification head")
            dec_ch = next(m for m in self.model.segmentation_head.modules() if isinstance(m, nn.Conv2d)).in_channels
            self.full_res = FullResHead(in_channels, dec_ch, int(full_res_skip), num_classes)
            self.model.segmentation_head = nn.Identity()  # replaced: no unused parameters
        self.divisor = int(getattr(self.model.encoder, "output_stride", 2**encoder_depth))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(self, x.shape[-2], x.shape[-1])
        if self.full_res is None:
            return self.model(x)
        return self.full_res(x, self.model.decoder(self.model.encoder(x)))
