"""SRResNet / SRGAN generator (Ledig et al. 2017), as in the pathology-SRGAN source system.

``scale`` 2 or 4 super-resolves with PixelShuffle blocks; ``scale=1`` turns the same residual trunk
into a segmentation backbone (no up-sampling, ``num_classes`` logits), so ``model=srgan_generator``
is interchangeable with UNet / ResUNet.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from histoseg.models.registry import register_backbone


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, batch_norm: bool = True):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(ch)) if batch_norm else nn.Identity
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), norm(), nn.PReLU(ch), nn.Conv2d(ch, ch, 3, padding=1), norm()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsampleBlock(nn.Module):
    """Conv -> PixelShuffle(2) -> PReLU: doubles H and W."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch * 4, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register_backbone("srgan_generator")
class SRGANGenerator(nn.Module):
    """SRResNet generator.

    Args:
        in_channels: input channels.
        num_classes: output channels (3 for RGB super-resolution; K logits as a segmentation backbone).
        scale: 1 (segmentation), 2 or 4 (super-resolution, PixelShuffle x2 blocks).
        width: trunk channels (64 in the paper).
        depth: number of residual blocks (16 in the paper).
        batch_norm: BatchNorm in residual blocks (SRGAN: yes; EDSR-style: no).
        residual_input: for super-resolution, add the up-sampled input to the output, so the
            network learns the residual detail (faster, more stable early training).
        residual_mode: interpolation of that up-sampled input: ``bilinear`` or ``bicubic``.
        tail_init_scale: multiplies the initial weights of the output convolution; ``0`` with
            ``residual_input`` makes the untrained generator exactly the interpolation baseline.
    """

    divisor = 1

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        scale: int = 4,
        width: int = 64,
        depth: int = 16,
        batch_norm: bool = True,
        residual_input: bool = True,
        residual_mode: str = "bilinear",
        tail_init_scale: float = 1.0,
    ):
        super().__init__()
        if scale not in (1, 2, 4, 8):
            raise ValueError(f"scale must be 1, 2, 4 or 8, got {scale}")
        self.in_channels, self.num_classes, self.scale = in_channels, num_classes, scale
        self.residual_input = residual_input and scale > 1 and in_channels == num_classes
        if residual_mode not in ("bilinear", "bicubic"):
            raise ValueError(f"residual_mode must be 'bilinear' or 'bicubic', got {residual_mode!r}")
        self.residual_mode = residual_mode
        self.head = nn.Sequential(nn.Conv2d(in_channels, width, 9, padding=4), nn.PReLU(width))
        self.trunk = nn.Sequential(*(ResidualBlock(width, batch_norm) for _ in range(depth)))
        self.trunk_tail = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        )
        self.upsample = nn.Sequential(*(UpsampleBlock(width) for _ in range(int(math.log2(scale)))))
        self.tail = nn.Conv2d(width, num_classes, 9, padding=4)
        if tail_init_scale != 1.0:
            with torch.no_grad():
                self.tail.weight.mul_(float(tail_init_scale))
                self.tail.bias.mul_(float(tail_init_scale))
        self.out_features = width

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.head(x)
        return [h, h + self.trunk_tail(self.trunk(h))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)[-1]
        out = self.tail(self.upsample(h))
        if self.residual_input:
            out = out + nn.functional.interpolate(x, scale_factor=self.scale, mode=self.residual_mode, align_corners=False)
        return out
