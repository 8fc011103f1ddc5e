"""ResUNet (Zhang et al. 2018, "Road extraction by deep residual U-Net"), as in the tumour-cellularity seed.

Residual units (BN-ReLU-Conv x2 with a projected identity shortcut) in encoder and decoder,
stride-2 convolutions for down-sampling, bilinear or transposed-conv up-sampling.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from histoseg.models.registry import check_input_shape, register_backbone


class ResidualUnit(nn.Module):
    """Pre-activation residual unit; ``stride=2`` halves the resolution."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0, first: bool = False):
        super().__init__()
        pre = [] if first else [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(
            *pre,
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            *([nn.Dropout2d(dropout)] if dropout > 0 else []),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


@register_backbone("resunet")
class ResUNet(nn.Module):
    """Residual UNet.

    Args:
        in_channels, num_classes: input / output channels.
        depth: number of stride-2 residual stages.
        width: channels of the first stage (doubling per stage).
        up_mode: ``bilinear`` (as the seed's Keras UpSampling2D) or ``transpose``.
        dropout: Dropout2d inside residual units.
    """

    scale = 1

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        depth: int = 3,
        width: int = 32,
        up_mode: str = "bilinear",
        dropout: float = 0.0,
    ):
        super().__init__()
        if up_mode not in ("bilinear", "transpose"):
            raise ValueError(f"up_mode must be 'transpose' or 'bilinear', got {up_mode!r}")
        self.in_channels, self.num_classes, self.divisor = in_channels, num_classes, 2**depth
        chs = [width * 2**i for i in range(depth + 1)]
        self.stem = ResidualUnit(in_channels, chs[0], first=True)
        self.down = nn.ModuleList(ResidualUnit(chs[i], chs[i + 1], 2, dropout) for i in range(depth))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(depth)):
            if up_mode == "transpose":
                self.up.append(nn.ConvTranspose2d(chs[i + 1], chs[i + 1], 2, stride=2))
            else:
                self.up.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.dec.append(ResidualUnit(chs[i + 1] + chs[i], chs[i], 1, dropout))
        self.head = nn.Sequential(nn.BatchNorm2d(chs[0]), nn.ReLU(inplace=True), nn.Conv2d(chs[0], num_classes, 1))
        self.out_features = chs[0]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for d in self.down:
            feats.append(d(feats[-1]))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(self, x.shape[-2], x.shape[-1])
        feats = self.features(x)
        x = feats[-1]
        for up, dec, skip in zip(self.up, self.dec, reversed(feats[:-1])):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)
