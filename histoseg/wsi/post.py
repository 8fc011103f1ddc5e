"""Streaming post-processing: logits zarr -> class-map pyramid (zarr) + nuclei (polygons and measurements).

The model-resolution logits are processed in *core* blocks of ``core`` pixels, each read with a ``halo``
of context on every side; the task's own post-processing (:class:`~histoseg.inference.postprocess.PostProcessor`
via ``maps_from_raw``) runs on the window, and

* the class map of the core is written to ``labels.zarr`` (level ``j`` of the group holds every ``2**j``-th
  pixel, nearest sampling, for the mask pyramid and the thumbnails);
* a nucleus is kept by the block whose core contains its centroid, so none is cut or counted twice. A
  nucleus touching the window's edge (not the slide's) is left out by that block: with a halo larger than a
  nucleus this only happens to objects larger than the halo, which are dropped (counted in ``cut`` and
  logged: raise the halo if they are nuclei).

Pixels never predicted (NaN logits: no tissue tile covered them) are background. Each block's nuclei go to
``nuclei/<block>.json`` (atomic), and the block is recorded in ``progress.json`` (stage ``post``), so a killed
run resumes here too.
"""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.measure import find_contours, regionprops

from histoseg.data.io import atomic_write_text
from histoseg.wsi.stream import Progress, blocks

NUCLEUS_NAMESPACE = uuid.UUID("5b0f3a52-8e0f-4c5e-9a57-3f1d1f0c6a11")


@dataclass
class ClassStyle:
    """QuPath classification of the predicted classes: ``names[k]`` and ``colors[k]`` (RGB) for class ``k``."""

    names: list[str]
    colors: list[list[int]]


