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


class BoxNet(PointwiseNet):
    """A ``k x k`` convolution (replicate padding): like :class:`PointwiseNet` with a receptive field, so tile and
    image borders change its output."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1, k: int = 5):
        super().__init__(in_channels, num_classes)
        self.conv = nn.Conv2d(in_channels, num_classes, k, padding=k // 2, padding_mode="replicate")


def dark_is_nucleus(net: PointwiseNet) -> None:
    """Binary: logit = 20 * (0.55 - mean(RGB)) (over the kernel's window): dark (haematoxylin) pixels are
    foreground."""
    with torch.no_grad():
        net.conv.weight.fill_(-20.0 / net.conv.weight[0].numel())
        net.conv.bias.fill_(20 * 0.55)


def nearest_palette_colour(net: PointwiseNet) -> None:
    """4 classes: logit_k = 2<c_k, x> - |c_k|^2, so argmax is the cellularity colour nearest to the pixel."""
    c = torch.tensor(CELLULARITY_PALETTE, dtype=torch.float32) / 255.0
    with torch.no_grad():
        net.conv.weight.copy_(2 * c[:, :, None, None])
        net.conv.bias.copy_(-(c**2).sum(1))


def write_checkpoint(path: Path, num_classes: int, set_weights, postprocess: dict, mpp: float | None = 0.5,
                     dataset: str = "handmade", net_config: dict | None = None, inference: dict | None = None,
                     seed: int = 0) -> Path:
    """A checkpoint as ``histoseg-train`` writes it (``state_dict`` + the ``histoseg`` section).

    ``net_config``: another backbone (a Hydra partial, e.g. a small registry UNet) instead of the 1x1 conv,
    with seeded random weights when ``set_weights`` is None; ``inference``: the stored tile settings."""
    import hydra

    from histoseg.inference.postprocess import PostProcessor
    from histoseg.models.modules.segmentation import SegmentationTask

    net_config = net_config or {"_target_": "tests.helpers_ckpt.PointwiseNet", "_partial_": True}
    model_config = {"_target_": "histoseg.models.SegmentationTask", "num_classes": num_classes, "net": net_config}
    torch.manual_seed(seed)
    net = hydra.utils.instantiate(net_config)(in_channels=3, num_classes=1 if num_classes == 2 else num_classes)
    task = SegmentationTask(net=net, num_classes=num_classes,
                            inference=inference or {"tile_shape": [64, 64], "overlap": 0.25},
                            postprocess=PostProcessor(**postprocess), model_config=model_config)
    if set_weights is not None:
        set_weights(task.net)
    if mpp is not None:
        task.data_info = {"name": dataset, "mpp": mpp, "class_names": [str(i) for i in range(num_classes)]}
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path
