"""Detection metrics against point annotations (BreCaHAD marks each nucleus by its centre point).

Pixel Dice against discs drawn at the points mixes two errors: finding the annotated nuclei (detection) and
placing a disc where the annotator clicked (localisation). These metrics separate them. Each predicted nucleus is
reduced to its centroid; centroids and points are matched one to one, only within ``radius`` pixels, by an
optimal assignment (Hungarian) that first maximises the number of matches and then minimises their total
distance (greedy nearest-first matching can pair a centroid with the wrong point and lose a match).

    tp = matched pairs, fp = unmatched centroids, fn = unmatched points
    precision = tp / (tp + fp), recall = tp / (tp + fn), F1 = 2 tp / (2 tp + fp + fn)

``det_dist`` is the mean centroid-to-point distance of the matches, in pixels.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment


def instance_centroids(instances: np.ndarray) -> np.ndarray:
    """``(N, 2)`` float centroids ``(x, y)`` (column, row) of the labels 1..max of an instance map, in increasing
    label order (labels with no pixel have no row)."""
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instance map must be 2-D, got shape {inst.shape}")
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if not ids.size:
        return np.zeros((0, 2))
    yx = np.asarray(ndi.center_of_mass(np.ones(inst.shape, np.float64), inst, ids), np.float64).reshape(-1, 2)
    return yx[:, ::-1].copy()


def match_points(true_xy: np.ndarray, pred_xy: np.ndarray, radius: float, pairs: bool = False) -> dict:
    """Match predicted to annotated points within ``radius`` (one to one). Returns ``tp``, ``fp``, ``fn``,
    ``precision``, ``recall``, ``f1`` and ``dist`` (mean matched distance; absent when nothing matched). Both
    empty: precision = recall = F1 = 1. ``pairs=True`` adds ``pairs``: (tp, 2) indices (true, pred) of the matches."""
    t = np.asarray(true_xy, np.float64).reshape(-1, 2)
    p = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    if not np.isfinite(radius) or radius <= 0:
        raise ValueError(f"match radius must be a positive number of pixels, got {radius!r}")
    d = np.zeros((len(t), len(p)))
    rt = rp = np.zeros(0, np.int64)
    if len(t) and len(p):
        d = np.hypot(t[:, None, 0] - p[None, :, 0], t[:, None, 1] - p[None, :, 1])
        # a pair beyond the radius costs more than any set of in-radius pairs: the assignment maximises the
        # number of matches first, then minimises their total distance
        big = (min(len(t), len(p)) + 1) * float(radius) + 1.0
        rt, rp = linear_sum_assignment(np.where(d <= radius, d, big))
        keep = d[rt, rp] <= radius
        rt, rp = rt[keep], rp[keep]
    tp = len(rt)
    fp, fn = len(p) - tp, len(t) - tp
    out = {
        "tp": tp, "fp": fp, "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
    }
    if tp:
        out["dist"] = float(d[rt, rp].mean())
    if pairs:
        out["pairs"] = np.stack([rt, rp], axis=1).astype(np.int64).reshape(-1, 2)
    return out


def point_scores(true_xy: np.ndarray, instances: np.ndarray, radius: float) -> dict[str, float]:
    """Detection scores of one image's predicted instance map against its annotated points, as ``det_*`` columns
    of the per-image report (``det_n_points`` annotated, ``det_n_pred`` predicted nuclei)."""
    pred = instance_centroids(instances)
    m = match_points(true_xy, pred, radius)
    out = {"det_precision": m["precision"], "det_recall": m["recall"], "det_f1": m["f1"],
           "det_n_points": int(m["tp"] + m["fn"]), "det_n_pred": int(len(pred))}
    if "dist" in m:
        out["det_dist"] = m["dist"]
    return out
