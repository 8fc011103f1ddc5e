"""Nucleus morphometry and tumour cellularity from predicted maps (pure functions, numpy in, dict out).

Units: areas in pixels and in um^2 (``mpp`` = microns per pixel), density in nuclei per mm^2 of *image*
area (the whole field of view, background included). Shape descriptors are scikit-image ``regionprops``:
eccentricity of the ellipse with the same second moments (0 = circle) and solidity (area / convex area).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.measure import regionprops_table

NUCLEI_KEYS = (
    "nuclei_count", "density_per_mm2", "area_mean_px", "area_median_px", "area_mean_um2", "area_median_um2",
    "eccentricity_mean", "solidity_mean",
)


def nuclei_stats(instances: np.ndarray, mpp: float | None) -> dict[str, float]:
    """Count, density and mean shape of the nuclei of one instance map.

    Args:
        instances: ``HxW`` integer map, 0 = background, one id per nucleus (ids need not be contiguous).
        mpp: microns per pixel; ``None`` leaves the physical-unit fields (density, um^2) as NaN.

    Returns:
        ``nuclei_count``, ``density_per_mm2``, ``area_mean_px``, ``area_median_px``, ``area_mean_um2``,
        ``area_median_um2``, ``eccentricity_mean``, ``solidity_mean`` (NaN where undefined: no nuclei, or
        no ``mpp``).
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be an HxW map, got shape {inst.shape}")
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"instances must be an integer map, got dtype {inst.dtype}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp}")
    nan = float("nan")
    px_um2 = float(mpp) ** 2 if mpp is not None else nan
    field_mm2 = inst.shape[0] * inst.shape[1] * px_um2 * 1e-6
    props = regionprops_table(inst.astype(np.int32, copy=False), properties=("area", "eccentricity", "solidity"))
    area = np.asarray(props["area"], np.float64)
    n = len(area)
    out = {"nuclei_count": n, "density_per_mm2": n / field_mm2 if mpp is not None else nan}
    if n == 0:
        out.update({k: nan for k in NUCLEI_KEYS[2:]})
        return out
    out.update(
        area_mean_px=float(area.mean()),
        area_median_px=float(np.median(area)),
        area_mean_um2=float(area.mean() * px_um2),
        area_median_um2=float(np.median(area) * px_um2),
        eccentricity_mean=float(np.mean(props["eccentricity"])),
        solidity_mean=float(np.mean(props["solidity"])),
    )
    return out


def cellularity(labels: np.ndarray, tumour_classes: Sequence[int], nucleus_classes: Sequence[int]) -> float:
    """Tumour cellularity in percent: tumour-nucleus area / all-nucleus area x 100 (NaN without nuclei).

    With the cellularity encoding (background 0, tumour 1, non-tumour 2, boundary 3) use
    ``tumour_classes=[1]``, ``nucleus_classes=[1, 2]``: boundary pixels count as neither.
    """
    tumour, nucleus = [int(c) for c in tumour_classes], [int(c) for c in nucleus_classes]
    if not tumour or not set(tumour) <= set(nucleus):
        raise ValueError(f"tumour_classes {tumour} must be a non-empty subset of nucleus_classes {nucleus}")
    labels = np.asarray(labels)
    n_nucleus = int(np.isin(labels, nucleus).sum())
    if n_nucleus == 0:
        return float("nan")
    return 100.0 * int(np.isin(labels, tumour).sum()) / n_nucleus
