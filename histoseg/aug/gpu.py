"""Batch augmentation in torch on the batch's device (the ``gpu_aug`` config group).

With ``aug=none gpu_aug=stain`` the DataLoader workers only decode and crop; flips, 90-degree rotations,
brightness / contrast and H&E stain jitter are applied to the whole batch on the device after the transfer
(at the start of :meth:`histoseg.models.SegmentationTask.training_step`). Interpolating transforms (free rotation,
scaling, elastic) stay in the albumentations ``aug`` group on the CPU; both groups can be combined.

Which tensors move: every tensor of the batch whose last two dimensions are the image's ``(H, W)``
(``image``, ``mask``, ``instances``, ``seg``, ``dist``, ``hv``, ...). The HoVer-Net ``hv`` map (horizontal,
vertical offset to the nucleus centre) also changes its *components*: a horizontal flip negates the horizontal
offset, a vertical flip the vertical one, and ``rot90`` by ``k`` quarter turns (``torch.rot90`` on ``(H, W)``)
maps ``(h, v)`` to ``(v, -h)``, ``(-h, -v)``, ``(-v, h)`` for ``k = 1, 2, 3``. The transformed maps equal the maps
recomputed from the transformed instance map (``tests/test_benchmarks.py`` checks this), so targets can be
computed in the workers before the GPU step. Colour operations touch ``image`` only.

Order per sample: horizontal flip, vertical flip, ``rot90`` (the albumentations ``HorizontalFlip``,
``VerticalFlip``, ``RandomRotate90`` order), then brightness / contrast, then stain jitter. Non-square patches
only get 0 or 180 degree rotations.

Randomness: parameters are drawn on the CPU from a ``torch.Generator`` seeded with ``(seed, rank, epoch,
batch index)``, so they do not depend on the device and a resumed run draws the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from histoseg.utils.vectors import turn_offsets

# Ruifrok & Johnston H&E-DAB stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.rgb_from_hed
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
OD_FLOOR = 1e-6  # intensities are floored here before the log (no log(0))


@dataclass
class AugParams:
    """Per-sample parameters of one batch (all tensors of length ``B`` on the CPU)."""

    hflip: torch.Tensor  # bool
    vflip: torch.Tensor  # bool
    rot90: torch.Tensor  # int64 quarter turns, 0..3
    brightness: torch.Tensor  # additive shift of the [0, 1] intensities
    contrast: torch.Tensor  # factor around the image mean
    stain_scale: torch.Tensor  # (B, 2) haematoxylin / eosin concentration factors
    stain_shift: torch.Tensor  # (B, 2) added optical density

    @classmethod
    def identity(cls, batch_size: int) -> AugParams:
        b = int(batch_size)
        return cls(
            hflip=torch.zeros(b, dtype=torch.bool), vflip=torch.zeros(b, dtype=torch.bool),
            rot90=torch.zeros(b, dtype=torch.int64), brightness=torch.zeros(b), contrast=torch.ones(b),
            stain_scale=torch.ones(b, 2), stain_shift=torch.zeros(b, 2),
        )


def _bcast(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> shape broadcastable against ``t`` (B, ...), on ``t``'s device."""
    return v.to(t.device).view(-1, *([1] * (t.ndim - 1)))


def dihedral(t: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, rot90: torch.Tensor) -> torch.Tensor:
    """Per-sample flips and quarter turns of a ``(B, ..., H, W)`` tensor (any dtype)."""
    t = torch.where(_bcast(hflip, t), t.flip(-1), t)
    t = torch.where(_bcast(vflip, t), t.flip(-2), t)
    k = rot90.to(t.device)
    if bool((k % 4 != 0).any()):
        t = t.clone()
        for q in (1, 2, 3):
            idx = (k % 4 == q).nonzero().flatten()
            if idx.numel():
                t[idx] = torch.rot90(t[idx], q, dims=(-2, -1))
    return t


def dihedral_hv(hv: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, rot90: torch.Tensor) -> torch.Tensor:
    """:func:`dihedral` for ``(B, 2, H, W)`` HoVer-Net offset maps: moves the pixels and rotates the vectors."""
    hv = dihedral(hv, hflip, vflip, rot90)
    h, v = hv[:, 0], hv[:, 1]
    h = torch.where(_bcast(hflip, h), -h, h)
    v = torch.where(_bcast(vflip, v), -v, v)
    k = _bcast(rot90 % 4, h)
    nh, nv, th, tv = h, v, h, v
    for q in (1, 2, 3):  # th, tv: the vectors after q quarter turns, each turn taken once
        th, tv = turn_offsets(th, tv, 1)
        nh, nv = torch.where(k == q, th, nh), torch.where(k == q, tv, nv)
    return torch.stack([nh, nv], 1)


