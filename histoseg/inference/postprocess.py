"""Post-processing: probabilities -> class map -> cleaned mask -> nucleus instances.

Configured by ``conf/postprocess/*.yaml`` and stored in checkpoints, so evaluation and prediction apply
exactly what validation used.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology, segmentation


def to_class_map(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``(1,H,W)`` foreground probabilities -> {0,1} by threshold; ``(K,H,W)`` -> argmax."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"expected (K,H,W) probabilities, got {probs.shape}")
    if probs.shape[0] == 1:
        return (probs[0] > threshold).astype(np.uint8)
    return probs.argmax(0).astype(np.uint8)


def clean_binary(mask: np.ndarray, opening_radius: int = 0, fill_holes: bool = False, min_size: int = 0) -> np.ndarray:
    """Morphological opening (disk radius), hole filling and small-object removal on a binary mask."""
    m = np.asarray(mask).astype(bool)
    if opening_radius > 0:
        m = morphology.binary_opening(m, morphology.disk(int(opening_radius)))
    if fill_holes:
        m = ndi.binary_fill_holes(m)
    if min_size > 0:
        m = morphology.remove_small_objects(m, max_size=int(min_size) - 1) if _new_skimage() else \
            morphology.remove_small_objects(m, min_size=int(min_size))
    return m


def _new_skimage() -> bool:
    import inspect

    return "max_size" in inspect.signature(morphology.remove_small_objects).parameters


def clean_class_map(labels: np.ndarray, opening_radius: int = 0, fill_holes: bool = False, min_size: int = 0) -> np.ndarray:
    """Apply :func:`clean_binary` per foreground class of a class map (pixels removed become background)."""
    out = np.zeros_like(labels)
    for k in np.unique(labels):
        if k == 0:
            continue
        out[clean_binary(labels == k, opening_radius, fill_holes, min_size)] = k
    return out


def distance_watershed(mask: np.ndarray, h: float = 1.0, smooth: float = 1.0, min_size: int = 0) -> np.ndarray:
    """Split touching nuclei: markers are the h-maxima of the (smoothed) distance transform of ``mask``;
    flooding ``-distance`` from them inside the mask gives one label per nucleus."""
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return np.zeros(m.shape, np.int32)
    dist = ndi.distance_transform_edt(m)
    if smooth > 0:
        dist = ndi.gaussian_filter(dist, smooth)
    markers, _ = ndi.label(morphology.h_maxima(dist, h) if h > 0 else morphology.local_maxima(dist))
    inst = segmentation.watershed(-dist, markers, mask=m)
    if min_size > 0:
        inst = remove_small_instances(inst, min_size)
    return inst.astype(np.int32)


def remove_small_instances(inst: np.ndarray, min_size: int) -> np.ndarray:
    areas = np.bincount(inst.ravel())
    small = np.nonzero(areas < min_size)[0]
    out = inst.copy()
    out[np.isin(out, small[small > 0])] = 0
    from histoseg.metrics.instance import remap_label

    return remap_label(out)


class PostProcessor:
    """Probabilities -> ``{"labels": class map, "instances": instance map or None}``.

    Args:
        threshold: foreground probability threshold (binary models).
        opening_radius / fill_holes / min_size: clean-up of each foreground class (pixels).
        instances: ``none``, ``connected`` (connected components) or ``watershed`` (distance-transform
            watershed on the foreground, to split touching nuclei).
        h / smooth: watershed marker h-maxima height (pixels of distance) and distance smoothing sigma.
        nuclei_classes: classes that count as nuclei for instances (default: every foreground class).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        opening_radius: int = 0,
        fill_holes: bool = False,
        min_size: int = 0,
        instances: str = "watershed",
        h: float = 1.0,
        smooth: float = 1.0,
        nuclei_classes: list[int] | None = None,
    ):
        if instances not in ("none", "connected", "watershed"):
            raise ValueError(f"instances must be none, connected or watershed, got {instances!r}")
        self.threshold, self.opening_radius, self.fill_holes = float(threshold), int(opening_radius), bool(fill_holes)
        self.min_size, self.instances, self.h, self.smooth = int(min_size), instances, float(h), float(smooth)
        self.nuclei_classes = None if nuclei_classes is None else [int(c) for c in nuclei_classes]

    def config(self) -> dict:
        return {
            "threshold": self.threshold, "opening_radius": self.opening_radius, "fill_holes": self.fill_holes,
            "min_size": self.min_size, "instances": self.instances, "h": self.h, "smooth": self.smooth,
            "nuclei_classes": self.nuclei_classes,
        }

    def __call__(self, probs: np.ndarray) -> dict[str, np.ndarray | None]:
        labels = to_class_map(probs, self.threshold)
        labels = clean_class_map(labels, self.opening_radius, self.fill_holes, self.min_size)
        inst = None
        if self.instances != "none":
            fg = labels > 0 if self.nuclei_classes is None else np.isin(labels, self.nuclei_classes)
            if self.instances == "connected":
                inst = ndi.label(fg)[0].astype(np.int32)
            else:
                inst = distance_watershed(fg, self.h, self.smooth, self.min_size)
        return {"labels": labels, "instances": inst}
