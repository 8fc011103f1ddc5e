"""Super-resolution data: any reader becomes an SR dataset (HR crops, LR made on the fly).

* :class:`Degradation` turns an HR image into its LR counterpart: optional Gaussian blur, area or
  (antialiased) bicubic downsampling by ``scale``, Gaussian noise, 8-bit quantisation and optional JPEG,
  every parameter a number or a ``[min, max]`` range sampled per image.
* :class:`SRDataModule` is :class:`~histoseg.data.HistoDataModule` (same readers, splits, patch sampling
  and augmentation) whose datasets yield ``{"hr", "lr", "case_id"}`` (plus ``mask`` / ``instances`` /
  ``source`` for whole validation and test images, so the SR -> segmentation pipeline can score them).

Randomness is a pure function of the seed: training LR of patch ``i`` in epoch ``e`` uses
``(seed, e, i)`` (like :class:`~histoseg.data.datasets.PatchDataset`), whole images use ``(seed, case_id)``,
so a resumed run and the evaluation pipeline see exactly the same LR images.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from histoseg.data.datamodule import HistoDataModule
from histoseg.data.datasets import PatchDataset, WholeImageDataset, to_tensor_image
from histoseg.data.io import DataError

DOWNSAMPLE_MODES = ("bicubic", "area")
# sub-streams of the (seed, epoch, index) generator, distinct from PatchDataset's patch/augmentation stream
_TRAIN_STREAM, _EVAL_STREAM = 1, 2

Range = float | Sequence[float] | None


def _sample(value: Range, rng: np.random.Generator, name: str) -> float | None:
    """``None`` -> None, a number -> itself, ``[lo, hi]`` -> uniform draw."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    lo, hi = (float(v) for v in value)
    if hi < lo:
        raise ValueError(f"degradation.{name}: range [{lo}, {hi}] has max < min")
    return float(rng.uniform(lo, hi)) if hi > lo else lo


def _check_range(value: Range, name: str, lo: float, hi: float) -> None:
    vals = [] if value is None else ([value] if isinstance(value, int | float) else list(value))
    if value is not None and not isinstance(value, int | float) and len(vals) != 2:
        raise ValueError(f"degradation.{name} must be a number or [min, max], got {value!r}")
    for v in vals:
        if not lo <= float(v) <= hi:
            raise ValueError(f"degradation.{name} values must be in [{lo}, {hi}], got {value!r}")


