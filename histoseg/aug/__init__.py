"""Augmentation: albumentations pipelines built from ``conf/aug/*.yaml``, plus GPU-side batch transforms.

Each aug yaml lists albumentations transforms with their 2.x argument names; ``build_aug`` composes them.
Masks (and instance maps) always use nearest-neighbour interpolation, so labels are never blended.
"""
from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2


def build_aug(transforms: Sequence[A.BasicTransform] | None = None, name: str = "custom", p: float = 1.0) -> A.Compose:
    """Compose transforms (instantiated by Hydra) with nearest-neighbour mask interpolation."""
    tfs = list(transforms or [])
    for t in tfs:
        if not isinstance(t, A.BasicTransform | A.BaseCompose):
            raise TypeError(f"aug {name!r}: {t!r} is not an albumentations transform")
    comp = A.Compose(tfs, p=p, mask_interpolation=cv2.INTER_NEAREST)
    comp.histoseg_name = name
    return comp
