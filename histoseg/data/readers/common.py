"""Small file helpers shared by the dataset readers (no dataset knowledge here).

Every helper raises :class:`~histoseg.data.io.DataError` naming the file and the problem.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from histoseg.data.io import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_files(folder: Path, exts: Iterable[str] = IMAGE_EXTS, suffix: str = "") -> dict[str, Path]:
    """``{stem-without-suffix: path}`` for files in ``folder`` ending in ``suffix`` + one of ``exts``.

    Hidden files (``.x``, macOS ``._x``) are skipped. Raises if two files share an id (``a.png`` + ``a.jpg``).
    """
    out: dict[str, Path] = {}
    exts = tuple(e.lower() for e in exts)
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in exts:
            continue
        stem = p.stem
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        if stem in out:
            raise DataError(f"{folder}: two files for id {stem!r}: {out[stem].name} and {p.name}")
        out[stem] = p
    return out


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def image_shape(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image from its header only (fast); a clear error if it is missing or not an image."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(p)) as t:
                page = t.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        with Image.open(p) as im:
            w, h = im.size
        return int(h), int(w)
    except DataError:
        raise
    except Exception as e:  # PIL / tifffile raise many types
        raise DataError(f"{p}: cannot read the image header, the file is corrupt or not an image ({e})") from None


def check_same_shape(image: Path, *labels: Path | None) -> tuple[int, int]:
    """Header-level check that every label file has the image's size; returns ``(H, W)``."""
    shape = image_shape(image)
    for lab in labels:
        if lab is None:
            continue
        ls = image_shape(lab)
        if ls != shape:
            raise DataError(
                f"{lab}: label is {ls[1]}x{ls[0]} but its image {image.name} is {shape[1]}x{shape[0]} (W x H)"
            )
    return shape


def require_same_shape(image: np.ndarray, label: np.ndarray, label_path: Path, image_path: Path) -> None:
    if label.shape[:2] != image.shape[:2]:
        raise DataError(
            f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image {image_path.name} is "
            f"{image.shape[1]}x{image.shape[0]} (W x H)"
        )


def binarise(gray: np.ndarray, threshold: int = 128) -> np.ndarray:
    """``gray >= threshold`` as a uint8 0/1 mask (masks stored as 0/255, possibly JPEG-compressed)."""
    return (gray >= threshold).astype(np.uint8)


def connected_instances(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Instance ids (int32, 0 = background) from a binary mask by connected components.

    4-connectivity by default, so two nuclei touching only at a corner stay two objects.
    """
    n, lab = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)
    return lab.astype(np.int32)


def relabel_sequential(inst: np.ndarray) -> np.ndarray:
    """Map the non-zero ids present in a (non-negative) instance map to ``1..N`` keeping their order; int32."""
    if not inst.size:
        return inst.astype(np.int32)
    present = np.bincount(inst.ravel().astype(np.int64))
    present[0] = 0
    ids = np.flatnonzero(present)
    lut = np.zeros(len(present), np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[inst]


def draw_discs(
    shape: tuple[int, int], centres: list[tuple[int, np.ndarray]], radius: float, method: str = "exact"
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise discs: ``centres`` is a list of ``(class value, (N, 2) pixel xy)`` in drawing order.

    Returns ``(mask uint8, instances int32)``; later discs overwrite earlier ones. ``method='exact'``
    fills the pixels whose centre lies within ``radius`` of the (sub-pixel) point; ``'opencv'`` reproduces
    the seed's ``cv2.circle(..., thickness=-1)`` at the centre rounded to a whole pixel (so up to half a
    pixel off the annotated point).
    """
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.int32)
    r = float(radius)
    n = 0
    for value, xy in centres:
        for x, y in np.asarray(xy, np.float64).reshape(-1, 2):
            n += 1
            if method == "opencv":
                c = (int(round(x)), int(round(y)))
                cv2.circle(mask, c, int(round(r)), int(value), thickness=-1)
                cv2.circle(inst, c, int(round(r)), n, thickness=-1)
                continue
            if method != "exact":
                raise ValueError(f"disc method must be 'exact' or 'opencv', got {method!r}")
            y0, y1 = max(int(np.ceil(y - r)), 0), min(int(np.floor(y + r)), h - 1)
            x0, x1 = max(int(np.ceil(x - r)), 0), min(int(np.floor(x + r)), w - 1)
            if y0 > y1 or x0 > x1:
                continue
            yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
            inside = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
            mask[y0 : y1 + 1, x0 : x1 + 1][inside] = value
            inst[y0 : y1 + 1, x0 : x1 + 1][inside] = n
    return mask, relabel_sequential(inst)
