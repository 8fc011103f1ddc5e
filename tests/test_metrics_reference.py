"""The instance metrics against a slow reference written from the papers' definitions.

``histoseg.metrics.instance`` computes every overlap from one bincount of joint labels and relabels ids with a
look-up table (or ``np.unique`` for ids it cannot index). Every AJI / PQ number in ``experiments/`` rests on it, so
here it is compared with object-by-object loops over boolean masks, on random maps with the errors a segmenter makes
(shifted, grown, shrunk, merged, missed and false nuclei) and with ids that are neither contiguous nor small.
"""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from histoseg.metrics import aji, aji_plus, instance_scores, panoptic_quality


def _objects(inst):
    ids = [i for i in np.unique(inst) if i != 0]
    return ids, [inst == i for i in ids]


def _iou_table(true, pred):
    _, tm = _objects(true)
    _, pm = _objects(pred)
    inter = np.array([[float((t & p).sum()) for p in pm] for t in tm]).reshape(len(tm), len(pm))
    union = np.array([[float((t | p).sum()) for p in pm] for t in tm]).reshape(len(tm), len(pm))
    return inter, union, [float(t.sum()) for t in tm], [float(p.sum()) for p in pm]


def reference_aji(true, pred):
    """Kumar et al. 2017, Algorithm 1: each true nucleus takes the prediction of highest IoU (first in id order on
    a tie; none when it overlaps nothing); C sums the pairs' intersections, U their unions plus the area of every
    true nucleus without a pair and of every prediction no nucleus took."""
    inter, union, at, ap = _iou_table(true, pred)
    c = u = 0.0
    used = set()
    for i in range(len(at)):
        best, best_iou = None, 0.0
        for j in range(len(ap)):
            iou = inter[i, j] / union[i, j]
            if iou > best_iou:
                best, best_iou = j, iou
        if best is None:
            u += at[i]
        else:
            c += inter[i, best]
            u += union[i, best]
            used.add(best)
    u += sum(a for j, a in enumerate(ap) if j not in used)
    return c / u


def reference_aji_plus(true, pred):
    """AJI+ (Graham et al. 2019): one-to-one pairs of maximum total IoU, pairs of zero overlap dropped."""
    inter, union, at, ap = _iou_table(true, pred)
    rt, rp = linear_sum_assignment(-(inter / union))
    pairs = [(i, j) for i, j in zip(rt, rp) if inter[i, j] > 0]
    c = sum(inter[i, j] for i, j in pairs)
    u = sum(union[i, j] for i, j in pairs)
    u += sum(a for i, a in enumerate(at) if i not in {p[0] for p in pairs})
    u += sum(a for j, a in enumerate(ap) if j not in {p[1] for p in pairs})
    return c / u


def reference_pq(true, pred):
    """Kirillov et al. 2019: a match is a (true, predicted) pair of IoU > 0.5 (unique by construction)."""
    inter, union, at, ap = _iou_table(true, pred)
    ious = [inter[i, j] / union[i, j] for i in range(len(at)) for j in range(len(ap)) if inter[i, j] / union[i, j] > 0.5]
    tp, fp, fn = len(ious), len(ap) - len(ious), len(at) - len(ious)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum(ious) / tp if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def _draw(shape, discs, ids):
    """Ellipses painted in order (later ones cover earlier ones, so neighbours touch and overlap)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int64)
    for (cy, cx, ry, rx), i in zip(discs, ids):
        inst[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i
    return inst


def random_pair(seed, shape=(96, 128)):
    """A true map of ~25 touching nuclei and a prediction of it with the usual errors."""
    rng = np.random.default_rng(seed)
    n = 25
    discs = np.column_stack([rng.uniform(0, shape[0], n), rng.uniform(0, shape[1], n),
                             rng.uniform(3, 7, n), rng.uniform(3, 7, n)])
    true = _draw(shape, discs, rng.choice(np.arange(1, 10 * n), n, replace=False) * 3)
    pred_discs = []
    for cy, cx, ry, rx in discs:
        kind = rng.random()
        if kind < 0.1:
            continue  # missed
        near = [k for k, d in enumerate(pred_discs) if np.hypot(d[0] - cy, d[1] - cx) < 14]
        if kind < 0.2 and near:  # merged with a neighbour's prediction: one ellipse over both centres
            py, px, pry, prx = pred_discs.pop(near[0])
            pred_discs.append(((py + cy) / 2, (px + cx) / 2, max(pry, ry) + abs(py - cy) / 2,
                               max(prx, rx) + abs(px - cx) / 2))
            continue
        # shifted and grown / shrunk
        pred_discs.append((cy + rng.normal(0, 0.8), cx + rng.normal(0, 0.8), ry * rng.uniform(0.8, 1.2),
                           rx * rng.uniform(0.8, 1.2)))
    for _ in range(rng.integers(0, 5)):  # false nuclei
        pred_discs.append((rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 6), rng.uniform(2, 6)))
    pred = _draw(shape, pred_discs, rng.permutation(len(pred_discs)) + 1)
    return true, pred


@pytest.mark.parametrize("seed", range(12))
def test_instance_metrics_match_the_reference_on_random_maps(seed):
    true, pred = random_pair(seed)
    assert len(np.unique(true)) > 10 and len(np.unique(pred)) > 5  # a real test, not two empty maps
    assert aji(true, pred) == pytest.approx(reference_aji(true, pred), abs=1e-12)
    assert aji_plus(true, pred) == pytest.approx(reference_aji_plus(true, pred), abs=1e-12)
    ours, ref = panoptic_quality(true, pred), reference_pq(true, pred)
    assert (ours["tp"], ours["fp"], ours["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
    for k in ("pq", "dq", "sq"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-5), k  # SQ divides by tp + 1e-6, as HoVer-Net
    assert instance_scores(true, pred)["aji"] == pytest.approx(reference_aji(true, pred), abs=1e-12)


def test_the_random_maps_hold_the_errors_the_metrics_must_tell_apart():
    """The generator is neither too kind nor too harsh: scores in the range of real segmenters (MoNuSeg AJI
    0.6, SQ 0.75), merges that AJI and AJI+ pair differently, misses and false objects (PQ below SQ), and
    partial overlaps (SQ below 1)."""
    scores = [(aji(t, p), aji_plus(t, p), panoptic_quality(t, p)) for t, p in map(random_pair, range(12))]
    assert 0.45 < np.mean([a for a, _, _ in scores]) < 0.75
    assert any(ap > a + 1e-3 for a, ap, _ in scores)
    assert all(q["pq"] < q["sq"] < 1 for _, _, q in scores)
    assert any(q["fn"] > 0 for _, _, q in scores) and any(q["fp"] > 0 for _, _, q in scores)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_ids_of_any_size_and_type_give_the_same_scores(dtype):
    """Large ids take ``remap_label``'s np.unique path, small ones its look-up table; both score alike."""
    true, pred = random_pair(3)
    top = np.iinfo(dtype).max - 1
    relabel = np.where(pred > 0, top - 97 * (int(pred.max()) - pred.astype(np.int64)), 0).astype(dtype)
    assert relabel.max() > 4 * relabel.size + 1024  # beyond the look-up table
    a, b = instance_scores(true, pred), instance_scores(true.astype(dtype), relabel)
    assert a == pytest.approx(b, abs=1e-12)
