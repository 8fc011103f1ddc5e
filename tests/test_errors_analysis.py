"""experiments/monuseg_instance_errors/analyse.py: the AJI decomposition on hand-made instance maps."""
import csv
import json

import numpy as np
import pytest

from histoseg.inference.postprocess import PostProcessor
from histoseg.metrics.instance import aji
from tests.helpers_scripts import load_experiment_script

an = load_experiment_script("monuseg_instance_errors/analyse")


def discs(shape=(64, 64), centres=((20, 20), (20, 31), (45, 45)), r=7):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)] = i
    return inst


def test_oracle_split_labels_predicted_pixels_by_the_true_nuclei():
    true = discs()
    # a prediction that merges the two touching discs and spills 2 px over them, plus one spurious blob
    fg = an.grow(true, 2) > 0
    fg[55:60, 5:10] = True
    out = an.oracle_split(true, fg)
    assert ((out > 0) == fg).all()  # exactly the predicted pixels
    assert out.max() == 4  # the three nuclei, split again, and the blob on its own
    for i in (1, 2, 3):  # each true nucleus lies inside one oracle label
        assert len(np.unique(out[true == i])) == 1
    assert aji(true, an.oracle_split(true, true > 0)) == 1.0  # perfect pixels, perfect split


def test_grow_and_shrink_change_sizes_without_merging():
    true = discs()
    g = an.grow(true, 1)
    assert g.max() == 3 and ((g > 0).sum() > (true > 0).sum())
    assert (g[true > 0] == true[true > 0]).all()  # growing never relabels a nucleus' own pixels
    s = an.grow(true, -1)
    assert ((s > 0) <= (true > 0)).all() and (s > 0).sum() < (true > 0).sum()
    assert an.grow(true, 0) is not true and (an.grow(true, 0) == true).all()
    # a one-pixel ring lost on every disc: shrinking then growing back by one restores a disc of radius 7 exactly
    # where it does not touch another nucleus
    assert (an.grow(an.grow(true, -1), 1)[true == 3] == 3).all()


def test_area_ratio_of_matched_pairs():
    true = discs()
    assert an.area_ratio(true, true) == [1.0, 1.0, 1.0]
    ratios = an.area_ratio(true, an.grow(true, -1))
    assert len(ratios) == 3 and all(0.6 < r < 1 for r in ratios)
    assert an.area_ratio(true, np.zeros_like(true)) == []


def write_run(folder, images, pp):
    (folder / "maps").mkdir(parents=True)
    rows = []
    for case, (true, pred, interior, dist) in images.items():
        np.savez_compressed(folder / "maps" / f"{case}.npz", fg=(pred > 0).astype(np.float16),
                            interior=interior.astype(np.float16), dist=dist.astype(np.float16),
                            pred_instances=pred, true_instances=true, true_mask=(true > 0).astype(np.uint8))
        rows.append({"case_id": case, "aji": aji(true, pred)})
    with open(folder / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "aji"])
        w.writeheader()
        w.writerows(rows)
    (folder / "summary.json").write_text(json.dumps({"checkpoint": "x.ckpt", "postprocess": pp.config()}))


def test_main_end_to_end_on_saved_maps(tmp_path):
    pp = PostProcessor(instances="markers", marker_source="interior_distance", marker_threshold=0.5,
                       min_marker_size=3, min_size=10, threshold=0.5)
    true = discs()
    from scipy import ndimage as ndi

    dist = np.zeros(true.shape, np.float32)
    for i in range(1, true.max() + 1):
        d = ndi.distance_transform_edt(true == i)
        dist = np.where(true == i, d / d.max(), dist)
    interior = (an.grow(true, -1) > 0).astype(np.float32)
    shrunk = an.grow(true, -1)  # the "model" predicts every nucleus one pixel too small
    write_run(tmp_path / "val", {"v0": (true, shrunk, interior, dist)}, pp)
    write_run(tmp_path / "test", {"t0": (true, shrunk, interior, dist), "t1": (true, true, interior, dist)}, pp)
    rep = an.main(["--val", str(tmp_path / "val"), "--test", str(tmp_path / "test"), "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["n_test"] == 2
    t = rep["test"]
    assert t["as_evaluated"]["aji"] == pytest.approx((aji(true, shrunk) + 1) / 2, abs=1e-4)
    # markers from the perfect maps split the touching discs (the watershed line need not follow the drawn one)
    assert t["oracle_pixels"]["n_pred"] == 3 and t["oracle_pixels"]["aji"] > 0.95
    assert rep["grow"]["k_chosen_on_val"] == 1  # validation says: grow by one pixel
    assert rep["matched_area_ratio"]["median"] < 1


def test_main_refuses_maps_that_do_not_reproduce_the_csv(tmp_path):
    pp = PostProcessor(instances="markers")
    true = discs()
    z = np.zeros(true.shape, np.float32)
    write_run(tmp_path / "val", {"v0": (true, true, z, z)}, pp)
    write_run(tmp_path / "test", {"t0": (true, true, z, z)}, pp)
    rows = [{"case_id": "t0", "aji": 0.5}]
    with open(tmp_path / "test" / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "aji"])
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(SystemExit, match="t0: AJI 1.000000 from the saved maps, 0.5 in per_image.csv"):
        an.main(["--val", str(tmp_path / "val"), "--test", str(tmp_path / "test")])


def test_single_fix_oracles_repair_exactly_their_error():
    true = discs()
    pred = an.grow(true, -1)  # outlines one pixel short
    pred[2:8, 50:60] = 9  # a false object off every nucleus
    pred[true == 3] = 0  # nucleus 3 missed
    nf = an.oracle_no_false(true, pred)
    assert nf.max() == 2 and not nf[2:8, 50:60].any()
    am = an.oracle_add_missed(true, pred)
    assert am.max() == 4 and (am[true == 3] > 0).all() and len(np.unique(am[true == 3])) == 1
    ol = an.oracle_outlines(true, pred)
    assert ((ol > 0) & (true > 0)).sum() == ((true == 1) | (true == 2)).sum()  # found nuclei now exact
    assert ol[2:8, 50:60].all() and not ol[true == 3].any()  # the false object stays, the missed stays missed
    fixed = an.oracle_add_missed(true, an.oracle_no_false(true, an.oracle_outlines(true, pred)))
    assert aji(true, fixed) == 1.0


def test_outline_probe_hull_and_opening():
    probe = load_experiment_script("monuseg_instance_errors/outline_probe")
    true = discs()
    notched = true.copy()
    notched[43:48, 45:53] = 0  # a notch cut into nucleus 3
    h = probe.hull(notched)
    assert (h[notched > 0] == notched[notched > 0]).all()  # no nucleus loses a pixel
    assert (h[43:46, 46:52] == 3).all()  # the notch is filled
    assert set(np.unique(h)) == {0, 1, 2, 3}
    spur = true.copy()
    spur[45, 52:60] = 3  # a one-pixel spur sticking out of nucleus 3
    o = probe.open_each(spur, 1)
    assert not o[45, 55:60].any() and o.max() == 3
