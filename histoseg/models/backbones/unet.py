"""UNet (Ronneberger et al. 2015), as used by the epithelium and DSB2018-nuclei source systems.

Configurable depth and width, transposed-conv or bilinear upsampling, optional batch norm and dropout.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from histoseg.models.registry import check_input_shape, register_backbone


def conv_block(cin: int, cout: int, batch_norm: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(2):
        layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0 and i == 0:
            layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, up_mode: str, batch_norm: bool, dropout: float):
        super().__init__()
        if up_mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
            cup = cin // 2
        elif up_mode == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cin // 2, 1)
            )
            cup = cin // 2
        else:
            raise ValueError(f"up_mode must be 'transpose' or 'bilinear', got {up_mode!r}")
        self.conv = conv_block(cup + cskip, cout, batch_norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


@register_backbone("unet")
class UNet(nn.Module):
    """Plain UNet.

    Args:
        in_channels: input channels (3 for RGB).
        num_classes: output channels (1 for binary, K for K-class).
        depth: number of down-sampling steps (input sides must be divisible by ``2**depth``).
        width: channels of the first level; level ``i`` has ``width * 2**i``.
        up_mode: ``transpose`` (learned ConvTranspose2d, as the DSB2018 seed) or ``bilinear``.
        batch_norm: add BatchNorm after each conv.
        dropout: Dropout2d probability inside each block (0 disables).
    """

    scale = 1

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        depth: int = 4,
        width: int = 32,
        up_mode: str = "transpose",
        batch_norm: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_channels, self.num_classes, self.divisor = in_channels, num_classes, 2**depth
        chs = [width * 2**i for i in range(depth + 1)]
        self.downs = nn.ModuleList()
        cin = in_channels
        for c in chs:
            self.downs.append(conv_block(cin, c, batch_norm, dropout))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            Up(chs[i + 1], chs[i], chs[i], up_mode, batch_norm, dropout) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(chs[0], num_classes, 1)
        self.out_features = chs[0]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features from full resolution downwards (used by perceptual losses)."""
        feats = []
        for i, block in enumerate(self.downs):
            x = block(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(self, x.shape[-2], x.shape[-1])
        feats = self.features(x)
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = up(x, skip)
        return self.head(x)
