"""Stain (colour) normalisation of H&E images to the training set's colour statistics.

Reinhard et al. (2001) colour transfer, as used for H&E since Reinhard / Macenko comparisons (e.g. Tellez
et al. 2019): each CIE L*a*b* channel of an image is standardised with the image's own mean and standard
deviation, then given the reference mean and standard deviation. The reference is pooled over the training
images (:func:`reinhard_reference`), stored in every checkpoint (``data_info['stain_ref']``) and applied to
whole images before tiled inference when ``inference.stain_norm=reinhard``: an image from an unseen lab or
organ is moved to the colour distribution the model was trained on, with no retraining.

Statistics are taken over the whole image (not per tile), so a tile's colours do not depend on its
neighbours; ``source`` statistics can be given explicitly (e.g. from a slide thumbnail).

A reference is a plain dict ``{"method": "reinhard", "mean": [L, a, b], "std": [L, a, b]}`` (JSON and
``torch.load(weights_only=True)`` safe).
"""
from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

METHODS = ("reinhard",)
MIN_STD = 1e-3  # a flat channel (a blank image) is shifted to the reference mean instead of divided by 0


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"stain_norm={method!r} is not a stain normalisation method; choose one of "
                         f"{', '.join(METHODS)} (or null for none)")
    return method


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    """``HxWx3`` uint8 (0..255) or float (0..1) -> float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"stain normalisation needs an HxWx3 RGB image, got shape {tuple(image.shape)}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)


def to_lab(image: np.ndarray) -> np.ndarray:
    """RGB (uint8 or float in [0, 1]) -> CIE L*a*b* float32 (L in 0..100, a / b about -128..127; D65)."""
    return cv2.cvtColor(_as_float_rgb(image), cv2.COLOR_RGB2Lab)


def _lab_pixels(image: np.ndarray, step: int) -> np.ndarray:
    """``(N, 3)`` float64 L*a*b* values of every ``step``-th pixel per axis."""
    return to_lab(image[::step, ::step]).reshape(-1, 3).astype(np.float64)


def lab_stats(image: np.ndarray, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel L*a*b* mean and standard deviation of an image (every ``step``-th pixel per axis)."""
    lab = _lab_pixels(image, step)
    return lab.mean(0), lab.std(0)


def reinhard_reference(images: Iterable[np.ndarray], step: int = 4) -> dict:
    """The reference of a set of images: L*a*b* mean and standard deviation pooled over all their pixels
    (every ``step``-th pixel per axis), so large images weigh more than small ones."""
    n, s, ss = 0, np.zeros(3), np.zeros(3)
    for im in images:
        lab = _lab_pixels(im, step)
        n += len(lab)
        s += lab.sum(0)
        ss += np.square(lab).sum(0)
    if n == 0:
        raise ValueError("stain reference: no images (or no pixels) to compute it from")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return {"method": "reinhard", "mean": [float(v) for v in mean], "std": [float(v) for v in std], "pixels": n}


def check_reference(ref) -> dict:
    """A stored reference, validated (names what is wrong)."""
    if not isinstance(ref, dict) or ref.get("method") not in METHODS:
        raise ValueError(f"not a stain reference (need a dict with method in {METHODS}): {ref!r}")
    for k in ("mean", "std"):
        v = ref.get(k)
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(np.isfinite(float(x)) for x in v):
            raise ValueError(f"stain reference: {k!r} must be 3 finite numbers (L, a, b), got {v!r}")
    if min(float(x) for x in ref["std"]) <= 0:
        raise ValueError(f"stain reference: std must be positive, got {ref['std']}")
    return ref


def reinhard_normalize(image: np.ndarray, ref: dict, source: tuple | None = None) -> np.ndarray:
    """The image with the reference's L*a*b* statistics (Reinhard colour transfer).

    ``image``: ``HxWx3`` uint8 or float in [0, 1]; the result has the same dtype and range. ``source``:
    ``(mean, std)`` of the image to use instead of its own (e.g. a whole slide's, from a thumbnail).
    """
    ref = check_reference(ref)
    lab = to_lab(image)
    mu, sd = source if source is not None else lab_stats(image)
    mu, sd = np.asarray(mu, np.float32), np.maximum(np.asarray(sd, np.float32), MIN_STD)
    lab = (lab - mu) / sd * np.asarray(ref["std"], np.float32) + np.asarray(ref["mean"], np.float32)
    lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
    rgb = np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB), 0.0, 1.0)
    if image.dtype == np.uint8:
        return np.round(rgb * 255.0).astype(np.uint8)
    return rgb.astype(image.dtype, copy=False)


__all__ = ["METHODS", "check_method", "check_reference", "lab_stats", "reinhard_normalize", "reinhard_reference",
           "to_lab"]
