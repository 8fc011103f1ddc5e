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


def _outline(crop: np.ndarray) -> np.ndarray | None:
    """Outer outline of a boolean crop in continuous crop coordinates (pixel ``(r, c)`` covers
    ``[c, c+1) x [r, r+1)``), ``(N, 2)`` as ``(x, y)``: OpenCV's contour of the crop upsampled x2, i.e. a
    quarter pixel inside the pixel edges (a one-pixel nucleus keeps an area; the caller grows it back)."""
    import cv2

    big = cv2.resize(np.pad(crop, 1).astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)
    if len(c) < 3:
        return None
    return (c + 0.5) / 2 - 1


def _eccentricity(ys: np.ndarray, xs: np.ndarray) -> float:
    """Eccentricity of the ellipse with the same second central moments (as scikit-image ``regionprops``)."""
    dy, dx = ys - ys.mean(), xs - xs.mean()
    a, b, c = float((dy * dy).mean()), float((dx * dx).mean()), float((dy * dx).mean())
    half, disc = (a + b) / 2, math.sqrt(max(((a - b) / 2) ** 2 + c * c, 0.0))
    l1, l2 = half + disc, half - disc
    return math.sqrt(max(1 - l2 / l1, 0.0)) if l1 > 0 else 0.0


def nuclei_in_core(inst, labels, window, core, shape, scale, model_mpp, style, slide_key, simplify, num_classes):
    """GeoJSON detections (serialised) of the instances of a window whose centroid lies in ``core``, with the
    count of objects cut by the window's edge; measurements per nucleus: area (pixels), perimeter and solidity
    of the outline polygon, eccentricity of the pixels' second moments."""
    import shapely
    from scipy import ndimage as ndi

    wy0, wy1, wx0, wx1 = window
    cy0, cy1, cx0, cx1 = core
    H, W = shape
    cand, cut = [], 0
    for lab, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        crop = inst[sl] == lab
        ys, xs = np.nonzero(crop)
        gy, gx = ys.mean() + sl[0].start + wy0, xs.mean() + sl[1].start + wx0
        if not (cy0 <= gy < cy1 and cx0 <= gx < cx1):
            continue
        if (sl[0].start == 0 and wy0 > 0) or (sl[1].start == 0 and wx0 > 0) or \
                (sl[0].stop == wy1 - wy0 and wy1 < H) or (sl[1].stop == wx1 - wx0 and wx1 < W):
            cut += 1
            continue
        xy = _outline(crop)
        if xy is None:
            continue
        k = 1
        if num_classes > 2:
            k = int(np.bincount(labels[sl][crop], minlength=num_classes)[1:].argmax()) + 1
        xy = xy + (sl[1].start + wx0, sl[0].start + wy0)  # model pixels, continuous
        cand.append((gy, gx, len(ys), _eccentricity(ys, xs), k, shapely.Polygon(xy)))
    if not cand:
        return [], cut
    polys = np.array([c[5] for c in cand], dtype=object)
    # grow the quarter-pixel-inset outline back to the pixel edges (area within ~1 % of the pixel count; the
    # result is always a valid polygon)
    polys = shapely.buffer(polys, 0.25, join_style="mitre", mitre_limit=5.0)
    bad = ~shapely.is_valid(polys) | (shapely.get_type_id(polys) != 3)
    for i in np.nonzero(bad)[0]:
        g = shapely.make_valid(polys[i])
        parts = [p for p in getattr(g, "geoms", [g]) if p.geom_type == "Polygon"]
        polys[i] = max(parts, key=lambda p: p.area) if parts else None
    feats = []
    keep = np.array([p is not None and not p.is_empty for p in polys])
    polys = polys[keep]
    cand = [c for c, k in zip(cand, keep) if k]
    if simplify > 0:  # Douglas-Peucker; where that breaks a polygon, the unsimplified one is kept
        simple = shapely.simplify(polys, simplify / scale, preserve_topology=False)
        ok = shapely.is_valid(simple) & ~shapely.is_empty(simple) & (shapely.get_type_id(simple) == 3)
        polys = np.where(ok, simple, polys)
    perim = shapely.length(polys)
    solidity = shapely.area(polys) / np.maximum(shapely.area(shapely.convex_hull(polys)), 1e-12)
    level0 = shapely.transform(polys, lambda c: c * scale)
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(level0), return_index=True)
    starts = np.searchsorted(index, np.arange(len(level0) + 1))
    holes = shapely.get_num_interior_rings(level0)
    for j, ((gy, gx, area, ecc, k, _), poly, per, sol) in enumerate(zip(cand, level0, perim, solidity)):
        meas = {
            "Area µm^2": round(float(area) * model_mpp**2, 3),
            "Perimeter µm": round(float(per) * model_mpp, 3),
            "Eccentricity": round(ecc, 4),
            "Solidity": round(float(min(sol, 1.0)), 4),
        }
        fid = str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_key}/{gy:.3f}/{gx:.3f}"))
        rings = [coords[starts[j] : starts[j + 1]]] if holes[j] == 0 else None
        feats.append(nucleus_feature(poly, style.names[k], style.colors[k], meas, fid, rings))
    return feats, cut


def nucleus_feature(poly, name: str, color: list[int], measurements: dict, fid: str, rings=None) -> dict:
    """A QuPath detection: ``objectType`` detection, ``classification`` {name, color}, ``measurements``
    (``rings``: the polygon's coordinate arrays when already extracted)."""
    if rings is None:
        rings = [np.asarray(r.coords) for r in (poly.exterior, *poly.interiors)]
    geom = {"type": "Polygon", "coordinates": [np.round(r, 2).tolist() for r in rings]}
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
                feats, cut = nuclei_in_core(inst, labels, (wy0, wy1, wx0, wx1), (cy0, cy1, cx0, cx1), (H, W), scale,
                                            model_mpp, style, slide_key, simplify, task.num_classes)
        _write_labels(labels_grp, core_labels, cy0, cx0)
        write_block_file(nuclei_dir / f"{i:06d}.jsonl", class_px, cut, feats)
        cut_total += cut
        progress.mark("post", i)
    if cut_total:
        log.warning("%d objects reached beyond a post-processing window (larger than wsi.post.halo=%d px) and were "
                    "dropped; raise wsi.post.halo if these are nuclei", cut_total, halo)
    return {"cut": cut_total}


def write_block_file(path: Path, class_pixels: list[int], cut: int, feats: list[dict]) -> None:
    """JSON lines: a header (class pixel counts, cut objects, per-nucleus area / eccentricity / solidity for the
    summary), then one serialised GeoJSON feature per line (copied into the GeoJSON as they are)."""
    m = [f["properties"]["measurements"] for f in feats]
    head = {"class_pixels": class_pixels, "cut": cut, "area_um2": [x["Area µm^2"] for x in m],
            "eccentricity": [x["Eccentricity"] for x in m], "solidity": [x["Solidity"] for x in m]}
    lines = [json.dumps(head)] + [json.dumps(f, ensure_ascii=False) for f in feats]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_block_header(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def block_files(nuclei_dir: Path, n_blocks: int) -> list[Path]:
    return [nuclei_dir / f"{i:06d}.jsonl" for i in range(n_blocks)]
