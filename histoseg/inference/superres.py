"""Super-resolve whole images of any size tile by tile, and the bicubic baseline.

:func:`super_resolve` is the one SR inference path: validation, test, the SR -> segmentation evaluation
and ``histoseg-predict`` call it. It runs :func:`~histoseg.inference.tiled_predict` with
``out_scale = scale``, so overlapping LR tiles are stitched with Gaussian weights in HR space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from histoseg.inference.tiled import tiled_predict


def _as_chw(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image array, got shape {image.shape}")
        from histoseg.data.datasets import to_tensor_image

        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (tensors: float in [0, 1]), got {image.dtype}")
        return to_tensor_image(image)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"expected a 3xHxW image tensor, got shape {tuple(image.shape)}")
    return image.float()


def _generator(sr_model: nn.Module) -> nn.Module:
    """The generator of a :class:`SuperResolutionTask` (``.net``) or a bare generator module."""
    net = getattr(sr_model, "net", sr_model)
    if int(getattr(net, "scale", 1)) < 2:
        raise ValueError(
            f"{type(net).__name__} is not an upscaling generator (scale {getattr(net, 'scale', None)})"
        )
    return net


def bicubic_upsample(lr: torch.Tensor | np.ndarray, scale: int) -> torch.Tensor:
    """Bicubic ``scale`` x upsampling of a ``3xHxW`` image in [0,1] (clamped), the SR baseline."""
    x = _as_chw(lr)[None]
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x, scale_factor=int(scale), mode="bicubic", align_corners=False)[0].clamp_(0, 1)


@torch.no_grad()
def super_resolve(
    image: torch.Tensor | np.ndarray,
    sr_task: nn.Module,
    tile_shape: Sequence[int] = (64, 64),
    overlap: float = 0.25,
    batch_size: int = 4,
    blend: str = "gaussian",
    device: str | torch.device | None = None,
    autocast: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Super-resolve one image of any size.

    Args:
        image: LR image, ``3xHxW`` float tensor in [0,1] or ``HxWx3`` uint8 array.
        sr_task: a :class:`~histoseg.models.modules.superres.SuperResolutionTask` (e.g. from
            :func:`histoseg.models.loading.load_task`) or a bare generator with a ``scale`` attribute.
        tile_shape: LR pixels per tile; the generator sees ``tile_shape`` inputs and returns
            ``scale x tile_shape`` outputs, blended where tiles overlap.
        overlap: fraction of a tile shared with its neighbour.
        batch_size: tiles per forward pass.
        blend: ``gaussian`` (sigma = tile/8) or ``constant``.
        device: where the generator runs (default: the generator's device).
        autocast: ``bf16`` / ``fp16`` to run the generator under autocast; ``None`` runs it in float32 even
            inside an autocast region (SR outputs are compared at 8-bit precision).
        progress: show a tile progress bar.

    Returns:
        ``3 x (scale*H) x (scale*W)`` float32 CPU tensor in [0, 1].
    """
    net = _generator(sr_task)
    x = _as_chw(image)
    if device is None:
        p = next(net.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    ctx = (
        torch.autocast(torch.device(device).type, enabled=False)
        if autocast is None
        else contextlib.nullcontext()
    )
    try:
        with ctx:
            out = tiled_predict(
                x,
                net,
                tile_shape=tile_shape,
                overlap=overlap,
                blend=blend,
                out_scale=net.scale,
                batch_size=batch_size,
                device=device,
                autocast=autocast,
                progress=progress,
            )
    finally:
        net.train(was_training)
    return out.clamp_(0, 1)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``3xHxW`` float in [0,1] -> ``HxWx3`` uint8 (for writing SR images)."""
    return (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
