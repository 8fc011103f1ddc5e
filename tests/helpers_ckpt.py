"""Hand-made histoseg checkpoints with known behaviour (no training): fixed 1x1-convolution "nets"."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from histoseg.analysis.palette import CELLULARITY_PALETTE


class PointwiseNet(nn.Module):
    """A 1x1 convolution: the smallest backbone honouring the contract (weights set by the helpers below)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        self.in_channels, self.num_classes, self.scale, self.divisor = in_channels, num_classes, 1, 1
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def dark_is_nucleus(net: PointwiseNet) -> None:
    """Binary: logit = 20 * (0.55 - mean(RGB)): dark (haematoxylin) pixels are foreground."""
    with torch.no_grad():
        net.conv.weight.fill_(-20.0 / 3)
        net.conv.bias.fill_(20 * 0.55)


def nearest_palette_colour(net: PointwiseNet) -> None:
    """4 classes: logit_k = 2<c_k, x> - |c_k|^2, so argmax is the cellularity colour nearest to the pixel."""
    c = torch.tensor(CELLULARITY_PALETTE, dtype=torch.float32) / 255.0
    with torch.no_grad():
        net.conv.weight.copy_(2 * c[:, :, None, None])
        net.conv.bias.copy_(-(c**2).sum(1))


def write_checkpoint(path: Path, num_classes: int, set_weights, postprocess: dict, mpp: float | None = 0.5,
                     dataset: str = "handmade") -> Path:
    """A checkpoint as ``histoseg-train`` writes it (``state_dict`` + the ``histoseg`` section)."""
    from histoseg.inference.postprocess import PostProcessor
    from histoseg.models.modules.segmentation import SegmentationTask

    model_config = {
        "_target_": "histoseg.models.SegmentationTask",
        "num_classes": num_classes,
        "net": {"_target_": "tests.helpers_ckpt.PointwiseNet", "_partial_": True},
    }
    task = SegmentationTask(net=PointwiseNet(3, 1 if num_classes == 2 else num_classes), num_classes=num_classes,
                            inference={"tile_shape": [64, 64], "overlap": 0.25}, postprocess=PostProcessor(**postprocess),
                            model_config=model_config)
    set_weights(task.net)
    if mpp is not None:
        task.data_info = {"name": dataset, "mpp": mpp, "class_names": [str(i) for i in range(num_classes)]}
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path