class Degradation:
    """HR -> LR: blur, downsample, noise, 8-bit quantisation, JPEG (in that order).

    Args:
        scale: downsampling factor (2, 4, 8); HR height and width must be multiples of it.
        downsample: ``bicubic`` (antialiased, as PIL / MATLAB ``imresize``) or ``area`` (box average).
        blur_sigma: Gaussian blur sigma in HR pixels before downsampling (0 / None = none).
        noise_sigma: Gaussian noise sigma in 8-bit units (0..255) added to the LR image.
        jpeg_quality: JPEG quality (1..100) of the LR image, or None for no compression.

    Each of ``blur_sigma``, ``noise_sigma``, ``jpeg_quality`` is a number or a ``[min, max]`` range drawn
    per image from the generator passed to :meth:`__call__`.
    """

    def __init__(
        self,
        scale: int = 4,
        downsample: str = "bicubic",
        blur_sigma: Range = None,
        noise_sigma: Range = None,
        jpeg_quality: Range = None,
    ):
        if int(scale) not in (2, 4, 8) or int(scale) != scale:
            raise ValueError(f"degradation.scale must be 2, 4 or 8, got {scale}")
        if downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"degradation.downsample must be one of {DOWNSAMPLE_MODES}, got {downsample!r}")
        _check_range(blur_sigma, "blur_sigma", 0, 50)
        _check_range(noise_sigma, "noise_sigma", 0, 255)
        _check_range(jpeg_quality, "jpeg_quality", 1, 100)
        self.scale, self.downsample = int(scale), downsample
        self.blur_sigma, self.noise_sigma, self.jpeg_quality = blur_sigma, noise_sigma, jpeg_quality

    def config(self) -> dict:
        as_plain = lambda v: list(v) if v is not None and not isinstance(v, int | float) else v  # noqa: E731
        return {
            "scale": self.scale,
            "downsample": self.downsample,
            "blur_sigma": as_plain(self.blur_sigma),
            "noise_sigma": as_plain(self.noise_sigma),
            "jpeg_quality": as_plain(self.jpeg_quality),
        }

    def __repr__(self) -> str:
        return f"Degradation({', '.join(f'{k}={v}' for k, v in self.config().items())})"

    def __call__(self, hr: torch.Tensor | np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """``hr``: ``3xHxW`` float in [0,1] or ``HxWx3`` uint8. Returns LR ``3x(H/s)x(W/s)`` float32 in [0,1]
        (values are multiples of 1/255: the LR image is an 8-bit image)."""
        x = to_tensor_image(hr) if isinstance(hr, np.ndarray) else hr.float()
        if x.ndim != 3:
            raise ValueError(f"degradation takes one CxHxW image, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        s = self.scale
        if h % s or w % s:
            raise ValueError(
                f"HR image {w}x{h} is not divisible by the scale {s}; crop it to {w // s * s}x{h // s * s}"
            )
        sigma = _sample(self.blur_sigma, rng, "blur_sigma")
        noise = _sample(self.noise_sigma, rng, "noise_sigma")
        quality = _sample(self.jpeg_quality, rng, "jpeg_quality")
        x = x[None]
        if sigma:
            k = 2 * int(np.ceil(3 * sigma)) + 1
            hw = np.arange(k, dtype=np.float32) - k // 2
            g = torch.from_numpy(np.exp(-(hw**2) / (2 * sigma**2)))
            g = (g / g.sum()).to(x)
            c = x.shape[1]
            x = F.pad(x, (k // 2,) * 4, mode="reflect" if min(h, w) > k // 2 else "replicate")
            x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
            x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
        size = (h // s, w // s)
        if self.downsample == "area":
            x = F.interpolate(x, size=size, mode="area")
        else:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = x[0]
        if noise:
            x = x + torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)) * (noise / 255.0)
        lr = (x.clamp(0, 1) * 255.0).round().to(torch.uint8)
        if quality is not None:
            hwc = np.ascontiguousarray(lr.permute(1, 2, 0).numpy())
            ok, enc = cv2.imencode(
                ".jpg", cv2.cvtColor(hwc, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(round(quality))]
            )
            if not ok:
                raise RuntimeError(f"JPEG encoding failed (quality {quality})")
            hwc = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            return to_tensor_image(hwc)
        return lr.float().div_(255.0)


def case_seed(seed: int, case_id: str) -> np.random.Generator:
    """The generator of a whole image's LR: depends on ``(seed, case_id)`` only."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode()), _EVAL_STREAM])


def centre_crop_box(
    h: int, w: int, scale: int, crop_shape: Sequence[int] | None = None
) -> tuple[slice, slice]:
    """Centre box of ``crop_shape`` (default: the whole image) shrunk to multiples of ``scale``."""
    ch, cw = (h, w) if crop_shape is None else (min(int(crop_shape[0]), h), min(int(crop_shape[1]), w))
    ch, cw = ch // scale * scale, cw // scale * scale
    if ch == 0 or cw == 0:
        raise ValueError(f"image {w}x{h} is smaller than the scale {scale}")
    y, x = (h - ch) // 2, (w - cw) // 2
    return slice(y, y + ch), slice(x, x + cw)


class SRPatchDataset(Dataset):
    """Training pairs: HR patches (augmented) from a :class:`PatchDataset` and their degraded LR."""

    def __init__(self, patches: PatchDataset, degradation: Degradation, seed: int = 0):
        self.patches, self.degradation, self.seed = patches, degradation, int(seed)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, key):
        epoch, idx = key if isinstance(key, tuple) else (0, int(key))
        item = self.patches[(epoch, idx)]
        rng = np.random.default_rng([self.seed, int(epoch), int(idx), _TRAIN_STREAM])
        return {"hr": item["image"], "lr": self.degradation(item["image"], rng), "case_id": item["case_id"]}


class SRWholeImageDataset(Dataset):
    """Whole validation / test images (optionally a fixed centre crop), cropped to multiples of the scale,
    with their deterministic LR. Keeps ``mask`` / ``instances`` (cropped alike) for segmentation scoring."""

    def __init__(
        self,
        images: WholeImageDataset,
        degradation: Degradation,
        seed: int = 0,
        crop_shape: Sequence[int] | None = None,
    ):
        self.images, self.degradation, self.seed = images, degradation, int(seed)
        self.crop_shape = None if crop_shape is None else (int(crop_shape[0]), int(crop_shape[1]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        item = self.images[i]
        h, w = item["image"].shape[-2:]
        ys, xs = centre_crop_box(h, w, self.degradation.scale, self.crop_shape)
        out = {
            "hr": item["image"][:, ys, xs].contiguous(),
            "case_id": item["case_id"],
            "source": item["source"],
        }
        for k in ("mask", "instances"):
            if k in item:
                out[k] = item[k][ys, xs].contiguous()
        if "padding" in item:  # a DDP filler (see histoseg.data.datasets.ShardSampler): run, do not score
            out["padding"] = True
        out["lr"] = self.degradation(out["hr"], case_seed(self.seed, item["case_id"]))
        return out


class SRDataModule(HistoDataModule):
    """:class:`HistoDataModule` for super-resolution: same readers, splits and patch sampling; batches are
    ``{"hr": (B,3,H,W), "lr": (B,3,H/s,W/s), "case_id"}`` (whole images add ``mask``/``instances``/``source``).

    Args:
        degradation: the HR -> LR model (``conf/task/sr.yaml`` ``degradation``); its ``scale`` is the SR factor.
        eval_crop_shape: ``[h, w]`` centre crop of validation / test HR images (``None``: whole images).
        **kwargs: :class:`HistoDataModule` arguments (``patch_size`` is the HR patch side).
    """

    def __init__(
        self, *args, degradation: Degradation, eval_crop_shape: Sequence[int] | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        if self.scale != 1.0:
            raise ValueError(
                f"dataset {self.name!r}: a working resolution (inference.scale={self.scale}) does not apply to "
                "super-resolution, which learns from the HR images as read; leave inference.scale at 1"
            )
        if not isinstance(degradation, Degradation):
            raise TypeError(
                f"dataset {self.name!r}: degradation must be a Degradation, got {type(degradation).__name__}"
            )
        # sr_scale, not scale: HistoDataModule.scale is the working resolution training images are resized to
        # (1 here); sharing the name once made every HR training image 4x upsampled before patching
        self.degradation, self.sr_scale = degradation, degradation.scale
        self.eval_crop_shape = eval_crop_shape
        ph, pw = self.patch_shape
        s = self.sr_scale
        if ph % s or pw % s:
            raise ValueError(
                f"dataset {self.name!r}: patch_size {ph} (HR) is not divisible by the SR scale {s}; "
                f"use patch_size={ph // s * s or s}"
            )

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if isinstance(self.train_set, PatchDataset):
            self.train_set = SRPatchDataset(self.train_set, self.degradation, self.seed)
            self._check_first(self.train_set, (0, 0), "training patch")
        for attr in ("val_set", "test_set"):
            ds = getattr(self, attr)
            if isinstance(ds, WholeImageDataset):
                wrapped = SRWholeImageDataset(ds, self.degradation, self.seed, self.eval_crop_shape)
                setattr(self, attr, wrapped)
                if len(wrapped):
                    self._check_first(wrapped, 0, f"{attr[:-4]} image")

    def _check_first(self, ds: Dataset, key, what: str) -> None:
        try:
            ds[key]
        except DataError:
            raise
        except Exception as e:
            raise ValueError(f"dataset {self.name!r}: degrading the first {what} fails: {e}") from e
