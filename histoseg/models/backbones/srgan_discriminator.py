"""VGG-style SRGAN discriminator (Ledig et al. 2017, Fig. 4), the adversary of ``srgan_generator``.

Eight 3x3 conv blocks (stride 1 / 2 alternating, channels doubling every second block, BatchNorm after the
first, LeakyReLU 0.2), then a dense head. The paper flattens a fixed 96x96 input into a 1024-unit dense
layer; here the dense layers are 1x1 convolutions after adaptive average pooling, so any crop size works.

It is *not* a segmentation backbone: ``kind = "discriminator"`` marks it in the registry, and the backbone
contract tests skip it. Input ``(B, C, H, W)`` image in [0, 1]; output ``(B, 1)`` raw logits ("real").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from histoseg.models.registry import register_backbone


def _block(cin: int, cout: int, stride: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


@register_backbone("srgan_discriminator")
class SRGANDiscriminator(nn.Module):
    """VGG-style discriminator.

    Args:
        in_channels: image channels.
        width: channels of the first block (64 in the paper); doubled every second block.
        depth: number of stride-2 stages (4 in the paper: 8 conv blocks, 16x downsampling).
        batch_norm: BatchNorm in every block but the first (the paper's choice).
        dense_width: units of the hidden dense layer (1024 in the paper).
    """

    kind = "discriminator"
    scale = 1
    divisor = 1

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        depth: int = 4,
        batch_norm: bool = True,
        dense_width: int = 1024,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_channels, self.num_classes = int(in_channels), 1
        blocks: list[nn.Module] = [_block(in_channels, width, 1, batch_norm=False)]
        ch = width
        for i in range(depth):
            out = width * 2**i
            if i > 0:
                blocks.append(_block(ch, out, 1, batch_norm))
            blocks.append(_block(out, out, 2, batch_norm))
            ch = out
        self.body = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(ch, dense_width, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dense_width, 1, 1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
