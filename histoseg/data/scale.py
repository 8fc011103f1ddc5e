"""Working resolution: train and predict at a fraction of the images' pixel size (``inference.scale``).

``inference.scale=0.5`` halves every training image (with its mask and instance map) before patches are cut, and
halves every whole image before tiled prediction; the logits are resized back, so post-processing, metrics,
figures and reports stay in the input's pixels. A patch then covers ``1 / scale`` times the tissue per side for a
``scale**2`` share of the compute: nnU-Net's target spacing in one number, for data scanned finer than its
structures need (BreCaHAD's 40x nuclei of radius 13-21 px). Both resizes go through :func:`resize_chw`, so the
network sees the same interpolation in training and inference.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histoseg.data.sample import Sample


def check_scale(scale) -> float:
    """``scale`` as a float in (0, 4]; a clear error otherwise (``None`` means 1)."""
    value = 1.0 if scale is None else scale
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"inference.scale must be a number (the working resolution, e.g. 0.5), got {scale!r}") from None
    if not 0 < value <= 4:
        raise ValueError(f"inference.scale must be in (0, 4] (1 = the images' own resolution), got {scale!r}")
    return value


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The ``(h, w)`` of an image resized by ``scale`` (rounded, at least one pixel)."""
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def resize_chw(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a float ``(C,H,W)`` tensor to ``size``: area averaging when shrinking (as OpenCV's ``INTER_AREA``:
    each output pixel the mean of the input pixels it covers, so downsampling does not alias nuclear texture),
    bilinear when enlarging (logits back to the input's size)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x[None], size=size, mode="area")[0]
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def _nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel centres mapped exactly; labels never blended)."""
    h, w = a.shape[:2]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return np.ascontiguousarray(a[np.ix_(rows, cols)])


def rescale_sample(s: Sample, scale: float) -> Sample:
    """A copy of ``s`` at ``scale`` times its size: image by :func:`resize_chw` (rounded to uint8), mask and
    instances by nearest neighbour (instances renumbered 1..N: a nucleus smaller than a pixel may vanish).
    ``meta`` gains ``scale``; coordinates stored in it stay in the source's pixels."""
    from histoseg.data.readers.common import relabel_sequential

    scale = check_scale(scale)
    if scale == 1.0:
        return s
    size = scaled_size(*s.image.shape[:2], scale)
    img = torch.from_numpy(np.ascontiguousarray(s.image.transpose(2, 0, 1))).float()
    img = resize_chw(img, size).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    mask = None if s.mask is None else _nearest(s.mask, size)
    inst = None if s.instances is None else relabel_sequential(_nearest(s.instances, size))
    return Sample(image=np.ascontiguousarray(img), mask=mask, case_id=s.case_id, instances=inst, group=s.group,
                  source=s.source, meta={**s.meta, "scale": scale})