def pyramid_levels(core: int, min_chunk: int = 64) -> int:
    """Levels of ``labels.zarr``: ``2**j`` downsampling while a core block still spans ``min_chunk`` pixels."""
    return max(1, int(math.log2(max(core // min_chunk, 1))) + 1)


def open_labels(path: Path, shape: tuple[int, int], core: int, fresh: bool):
    import zarr

    grp = zarr.open_group(str(path), mode="w" if fresh or not (path / "zarr.json").is_file() else "r+")
    for j in range(pyramid_levels(core)):
        d = 2**j
        if str(j) not in grp:
            c = min(1024, core // d)
            grp.create_array(str(j), shape=(math.ceil(shape[0] / d), math.ceil(shape[1] / d)), chunks=(c, c),
                             dtype="uint8", fill_value=0)
    return grp


def _write_labels(grp, core_labels: np.ndarray, y0: int, x0: int) -> None:
    h, w = core_labels.shape
    for j in range(len(list(grp.array_keys()))):
        d = 2**j
        arr = grp[str(j)]
        ys = np.minimum(np.arange(math.ceil(h / d)) * d + d // 2, h - 1)
        xs = np.minimum(np.arange(math.ceil(w / d)) * d + d // 2, w - 1)
        sub = core_labels if d == 1 else core_labels[np.ix_(ys, xs)]
        arr[y0 // d : y0 // d + sub.shape[0], x0 // d : x0 // d + sub.shape[1]] = sub


def _polygon(region, wy0: int, wx0: int, scale: float, simplify: float):
    """Outline of one instance as a shapely Polygon in level-0 pixel coordinates (pixel edges: a model pixel
    ``(r, c)`` covers ``[c*scale, (c+1)*scale)``), or None if degenerate."""
    import shapely
    from shapely.geometry import Polygon

    minr, minc, _, _ = region.bbox
    contours = find_contours(np.pad(region.image, 1).astype(np.float32), 0.5)
    if not contours:
        return None
    c = max(contours, key=len)
    rows = c[:, 0] + minr - 1 + wy0
    cols = c[:, 1] + minc - 1 + wx0
    poly = Polygon(np.stack([(cols + 0.5) * scale, (rows + 0.5) * scale], 1))
    if not poly.is_valid:
        poly = shapely.make_valid(poly)
        parts = [g for g in getattr(poly, "geoms", [poly]) if g.geom_type == "Polygon"]
        if not parts:
            return None
        poly = max(parts, key=lambda g: g.area)
    if simplify > 0:
        poly = poly.simplify(simplify, preserve_topology=True)
    if poly.is_empty or poly.area <= 0:
        return None
    return poly


def nucleus_feature(poly, name: str, color: list[int], measurements: dict, fid: str) -> dict:
    """A QuPath detection: ``objectType`` detection, ``classification`` {name, color}, ``measurements``."""
    from shapely.geometry import mapping

    geom = mapping(poly)
    geom = {"type": geom["type"], "coordinates": _round(geom["coordinates"])}
    return {
        "type": "Feature",
        "id": fid,
        "geometry": geom,
        "properties": {
            "objectType": "detection",
            "classification": {"name": name, "color": list(color)},
            "isLocked": False,
            "measurements": measurements,
        },
    }


def _round(coords, nd: int = 2):
    if isinstance(coords, (list, tuple)) and coords and isinstance(coords[0], (int, float)):
        return [round(float(v), nd) for v in coords]
    return [_round(c, nd) for c in coords]


def postprocess_blocks(
    task,
    logits,
    labels_grp,
    nuclei_dir: Path,
    progress: Progress,
    scale: float,
    model_mpp: float,
    style: ClassStyle,
    slide_key: str,
    core: int = 2048,
    halo: int = 128,
    simplify: float = 0.5,
    show_progress: bool = True,
) -> dict:
    """Post-process every core block not yet in ``progress`` (stage ``post``); returns ``{"cut": n}``."""
    from tqdm.auto import tqdm

    from histoseg.utils.logging import get_logger

    log = get_logger(__name__)
    K, H, W = logits.shape
    nuclei_dir.mkdir(parents=True, exist_ok=True)
    todo = [(i, b) for i, b in enumerate(blocks((H, W), (core, core))) if i not in progress.done("post")]
    px_um2 = model_mpp**2
    cut_total = 0
    for i, (cy0, cy1, cx0, cx1) in tqdm(todo, desc="post-processing", unit="block", disable=not show_progress,
                                        leave=False):
        wy0, wy1, wx0, wx1 = max(cy0 - halo, 0), min(cy1 + halo, H), max(cx0 - halo, 0), min(cx1 + halo, W)
        raw = np.asarray(logits[:, wy0:wy1, wx0:wx1], dtype=np.float32)
        empty = np.isnan(raw[0])
        feats, class_px, cut = [], [0] * max(task.num_classes, 2), 0
        if empty.all():
            core_labels = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
        else:
            raw = np.nan_to_num(raw, nan=0.0)
            maps = task.maps_from_raw(torch.from_numpy(raw)[None])
            res = task.postprocess(maps if task.heads else maps["probs"])
            labels = np.asarray(res["labels"]).astype(np.uint8)
            labels[empty] = 0
            inst = res["instances"]
            core_labels = labels[cy0 - wy0 : cy1 - wy0, cx0 - wx0 : cx1 - wx0]
            class_px = np.bincount(core_labels.ravel(), minlength=len(class_px)).tolist()
            if inst is not None:
                inst = np.where(empty, 0, inst).astype(np.int32)
                for r in regionprops(inst):
                    gy, gx = r.centroid[0] + wy0, r.centroid[1] + wx0
                    if not (cy0 <= gy < cy1 and cx0 <= gx < cx1):
                        continue
                    minr, minc, maxr, maxc = r.bbox
                    if (minr == 0 and wy0 > 0) or (minc == 0 and wx0 > 0) or (maxr == wy1 - wy0 and wy1 < H) or \
                            (maxc == wx1 - wx0 and wx1 < W):
                        cut += 1
                        continue
                    poly = _polygon(r, wy0, wx0, scale, simplify)
                    if poly is None:
                        continue
                    if task.num_classes > 2:
                        sl = labels[minr:maxr, minc:maxc][r.image]
                        k = int(np.bincount(sl, minlength=task.num_classes)[1:].argmax()) + 1
                    else:
                        k = 1
                    meas = {
                        "Area µm^2": round(float(r.area) * px_um2, 3),
                        "Perimeter µm": round(float(r.perimeter) * model_mpp, 3),
                        "Eccentricity": round(float(r.eccentricity), 4),
                        "Solidity": round(float(r.solidity), 4),
                    }
                    fid = str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{gy:.3f}/{gx:.3f}"))
                    feats.append(nucleus_feature(poly, style.names[k], style.colors[k], meas, fid))
        _write_labels(labels_grp, core_labels, cy0, cx0)
        atomic_write_text(nuclei_dir / f"{i:06d}.json", json.dumps({"class_pixels": class_px, "cut": cut,
                                                                    "features": feats}))
        cut_total += cut
        progress.mark("post", i)
    if cut_total:
        log.warning("%d objects reached beyond a post-processing window (larger than wsi.post.halo=%d px) and were "
                    "dropped; raise wsi.post.halo if these are nuclei", cut_total, halo)
    return {"cut": cut_total}


def block_files(nuclei_dir: Path, n_blocks: int) -> list[Path]:
    return [nuclei_dir / f"{i:06d}.json" for i in range(n_blocks)]