def brightness_contrast(img: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """``(x - mean) * contrast + mean + brightness`` per image (mean over all pixels and channels), in [0, 1]."""
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    return ((img - mean) * _bcast(contrast, img) + mean + _bcast(brightness, img)).clamp_(0.0, 1.0)


def hed_jitter(img: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """H&E stain jitter (Tellez et al. 2018): colour deconvolution into haematoxylin / eosin / DAB optical
    densities (Ruifrok & Johnston vectors), ``od * scale + shift`` for H and E, and back to RGB.

    ``img``: ``(B, 3, H, W)`` float RGB in [0, 1]; ``scale`` / ``shift``: ``(B, 2)``. Scale 1 and shift 0 return
    the image (intensities below ``1e-6`` become ``1e-6``).
    """
    dev = img.device
    x = img.float().clamp_min(OD_FLOOR)
    od = -torch.log(x)
    stains = torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(dev, torch.float32))
    s = scale.to(dev, torch.float32)[:, :, None, None]
    b = shift.to(dev, torch.float32)[:, :, None, None]
    stains = torch.cat([stains[:, :2] * s + b, stains[:, 2:]], 1)
    od = torch.einsum("bdhw,dc->bchw", stains, RGB_FROM_HED.to(dev, torch.float32))
    return torch.exp(-od).clamp_(0.0, 1.0).to(img.dtype)


class BatchAug:
    """Batch augmentation of a training batch dict (see the module docstring).

    Args:
        dihedral: random horizontal / vertical flips (p 0.5 each) and a random number of quarter turns
            (0..3, uniform): the 8 symmetries of the square.
        brightness: additive shift drawn from ``[-brightness, brightness]`` (0 disables).
        contrast: factor drawn from ``[1 - contrast, 1 + contrast]`` (0 disables).
        p_color: probability that a sample gets brightness / contrast.
        stain_scale: H and E optical-density factors drawn from ``[1 - stain_scale, 1 + stain_scale]``.
        stain_shift: H and E optical-density shifts drawn from ``[-stain_shift, stain_shift]``.
        p_stain: probability that a sample gets stain jitter (0 or both ranges 0 disable it).
        seed: base seed of the parameter stream.
    """

    def __init__(
        self,
        dihedral: bool = True,
        brightness: float = 0.0,
        contrast: float = 0.0,
        p_color: float = 0.5,
        stain_scale: float = 0.0,
        stain_shift: float = 0.0,
        p_stain: float = 0.5,
        seed: int = 0,
    ):
        for name, v in (("brightness", brightness), ("contrast", contrast), ("stain_scale", stain_scale),
                        ("stain_shift", stain_shift)):
            if not 0 <= float(v) < 1:
                raise ValueError(f"gpu_aug.{name} must be in [0, 1), got {v}")
        for name, v in (("p_color", p_color), ("p_stain", p_stain)):
            if not 0 <= float(v) <= 1:
                raise ValueError(f"gpu_aug.{name} is a probability in [0, 1], got {v}")
        self.dihedral = bool(dihedral)
        self.brightness, self.contrast, self.p_color = float(brightness), float(contrast), float(p_color)
        self.stain_scale, self.stain_shift, self.p_stain = float(stain_scale), float(stain_shift), float(p_stain)
        self.seed = int(seed)

    def __repr__(self) -> str:
        keys = ("dihedral", "brightness", "contrast", "p_color", "stain_scale", "stain_shift", "p_stain", "seed")
        return f"BatchAug({', '.join(f'{k}={getattr(self, k)}' for k in keys)})"

    def generator(self, *key: int) -> torch.Generator:
        """CPU generator seeded with ``(seed, *key)`` (e.g. rank, epoch, batch index)."""
        state = np.random.SeedSequence([self.seed, *(int(k) for k in key)]).generate_state(2, np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))

    def sample(self, batch_size: int, generator: torch.Generator, square: bool = True) -> AugParams:
        """Parameters for ``batch_size`` samples (always the same number of draws, whatever is enabled)."""
        b, g = int(batch_size), generator
        u = torch.rand(b, 10, generator=g, dtype=torch.float64)
        k = torch.randint(0, 4, (b,), generator=g)
        p = AugParams.identity(b)
        if self.dihedral:
            p.hflip, p.vflip = u[:, 0] < 0.5, u[:, 1] < 0.5
            p.rot90 = k if square else (k // 2) * 2  # non-square: 0 or 180 degrees
        color = u[:, 2] < self.p_color
        p.brightness = torch.where(color, (2 * u[:, 3] - 1) * self.brightness, 0.0).float()
        p.contrast = torch.where(color, 1 + (2 * u[:, 4] - 1) * self.contrast, 1.0).float()
        stain = (u[:, 5] < self.p_stain)[:, None]
        p.stain_scale = torch.where(stain, 1 + (2 * u[:, 6:8] - 1) * self.stain_scale, 1.0).float()
        p.stain_shift = torch.where(stain, (2 * u[:, 8:10] - 1) * self.stain_shift, 0.0).float()
        return p

    def apply(self, batch: dict, params: AugParams) -> dict:
        """A new batch dict with ``params`` applied (see the module docstring for which keys change how)."""
        img = batch["image"]
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"gpu_aug needs an RGB image batch (B, 3, H, W), got {tuple(img.shape)}")
        hw = tuple(img.shape[-2:])
        out = dict(batch)
        if self.dihedral:
            for key, t in batch.items():
                if not isinstance(t, torch.Tensor) or t.ndim < 3 or tuple(t.shape[-2:]) != hw:
                    continue
                if key == "hv":
                    out[key] = dihedral_hv(t, params.hflip, params.vflip, params.rot90)
                else:
                    out[key] = dihedral(t, params.hflip, params.vflip, params.rot90)
        with torch.autocast(img.device.type, enabled=False):
            x = out["image"]
            if self.brightness or self.contrast:
                x = brightness_contrast(x, params.brightness, params.contrast)
            if self.stain_scale or self.stain_shift:
                x = hed_jitter(x, params.stain_scale, params.stain_shift)
        out["image"] = x
        return out

    def __call__(self, batch: dict, *key: int) -> dict:
        """Augment ``batch`` with parameters drawn from the stream at ``key`` (e.g. rank, epoch, batch index)."""
        img = batch["image"]
        params = self.sample(img.shape[0], self.generator(*key), square=img.shape[-1] == img.shape[-2])
        return self.apply(batch, params)
