"""Instance metrics on labelled maps (0 = background): AJI (Kumar et al. 2017), AJI+, PQ/DQ/SQ (Kirillov
et al. 2019) and object F1, following the HoVer-Net protocol (``metrics/stats_utils.py``).

Ids need not be contiguous: maps are relabelled first. All pairwise overlaps come from one ``bincount``
of joint labels, so cost is linear in pixels plus (#true x #pred) for the IoU matrix.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def remap_label(inst: np.ndarray) -> np.ndarray:
    """Relabel to contiguous ids 1..N in increasing order of the old ids (0 stays background; a map without
    background pixels starts at 1)."""
    inst = np.asarray(inst)
    if inst.size and inst.dtype.kind in "ui" and inst.min() >= 0 and inst.max() <= 4 * inst.size + 1024:
        # a look-up table from one bincount: linear in pixels, where np.unique sorts them (the tuning grid
        # relabels thousands of maps)
        present = np.bincount(inst.ravel()) > 0
        lut = np.cumsum(present, dtype=np.int64)
        if present[0]:
            lut -= 1
        return lut.astype(np.int32)[inst]
    ids, inv = np.unique(inst, return_inverse=True)
    inv = inv.reshape(inst.shape)
    if ids.size and ids[0] != 0:
        inv = inv + 1
    return inv.astype(np.int32)


def pairwise_overlap(true: np.ndarray, pred: np.ndarray):
    """Return (inter[n_t, n_p], area_t[n_t], area_p[n_p]) for contiguous maps (background excluded).
    ``aji``, ``aji_plus`` and ``panoptic_quality`` accept it as ``overlap=`` to share one computation."""
    t, p = remap_label(true), remap_label(pred)
    nt, np_ = int(t.max()), int(p.max())
    joint = np.bincount((t.astype(np.int64) * (np_ + 1) + p).ravel(), minlength=(nt + 1) * (np_ + 1))
    joint = joint.reshape(nt + 1, np_ + 1)
    return joint[1:, 1:].astype(np.float64), joint[1:, :].sum(1).astype(np.float64), joint[:, 1:].sum(0).astype(np.float64)


def _iou(inter, at, ap):
    union = at[:, None] + ap[None, :] - inter
    return inter / np.maximum(union, 1e-12), union


def _aggregated_jaccard(inter, union, at, ap, rt, rp) -> float:
    """Sum of the paired objects' intersections over the sum of their unions plus the area of every object left
    unpaired (true or predicted): the AJI / AJI+ ratio for the pairs ``(rt[k], rp[k])``."""
    u = union[rt, rp].sum() + at[np.setdiff1d(np.arange(len(at)), rt)].sum()
    u += ap[np.setdiff1d(np.arange(len(ap)), rp)].sum()
    return float(inter[rt, rp].sum() / u)


def aji(true: np.ndarray, pred: np.ndarray, overlap=None) -> float:
    """Aggregated Jaccard Index (Kumar 2017; HoVer-Net ``get_fast_aji``): each true nucleus is paired with its
    max-IoU prediction (a prediction may serve several); unpaired objects of both maps add to the union."""
    inter, at, ap = overlap if overlap is not None else pairwise_overlap(true, pred)
    if len(at) == 0 or len(ap) == 0:
        return float(len(at) == len(ap))  # both empty: 1, one empty: 0
    iou, union = _iou(inter, at, ap)
    paired_t = np.nonzero(iou.max(1) > 0)[0]
    return _aggregated_jaccard(inter, union, at, ap, paired_t, iou.argmax(1)[paired_t])


def aji_plus(true: np.ndarray, pred: np.ndarray, overlap=None) -> float:
    """AJI+ (HoVer-Net): one-to-one pairing by maximum total IoU (Hungarian), so no prediction is over-counted."""
    inter, at, ap = overlap if overlap is not None else pairwise_overlap(true, pred)
    if len(at) == 0 or len(ap) == 0:
        return float(len(at) == len(ap))
    iou, union = _iou(inter, at, ap)
    rt, rp = linear_sum_assignment(-iou)
    keep = iou[rt, rp] > 0
    return _aggregated_jaccard(inter, union, at, ap, rt[keep], rp[keep])


def panoptic_quality(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5, overlap=None) -> dict[str, float]:
    """PQ = DQ x SQ with matches at IoU > ``match_iou`` (unique when >= 0.5). Also tp / fp / fn and object F1."""
    inter, at, ap = overlap if overlap is not None else pairwise_overlap(true, pred)
    nt, npred = len(at), len(ap)
    if nt == 0 and npred == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0, "f1": 1.0}
    if nt and npred:
        iou, _ = _iou(inter, at, ap)
        if match_iou >= 0.5:
            rt, rp = np.nonzero(iou > match_iou)
        else:
            rt, rp = linear_sum_assignment(-iou)
            keep = iou[rt, rp] > match_iou
            rt, rp = rt[keep], rp[keep]
        ious = iou[rt, rp]
    else:
        ious = np.zeros(0)
    tp = len(ious)
    fp, fn = npred - tp, nt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ious.sum() / (tp + 1e-6)) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn, "f1": dq}


def instance_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All instance metrics of one image."""
    ov = pairwise_overlap(true, pred)
    pq = panoptic_quality(true, pred, overlap=ov)
    return {
        "aji": aji(true, pred, overlap=ov),
        "aji_plus": aji_plus(true, pred, overlap=ov),
        "pq": pq["pq"],
        "dq": pq["dq"],
        "sq": pq["sq"],
        "obj_f1": pq["f1"],
        "n_true": int(len(np.unique(true)) - (1 if (np.asarray(true) == 0).any() else 0)),
        "n_pred": int(len(np.unique(pred)) - (1 if (np.asarray(pred) == 0).any() else 0)),
    }
