"""Tissue detection on a low-resolution overview, so background tiles are never read at full resolution.

Glass is bright and grey, stained tissue is coloured: the overview (``mpp`` microns per pixel, read from the
best pyramid level in strips) is thresholded on HSV saturation, by Otsu's method kept within
``[min_saturation, max_saturation]`` (so an all-tissue overview, whose Otsu threshold would split the tissue,
still counts as tissue, and an all-glass one stays empty), or at a fixed ``threshold``; then closed,
opened and hole-filled (radii in microns), and components below ``min_area_mm2`` are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

from histoseg.wsi.slide import Slide


@dataclass
class TissueMask:
    """Boolean overview mask; ``scale`` level-0 pixels per mask pixel, ``mpp`` microns per mask pixel."""

    mask: np.ndarray
    scale: float
    mpp: float
    threshold: float
    overview: np.ndarray | None = None  # the RGB overview it was computed from

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp * 1e-3) ** 2

    def tile_filter(self, grid_scale: float, min_fraction: float = 0.0):
        """``f(y, x, th, tw) -> bool`` for tiles on a pixel grid of ``grid_scale`` level-0 pixels per pixel:
        true when more than ``min_fraction`` of the tile's footprint on the mask is tissue (any tissue pixel
        for the default 0). A summed-area table makes each query O(1)."""
        m = self.mask.astype(np.int64)
        sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
        sat[1:, 1:] = m.cumsum(0).cumsum(1)
        k = grid_scale / self.scale  # mask pixels per grid pixel
        H, W = m.shape

        def keep(y: int, x: int, th: int, tw: int) -> bool:
            a0, a1 = min(int(math.floor(y * k)), H), min(int(math.ceil((y + th) * k)), H)
            b0, b1 = min(int(math.floor(x * k)), W), min(int(math.ceil((x + tw) * k)), W)
            if a1 <= a0 or b1 <= b0:
                return False
            n = sat[a1, b1] - sat[a0, b1] - sat[a1, b0] + sat[a0, b0]
            return n > min_fraction * (a1 - a0) * (b1 - b0)

        return keep


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]: ``(max - min) / max`` per pixel (0 for black)."""
    a = rgb.astype(np.float32)
    mx, mn = a.max(-1), a.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)


def tissue_from_overview(
    rgb: np.ndarray,
    mpp: float,
    threshold: str | float = "otsu",
    min_saturation: float = 0.05,
    max_saturation: float = 0.15,
    closing_um: float = 40.0,
    opening_um: float = 16.0,
    fill_holes: bool = True,
    min_area_mm2: float = 0.01,
) -> tuple[np.ndarray, float]:
    """``(mask, threshold used)`` of an RGB overview at ``mpp`` microns per pixel (see the module docstring)."""
    s = saturation(rgb)
    if threshold == "otsu":
        t = float(filters.threshold_otsu(s)) if s.size and s.max() > s.min() else max_saturation
        t = min(max(t, float(min_saturation)), float(max_saturation))
    else:
        t = float(threshold)
        if not 0 <= t <= 1:
            raise ValueError(f"tissue threshold must be 'otsu' or a saturation in [0, 1], got {threshold!r}")
    return clean_mask(s > t, mpp, closing_um, opening_um, fill_holes, min_area_mm2), t


def clean_mask(m: np.ndarray, mpp: float, closing_um: float = 0.0, opening_um: float = 0.0, fill_holes: bool = True,
               min_area_mm2: float = 0.0) -> np.ndarray:
    """Closing, opening (disk radii in microns), hole filling and removal of components below
    ``min_area_mm2`` of a boolean mask at ``mpp`` microns per pixel."""
    m = np.asarray(m, bool)
    r_close, r_open = int(round(closing_um / mpp)), int(round(opening_um / mpp))
    if r_close > 0:
        m = ndi.binary_closing(np.pad(m, r_close), morphology.disk(r_close))[r_close:-r_close, r_close:-r_close]
    if r_open > 0:
        m = ndi.binary_opening(m, morphology.disk(r_open))
    if fill_holes:
        m = ndi.binary_fill_holes(m)
    min_px = int(math.ceil(min_area_mm2 / (mpp * 1e-3) ** 2))
    if min_px > 1 and m.any():
        lab, n = ndi.label(m)
        sizes = np.bincount(lab.ravel())
        m = (sizes >= min_px)[lab] & m
    return m.astype(bool)


def detect_tissue(slide: Slide, mpp: float = 8.0, keep_overview: bool = True, **params) -> TissueMask:
    """Tissue mask of ``slide`` at ``mpp`` microns per pixel (``params``: :func:`tissue_from_overview`)."""
    scale = float(mpp) / slide.mpp
    if scale < 1:
        scale, mpp = 1.0, slide.mpp  # never finer than level 0
    rgb = slide.read_overview(scale)
    mask, t = tissue_from_overview(rgb, mpp, **params)
    return TissueMask(mask, scale, float(mpp), t, rgb if keep_overview else None)
