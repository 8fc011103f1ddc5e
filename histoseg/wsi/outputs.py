"""Per-slide outputs: the pyramidal mask OME-TIFF, the QuPath GeoJSON, the overlay thumbnail and the summary.

All are written from the zarr stores tile by tile or block by block (memory bounded by a strip of the mask
width, a thumbnail or one block's nuclei) and renamed into place when complete.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from histoseg.analysis.palette import palette_for
from histoseg.data.io import publish
from histoseg.wsi.tiff import level_shapes, write_pyramid

TISSUE_STYLE = ("Tissue", [0, 150, 200])
TUMOUR_STYLE = ("Tumor", [200, 0, 0])  # QuPath's built-in "Tumor" class and colour


# ---------------------------------------------------------------------- mask pyramid
def _sample_index(n_out: int, start: int, d_out: float, scale: float, n_model: int, d_lab: int, n_lab: int):
    """Indices into a labels level (``d_lab`` model pixels per entry) for output pixels ``start..start+n_out``
    of a level with ``d_out`` level-0 pixels per pixel (nearest: the model pixel under each pixel centre)."""
    r = np.arange(start, start + n_out, dtype=np.float64)
    m = np.minimum(np.floor((r + 0.5) * d_out / scale).astype(np.int64), n_model - 1)
    return np.minimum(m // d_lab, n_lab - 1)


def write_mask_tiff(path: Path, labels_grp, model_shape: tuple[int, int], slide_shape: tuple[int, int],
                    scale: float, mpp: float, num_classes: int, tile: int = 256, compression: str = "zlib") -> Path:
    """The class map at the slide's level-0 size as a pyramidal OME-TIFF (binary: 0 / 255 grey; more classes:
    the palette's RGB colours), level ``l`` = every ``2**l``-th pixel, nearest sampling."""
    n_lab = len(list(labels_grp.array_keys()))
    shapes = level_shapes(slide_shape, tile)
    rgb = num_classes != 2
    lut = palette_for(num_classes) if rgb else np.array([0] + [255] * (num_classes - 1), np.uint8)
    cache: dict = {}

    def strip(level: int, y: int, h: int) -> np.ndarray:
        key = (level, y)
        if key not in cache:
            cache.clear()
            d_out = float(2**level)
            ratio = d_out / scale  # model pixels per output pixel
            j = int(min(max(math.floor(math.log2(ratio)), 0), n_lab - 1)) if ratio >= 1 else 0
            arr = labels_grp[str(j)]
            ys = _sample_index(h, y, d_out, scale, model_shape[0], 2**j, arr.shape[0])
            W = shapes[level][1]
            out = np.zeros((h, W), np.uint8)
            for x0 in range(0, W, 4096):
                n = min(4096, W - x0)
                xs = _sample_index(n, x0, d_out, scale, model_shape[1], 2**j, arr.shape[1])
                block = np.asarray(arr[int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1])
                out[:, x0 : x0 + n] = block[np.ix_(ys - ys.min(), xs - xs.min())]
            cache[key] = out
        return cache[key]

    def fn(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.ascontiguousarray(lut[strip(level, y, h)[:, x : x + w]])

    return write_pyramid(path, slide_shape, fn, 3 if rgb else 1, mpp, "ome", tile, compression, levels=shapes,
                         description="histoseg predicted class map")


# ---------------------------------------------------------------------- polygons and GeoJSON
def mask_polygons(mask: np.ndarray, scale: float, simplify: float = 0.0):
    """A boolean mask as a shapely (Multi)Polygon with holes, in level-0 coordinates (``scale`` level-0 pixels
    per mask pixel; pixel ``(r, c)`` covers ``[c*scale, (c+1)*scale)``); None when empty."""
    import shapely
    from shapely.geometry import Polygon

    m = np.ascontiguousarray(mask.astype(np.uint8))
    if not m.any():
        return None
    # contours around pixel edges: upsample x2 so a one-pixel-wide part keeps an area
    big = cv2.resize(m, (m.shape[1] * 2, m.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, hier = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    hier = hier[0] if hier is not None else []
    for i, c in enumerate(contours):
        if hier[i][3] != -1 or len(c) < 3:  # holes are collected from their parent
            continue
        shell = (c[:, 0, :].astype(np.float64) + 0.5) / 2 * scale
        holes = []
        k = hier[i][2]
        while k != -1:
            if len(contours[k]) >= 3:
                holes.append((contours[k][:, 0, :].astype(np.float64) + 0.5) / 2 * scale)
            k = hier[k][0]
        polys.append(shapely.make_valid(Polygon(shell, holes)))
    geom = shapely.unary_union(polys)
    if simplify > 0:
        geom = geom.simplify(simplify, preserve_topology=True)
    return None if geom.is_empty else geom


def annotation_feature(geom, name: str, color: list[int], measurements: dict, fid: str) -> dict:
    """A QuPath annotation (``objectType`` annotation) with a classification and measurements."""
    from shapely.geometry import mapping

    from histoseg.wsi.post import _round

    g = mapping(geom)
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": g["type"], "coordinates": _round(g["coordinates"])},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(color)},
            "isLocked": False,
            "measurements": measurements,
        },
    }


def write_geojson(path: Path, annotations: list[dict], block_files: Iterable[Path]) -> int:
    """A FeatureCollection: the annotations, then every nucleus of the block files, streamed to a temporary
    file and renamed. Returns the number of nucleus features."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [\n')
            first = True
            for feat in annotations:
                f.write(("" if first else ",\n") + json.dumps(feat, ensure_ascii=False))
                first = False
            for bf in block_files:  # JSON lines: a header, then one serialised feature per line
                with open(bf, encoding="utf-8") as src:
                    src.readline()
                    for line in src:
                        if line.strip():
                            f.write(("" if first else ",\n") + line.rstrip("\n"))
                            first = False
                            n += 1
            f.write("\n]}\n")
        publish(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


# ---------------------------------------------------------------------- thumbnails
def class_fractions(labels_grp, model_shape: tuple[int, int], model_per_px: float, out_shape: tuple[int, int],
                    num_classes: int) -> np.ndarray:
    """``(K, h, w)`` fraction of each class under every output pixel (``model_per_px`` model pixels per output
    pixel), from the finest ``labels.zarr`` level at most 4x finer than the output, read in row blocks."""
    n_lab = len(list(labels_grp.array_keys()))
    j = int(min(max(math.floor(math.log2(max(model_per_px / 4, 1))), 0), n_lab - 1))
    arr = labels_grp[str(j)]
    f = model_per_px / 2**j  # level-j entries per output pixel
    oh, ow = out_shape
    out = np.zeros((num_classes, oh, ow), np.float32)
    step = max(1, int((1 << 22) / max(arr.shape[1] * max(f, 1.0), 1)))  # output rows per strip (~4M entries read)
    c1 = max(min(int(math.ceil(ow * f)), arr.shape[1]), 1)
    for a in range(0, oh, step):
        b = min(oh, a + step)
        r0 = min(int(a * f), arr.shape[0] - 1)
        r1 = max(min(int(math.ceil(b * f)), arr.shape[0]), r0 + 1)
        lab = np.asarray(arr[r0:r1, :c1])
        for k in range(num_classes):
            out[k, a:b] = cv2.resize((lab == k).astype(np.float32), (ow, b - a), interpolation=cv2.INTER_AREA)
    return out


def overlay_thumbnail(rgb: np.ndarray, fractions: np.ndarray, num_classes: int, outlines: list[tuple[np.ndarray, tuple]],
                      alpha: float = 0.6) -> np.ndarray:
    """The slide thumbnail with predicted classes blended in (their pixel fraction under each thumbnail pixel
    times ``alpha``) and region outlines (``(mask, rgb colour)``) drawn on top."""
    from histoseg.analysis.figures import BINARY_CONTOUR

    out = rgb.astype(np.float32)
    colours = np.array([BINARY_CONTOUR] if num_classes == 2 else palette_for(num_classes)[1:], np.float32)
    for k, col in enumerate(colours, start=1):
        a = np.clip(fractions[k] * alpha * (4.0 if num_classes == 2 else 1.0), 0, alpha)[..., None]
        out = out * (1 - a) + col[None, None] * a
    out = out.astype(np.uint8)
    for mask, colour in outlines:
        if mask is None or not mask.any():
            continue
        m = cv2.resize(mask.astype(np.uint8), (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), max(1, out.shape[1] // 600))
    return out
