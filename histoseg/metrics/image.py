"""Image-quality metrics for super-resolution outputs: PSNR and SSIM per image (torchmetrics functional).

Identical images have infinite PSNR. Every function here reports them as ``max_db`` (default 100 dB, the
PSNR at MSE = 1e-10 x range^2, far above any real reconstruction) so means over images, JSON files and
``test/psnr`` stay finite and comparable. Pass ``max_db=float("inf")`` to get ``inf`` instead.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

DEFAULT_MAX_DB = 100.0


def _as_batch(x, data_range: float) -> torch.Tensor:
    """``(B,C,H,W)`` / ``(C,H,W)`` tensor or ``HxWxC`` / ``HxW`` numpy array -> float ``(B,C,H,W)``.

    uint8 numpy arrays are scaled to [0, 1]: pass ``data_range=1.0`` for them.
    """
    if isinstance(x, np.ndarray):
        arr = x
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"expected an HxW or HxWxC array, got shape {arr.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        t = t.float() / 255.0 if arr.dtype == np.uint8 else t.float()
        return t[None]
    t = torch.as_tensor(x)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected a (B,C,H,W) or (C,H,W) tensor, got shape {tuple(t.shape)}")
    return t.float()


def rgb_to_y(x: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """ITU-R BT.601 luma of ``(B,3,H,W)`` RGB in [0, data_range] (the Y channel SR papers score on)."""
    if x.shape[1] != 3:
        raise ValueError(f"Y channel needs RGB input, got {x.shape[1]} channels")
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255.0
    return (x * w).sum(1, keepdim=True) + 16.0 / 255.0 * data_range


def _prepare(pred, target, data_range: float, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _as_batch(pred, data_range), _as_batch(target, data_range)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    if y_channel:
        p, t = rgb_to_y(p, data_range), rgb_to_y(t, data_range)
    return p, t


def psnr(pred, target, data_range: float = 1.0, y_channel: bool = False, max_db: float = DEFAULT_MAX_DB) -> torch.Tensor:
    """Per-image PSNR in dB, shape ``(B,)``; identical images give ``max_db``."""
    p, t = _prepare(pred, target, data_range, y_channel)
    v = peak_signal_noise_ratio(p, t, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return torch.clamp(v, max=max_db)


def ssim(pred, target, data_range: float = 1.0, y_channel: bool = False) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5), shape ``(B,)``; identical images give 1."""
    p, t = _prepare(pred, target, data_range, y_channel)
    return structural_similarity_index_measure(p, t, data_range=data_range, reduction="none")


def image_quality(pred, target, data_range: float = 1.0, y_channel: bool = False,
                  max_db: float = DEFAULT_MAX_DB) -> dict[str, float]:
    """``{"psnr": dB, "ssim": ...}`` of one image pair (the row format of ``per_image.csv``)."""
    p, s = psnr(pred, target, data_range, y_channel, max_db), ssim(pred, target, data_range, y_channel)
    if p.numel() != 1:
        raise ValueError(f"image_quality scores one image pair, got a batch of {p.numel()}")
    return {"psnr": float(p), "ssim": float(s)}
