"""Detection metrics against centre-point annotations (histoseg.metrics.points): known answers on hand-made
points and instance maps, the optimal (not greedy) matching, and BreCaHAD's own discs scored against its points."""
from __future__ import annotations

import numpy as np
import pytest

from histoseg.metrics.points import instance_centroids, match_points, point_scores


def disc_map(shape, centres, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int32)
    for k, (x, y) in enumerate(centres, 1):
        inst[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = k
    return inst


def test_known_counts_precision_recall_f1_and_distance():
    true = [(10, 10), (50, 50), (90, 10)]
    pred = [(13, 14), (50, 50), (200, 200), (201, 200)]  # 5 px off, exact, two far away
    m = match_points(true, pred, radius=6)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert m["dist"] == pytest.approx(2.5)  # (5 + 0) / 2
    # the radius is inclusive and strict beyond it
    assert match_points([(0, 0)], [(6, 0)], radius=6)["tp"] == 1
    assert match_points([(0, 0)], [(6.01, 0)], radius=6)["tp"] == 0


def test_matching_is_optimal_where_greedy_nearest_first_loses_a_match():
    # the prediction at 6 is nearest to the point at 10 (4 px), but pairing them leaves the prediction at 15
    # unmatched; the optimal assignment pairs 6 -> 0 (6 px) and 15 -> 10 (5 px)
    m = match_points([(0, 0), (10, 0)], [(6, 0), (15, 0)], radius=6, pairs=True)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0) and m["f1"] == 1.0
    assert sorted(map(tuple, m["pairs"].tolist())) == [(0, 0), (1, 1)]
    # among equally many matches the total distance is minimal
    m = match_points([(0, 0), (4, 0)], [(1, 0), (5, 0)], radius=6)
    assert m["dist"] == pytest.approx(1.0)


def test_empty_sets_and_a_bad_radius():
    assert match_points([], [], 5)["f1"] == 1.0
    m = match_points([(1, 1)], [], 5)
    assert (m["tp"], m["fn"], m["recall"], m["f1"]) == (0, 1, 0.0, 0.0) and "dist" not in m
    m = match_points([], [(1, 1)], 5)
    assert (m["fp"], m["precision"], m["f1"]) == (1, 0.0, 0.0)
    for bad in (0, -3, float("nan")):
        with pytest.raises(ValueError, match="radius"):
            match_points([(0, 0)], [(0, 0)], bad)


def test_centroids_of_an_instance_map_skip_missing_labels():
    inst = disc_map((64, 80), [(20, 30), (60.5, 10)], r=5)
    inst[inst == 2] = 4  # labels 1 and 4: 2 and 3 are absent
    c = instance_centroids(inst)
    np.testing.assert_allclose(c, [[20, 30], [60.5, 10]], atol=1e-9)
    assert instance_centroids(np.zeros((8, 8), np.int32)).shape == (0, 2)
    with pytest.raises(ValueError, match="2-D"):
        instance_centroids(np.zeros((2, 8, 8), np.int32))


def test_two_touching_nuclei_merged_into_one_prediction_count_once():
    points = [(30, 32), (46, 32)]
    gt = disc_map((64, 80), points, r=8)
    assert point_scores(points, gt, radius=8)["det_f1"] == 1.0
    merged = (gt > 0).astype(np.int32)  # one instance whose centroid lies between the two points
    s = point_scores(points, merged, radius=8)
    assert s["det_n_pred"] == 1 and s["det_n_points"] == 2
    assert s["det_precision"] == 1.0 and s["det_recall"] == 0.5
    assert s["det_dist"] == pytest.approx(8.0, abs=0.01)
    # beyond the radius the merged centroid matches nothing
    assert point_scores(points, merged, radius=7)["det_f1"] == 0.0


@pytest.mark.data
def test_brecahad_discs_score_perfectly_against_their_own_points(data_dir):
    """The reader's nucleus points (the binary classes, not lumen) are the disc centres: GT vs GT = 1."""
    from histoseg.data.datasets import WholeImageDataset
    from histoseg.data.readers.brecahad import BreCaHADReader

    reader = BreCaHADReader(data_dir / "brecahad", radius=16)
    samples = [reader.read(c) for c in ("Case_10-03", "Case_13-02")]
    for s in samples:
        pts = s.meta["points"]
        assert len(s.meta["nucleus_points"]) == sum(len(pts[c]) for c in ("mitosis", "apoptosis", "tumor", "non_tumor"))
        sc = point_scores(s.meta["nucleus_points"], s.instances, s.meta["point_radius"])
        assert sc["det_f1"] == 1.0 and sc["det_dist"] < 0.5
    item = WholeImageDataset(samples)[0]
    assert item["points"].shape == (len(samples[0].meta["nucleus_points"]), 2) and item["point_radius"] == 16.0


@pytest.mark.data
def test_haematoxylin_baseline_finds_most_annotated_nuclei_and_reports_the_localisation_ceiling(data_dir, tmp_path):
    """experiments/brecahad_detection/hema_baseline.py on one case: a JSON of per-image rows and means whose
    columns obey their definitions (the oracle places exactly one disc per annotated nucleus)."""
    import json

    from tests.helpers_scripts import load_experiment_script

    hb = load_experiment_script("brecahad_detection/hema_baseline")
    out = tmp_path / "hema.json"
    hb.main(["--data", str(data_dir), "--cases", "Case_13", "--out", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert len(rows) == res["all"]["n_images"] == 3 and set(res["per_case"]) == {"Case_13"}
    for r in rows:
        assert r["det_n_points"] > 50 and r["det_n_pred"] > r["det_n_points"]  # blobs include unannotated nuclei
        assert r["det_recall"] > 0.8 and r["det_dist"] < 8  # blob centroids lie near the clicks (radius 16)
        # a disc per annotated nucleus, moved by at most the radius: better than the detector's discs, below 1
        assert r["disc_dice"] < r["oracle_disc_dice"] < 1.0
    with pytest.raises(SystemExit, match="no images"):
        hb.main(["--data", str(data_dir), "--cases", "Case_99"])
