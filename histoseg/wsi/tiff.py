"""Pyramidal tiled TIFF writing (tifffile), tile by tile, so an image of any size never sits in memory.

Three layouts: ``ome`` (OME-TIFF, reduced resolutions in SubIFDs, ``PhysicalSizeX/Y`` in the OME-XML: what
QuPath / Bio-Formats open as a pyramid), ``tif`` (a generic tiled TIFF, SubIFD pyramid, resolution tags in
pixels per centimetre) and ``svs`` (Aperio layout: the baseline with an ``Aperio ...|MPP = x`` description,
a stripped thumbnail, then one IFD per reduced level). The file is written to a temporary name and renamed
when complete.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from histoseg.data.io import publish

KINDS = ("ome", "tif", "svs")
TileFn = Callable[[int, int, int, int, int], np.ndarray]  # (level, y, x, h, w) -> (h, w[, 3]) uint8


def level_shapes(shape: tuple[int, int], min_side: int = 256, max_levels: int | None = None) -> list[tuple[int, int]]:
    """Level ``l`` is ``ceil(H / 2**l) x ceil(W / 2**l)``; levels stop once both sides fit ``min_side``."""
    h, w = int(shape[0]), int(shape[1])
    out = [(h, w)]
    while max(out[-1]) > min_side and (max_levels is None or len(out) < max_levels):
        d = 2 ** len(out)
        out.append((max(math.ceil(h / d), 1), max(math.ceil(w / d), 1)))
    return out


def _tiles(fn: TileFn, level: int, shape: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    h, w = shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            yield fn(level, y, x, min(tile, h - y), min(tile, w - x))


def write_pyramid(
    path: str | Path,
    shape: tuple[int, int],
    tile_fn: TileFn,
    channels: int = 3,
    mpp: float | None = None,
    kind: str = "ome",
    tile: int = 256,
    compression: str = "zlib",
    levels: list[tuple[int, int]] | None = None,
    description: str | None = None,
) -> Path:
    """Write a pyramidal tiled TIFF whose level ``l`` pixels come from ``tile_fn(l, y, x, h, w)``.

    Args:
        shape: level-0 ``(H, W)``.
        channels: 3 (RGB) or 1 (grey / label values).
        mpp: level-0 microns per pixel written as metadata (``None``: no pixel size).
        kind: ``ome``, ``tif`` or ``svs`` (see the module docstring).
        compression: a tifffile compression (``zlib`` = Adobe deflate, ``jpeg``, ``lzw``, ``zstd`` ...).
        levels: level shapes (default :func:`level_shapes`).
    """
    import tifffile

    if kind not in KINDS:
        raise ValueError(f"unknown pyramid kind {kind!r}; choose one of {KINDS}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    levels = levels or level_shapes(shape, tile)
    full = lambda s: (*s, 3) if channels == 3 else tuple(s)  # noqa: E731
    photometric = "rgb" if channels == 3 else "minisblack"
    common = dict(dtype=np.uint8, tile=(tile, tile), photometric=photometric, compression=compression)
    res = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=(kind == "ome")) as tif:
            if kind == "svs":
                h, w = levels[0]
                desc = (f"Aperio Image Library v12.0.0 (histoseg)\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                        f"{compression.upper()}")
                if mpp is not None:
                    desc += f"|MPP = {mpp}"
                if description:
                    desc += f"|{description}"
                tif.write(_tiles(tile_fn, 0, levels[0], tile), shape=full(levels[0]), description=desc,
                          metadata=None, **common)
                # the thumbnail IFD (stripped) that the SVS layout places second
                tl = len(levels) - 1  # the smallest level doubles as the thumbnail
                thumb = np.concatenate([np.concatenate(row, 1) for row in _tile_grid(tile_fn, tl, levels[tl], tile)], 0)
                tif.write(thumb, photometric=photometric, description="Aperio thumbnail (histoseg)", metadata=None)
                for lv in range(1, len(levels)):
                    tif.write(_tiles(tile_fn, lv, levels[lv], tile), shape=full(levels[lv]), metadata=None, **common)
            else:
                if kind == "ome":
                    md = {"axes": "YXS" if channels == 3 else "YX"}
                    if mpp is not None:
                        md.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
                    if description:
                        md["Description"] = description
                else:
                    md = None
                tif.write(_tiles(tile_fn, 0, levels[0], tile), shape=full(levels[0]), subifds=len(levels) - 1,
                          metadata=md, description=description if kind == "tif" else None, **res, **common)
                for lv in range(1, len(levels)):
                    tif.write(_tiles(tile_fn, lv, levels[lv], tile), shape=full(levels[lv]), subfiletype=1,
                              metadata=None, **res, **common)
        publish(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _tile_grid(fn: TileFn, level: int, shape: tuple[int, int], tile: int):
    h, w = shape
    for y in range(0, h, tile):
        yield [fn(level, y, x, min(tile, h - y), min(tile, w - x)) for x in range(0, w, tile)]


def array_tile_fn(levels: list[np.ndarray]) -> TileFn:
    """A :data:`TileFn` over in-memory level arrays (for small images and tests)."""

    def fn(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.ascontiguousarray(levels[level][y : y + h, x : x + w])

    return fn


def downsample_levels(image: np.ndarray, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """In-memory pyramid of ``image`` at ``shapes`` (area averaging), for small test images."""
    import cv2

    out = [image]
    for h, w in shapes[1:]:
        out.append(cv2.resize(out[-1], (w, h), interpolation=cv2.INTER_AREA))
    return out
