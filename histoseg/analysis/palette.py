"""Class-map colours.

* binary (2 classes): a single-channel 0 / 255 mask;
* 4 classes: the tumour-cellularity seed's encoding, class order ``background=0, tumour=1,
  non_tumour=2, boundary=3`` drawn black / red / green / blue;
* any other number of classes: a fixed qualitative palette (black background, then matplotlib tab10).

The cellularity colours are defined once, by the reader of that format
(:mod:`histoseg.data.readers.cellularity`, which also decodes noisy masks).
"""
from __future__ import annotations

import numpy as np

from histoseg.data.readers.cellularity import CLASS_NAMES as CELLULARITY_CLASSES  # noqa: F401 (re-export)
from histoseg.data.readers.cellularity import PALETTE as CELLULARITY_PALETTE

# black, then matplotlib's tab10 (for class maps that are neither binary nor the cellularity encoding)
GENERIC_PALETTE = np.array(
    [[0, 0, 0], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
     [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]],
    np.uint8,
)


def palette_for(num_classes: int) -> np.ndarray:
    """``(K, 3)`` uint8 RGB colours of a ``num_classes`` class map (binary: black / white)."""
    k = int(num_classes)
    if k == 2:
        return np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
    if k == 4:
        return CELLULARITY_PALETTE
    if k > len(GENERIC_PALETTE):
        raise ValueError(f"no palette for {k} classes (at most {len(GENERIC_PALETTE)})")
    return GENERIC_PALETTE[:k]


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A class map as an image: ``HxW`` uint8 0/255 for binary models, ``HxWx3`` RGB otherwise."""
    labels = np.asarray(labels)
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"class map holds value {int(labels.max())} but the model has {num_classes} classes")
    if int(num_classes) == 2:
        return np.where(labels > 0, 255, 0).astype(np.uint8)
    return palette_for(num_classes)[labels]


def decode(rgb: np.ndarray, palette: np.ndarray = CELLULARITY_PALETTE) -> np.ndarray:
    """Inverse of :func:`colorize` for exact palette colours: ``HxWx3`` -> class map; other colours raise."""
    rgb = np.asarray(rgb)
    out = np.full(rgb.shape[:2], -1, np.int16)
    for k, c in enumerate(palette):
        out[(rgb == c).all(-1)] = k
    if (out < 0).any():
        bad = rgb[out < 0][0].tolist()
        raise ValueError(f"colour {bad} is not in the palette {palette.tolist()}")
    return out.astype(np.uint8)
