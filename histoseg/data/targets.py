"""Instance-aware training targets, computed from instance maps *after* augmentation.

Kinds (``conf/target/*.yaml``):

* ``binary``: nucleus vs background (``seg``, long HxW).
* ``three_class``: background / nucleus interior / nucleus boundary (``seg``); boundary = nucleus pixels
  within ``boundary_width`` px of another label (background or a touching nucleus).
* ``distance``: per-nucleus distance to its boundary, normalised to [0, 1] per nucleus (``dist``, 1xHxW).
* ``hv``: horizontal and vertical offsets to the nucleus centre of mass, each normalised to [-1, 1] per
  nucleus (``hv``, 2xHxW, HoVer-Net).

Because they are computed from the augmented instance map, they are always consistent with the augmented
image. Instance ids are relabelled by connectivity first, so a nucleus split by a crop or duplicated by a
reflect border becomes separate objects. When a training image has no instance map (only a binary mask,
where touching nuclei are merged), the targets stay honest: background and the outer boundary ring are
supervised, the ambiguous nucleus interior gets ``ignore_index`` and regression maps are masked out
(``inst_valid`` = 0).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.measure import label as cc_label
from skimage.segmentation import find_boundaries

KINDS = ("binary", "three_class", "distance", "hv")
IGNORE = 255


def relabel(inst: np.ndarray) -> np.ndarray:
    """Contiguous ids; disconnected parts of one id become separate objects (4-connectivity)."""
    return cc_label(inst.astype(np.int32), background=0, connectivity=1).astype(np.int32)


def boundary_map(inst: np.ndarray, width: int) -> np.ndarray:
    """Nucleus pixels within ``width`` px of a pixel with another label."""
    b = find_boundaries(inst, mode="inner", connectivity=1)
    if width > 1:
        b = ndi.binary_dilation(b, structure=np.ones((3, 3), bool), iterations=width - 1)
    return b & (inst > 0)


def three_class(inst: np.ndarray, width: int) -> np.ndarray:
    seg = (inst > 0).astype(np.int64)
    seg[boundary_map(inst, width)] = 2
    return seg


def distance_map(inst: np.ndarray) -> np.ndarray:
    """Per-nucleus Euclidean distance to the nucleus border, divided by that nucleus's maximum."""
    if not inst.any():
        return np.zeros(inst.shape, np.float32)
    inner = (inst > 0) & ~find_boundaries(inst, mode="inner", connectivity=1)
    d = ndi.distance_transform_edt(inner) + (inst > 0)  # border pixels get 1, interior grows inwards
    ids = np.arange(1, int(inst.max()) + 1)
    mx = np.zeros(len(ids) + 1)
    mx[1:] = ndi.maximum(d, labels=inst, index=ids)
    out = np.where(inst > 0, d / np.maximum(mx[inst], 1e-6), 0.0)
    return out.astype(np.float32)


def hv_map(inst: np.ndarray) -> np.ndarray:
    """Offsets to the centre of mass, per nucleus normalised so the negative side reaches -1 and the
    positive side +1 (HoVer-Net). Returns (2, H, W): [horizontal, vertical]."""
    h, w = inst.shape
    out = np.zeros((2, h, w), np.float32)
    n = int(inst.max())
    if n == 0:
        return out
    ids = np.arange(1, n + 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fg = inst > 0
    com = np.array(ndi.center_of_mass(fg, labels=inst, index=ids)).reshape(-1, 2)
    for c, coord in enumerate((xx, yy)):
        centre = np.zeros(n + 1)
        centre[1:] = com[:, 1 - c]
        off = np.where(fg, coord - centre[inst], 0.0)
        pos = np.zeros(n + 1)
        neg = np.zeros(n + 1)
        pos[1:] = ndi.maximum(off, labels=inst, index=ids)
        neg[1:] = -ndi.minimum(off, labels=inst, index=ids)
        v = np.where(off > 0, off / np.maximum(pos[inst], 1e-6), off / np.maximum(neg[inst], 1e-6))
        out[c] = np.where(fg, v, 0.0)
    return out


class InstanceTargets:
    """Callable ``(mask, instances, has_instances) -> dict`` of target tensors added to each training item.

    Args:
        kinds: any of ``binary``, ``three_class``, ``distance``, ``hv``; the class target (``binary`` or
            ``three_class``, at most one) is stored under ``seg``.
        boundary_width: boundary thickness in pixels for ``three_class``.
    """

    def __init__(self, kinds: list[str] | str = ("three_class",), boundary_width: int = 2):
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown target kind(s) {bad}; choose from {KINDS}")
        if sum(k in ("binary", "three_class") for k in kinds) > 1:
            raise ValueError("choose at most one class target: binary or three_class")
        self.kinds, self.boundary_width = kinds, int(boundary_width)

    @property
    def needs_instances(self) -> bool:
        return any(k != "binary" for k in self.kinds)

    def __call__(self, mask: torch.Tensor, instances: torch.Tensor | None, has_instances: bool = True) -> dict:
        m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        fg = m > 0
        if instances is not None and has_instances:
            inst = relabel(instances.numpy() if isinstance(instances, torch.Tensor) else np.asarray(instances))
            valid = True
        else:  # only a binary mask: connected components merge touching nuclei
            inst = relabel(fg)
            valid = False
        out: dict[str, torch.Tensor] = {}
        for k in self.kinds:
            if k == "binary":
                out["seg"] = torch.from_numpy(fg.astype(np.int64))
            elif k == "three_class":
                seg = three_class(inst, self.boundary_width)
                if not valid:  # outer border and background are certain; interiors of merged blobs are not
                    outer = boundary_map(fg.astype(np.int32), self.boundary_width)
                    seg = np.where(fg, IGNORE, 0).astype(np.int64)
                    seg[outer] = 2
                out["seg"] = torch.from_numpy(seg)
            elif k == "distance":
                out["dist"] = torch.from_numpy(distance_map(inst))[None]
            elif k == "hv":
                out["hv"] = torch.from_numpy(hv_map(inst))
        out["inst_valid"] = torch.tensor(valid)
        return out
