"""Cellularity colour codec (round trip, JPEG tolerance) and the BreCaHAD -> cellularity builder on tiny inputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from histoseg.data import DataError
from histoseg.data.readers.cellularity import (
    PALETTE,
    CellularityReader,
    build_cellularity_from_brecahad,
    cellularity_of,
    decode_cellularity_mask,
    encode_cellularity_mask,
)


def random_labels(seed: int = 0, shape=(160, 200)) -> np.ndarray:
    """Nuclei-like class map: boundary rings around tumour / non-tumour discs on background."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    for _ in range(40):
        y, x, r = int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1])), int(rng.integers(5, 12))
        ring = np.zeros(shape, np.uint8)
        cv2.circle(ring, (x, y), r + 3, 1, -1)
        lab[(ring > 0) & (lab == 0)] = 3
        cv2.circle(lab, (x, y), r, int(rng.integers(1, 3)), -1)
    return lab


def test_encode_decode_round_trip_is_exact():
    lab = random_labels()
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    rgb = encode_cellularity_mask(lab)
    assert rgb.dtype == np.uint8 and rgb.shape == (*lab.shape, 3)
    assert tuple(rgb[lab == 1][0]) == (255, 0, 0) and tuple(rgb[lab == 2][0]) == (0, 255, 0)
    assert tuple(rgb[lab == 3][0]) == (0, 0, 255) and tuple(rgb[lab == 0][0]) == (0, 0, 0)
    np.testing.assert_array_equal(decode_cellularity_mask(rgb), lab)


@pytest.mark.parametrize("quality", [50, 75, 95])
def test_decode_tolerates_jpeg_noise(quality):
    lab = random_labels(1)
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(encode_cellularity_mask(lab), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    noisy = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert (np.abs(noisy.astype(int) - encode_cellularity_mask(lab)).max()) > 100  # really noisy at edges
    got = decode_cellularity_mask(noisy)
    # chroma subsampling moves class edges by a pixel; class interiors must decode exactly
    interior = cv2.erode((lab[..., None] == np.arange(4)).astype(np.uint8), np.ones((5, 5), np.uint8)).any(-1)
    assert (got[interior] == lab[interior]).all()
    assert (got == lab).mean() > 0.95


def test_decode_rejects_wide_off_palette_regions_but_not_specks():
    rgb = encode_cellularity_mask(random_labels(2))
    speck = rgb.copy()
    speck[10:12, 10:12] = (255, 255, 255)  # 2x2 white speck: noise-like, snapped to the nearest colour
    decode_cellularity_mask(speck)
    blob = rgb.copy()
    blob[50:70, 50:70] = (255, 0, 255)  # 20x20 magenta region: an unknown class colour
    with pytest.raises(DataError, match=r"mask.png: .* not in the cellularity palette .*\(255, 0, 255\)"):
        decode_cellularity_mask(blob, source="mask.png")
    with pytest.raises(DataError, match="expected a colour"):
        decode_cellularity_mask(np.zeros((4, 4), np.uint8))


def test_encode_rejects_values_outside_the_classes():
    with pytest.raises(ValueError, match=r"values \[7\] outside 0..3"):
        encode_cellularity_mask(np.full((3, 3), 7, np.uint8))


def test_cellularity_is_tumour_over_all_nucleus_area():
    lab = np.zeros((10, 10), np.uint8)
    lab[:3] = 1  # 30 tumour
    lab[3:4] = 2  # 10 non-tumour
    lab[9] = 3  # boundary does not count
    assert cellularity_of(lab) == pytest.approx(30 / 40)
    assert np.isnan(cellularity_of(np.zeros((4, 4), np.uint8)))


# ---------------------------------------------------------------------------------------------- builder
def tiny_brecahad(root: Path) -> dict[str, dict]:
    """Three cases, one image each, with known points (normalised)."""
    pts = {
        "Case_1-01": {"tumor": [(0.25, 0.25)], "mitosis": [(0.75, 0.25)], "non_tumor": [(0.25, 0.75)],
                      "apoptosis": [(0.75, 0.75)], "lumen": [(0.5, 0.5)], "non_lumen": []},
        "Case_2-01": {"tumor": [(0.3, 0.3), (0.6, 0.6)], "mitosis": [], "non_tumor": [], "apoptosis": [],
                      "lumen": [], "non_lumen": []},
        "Case_3-01": {"tumor": [], "mitosis": [], "non_tumor": [(0.5, 0.5)], "apoptosis": [], "lumen": [],
                      "non_lumen": []},
    }
    (root / "images").mkdir(parents=True)
    (root / "groundTruth").mkdir()
    for i, (cid, p) in enumerate(pts.items()):
        img = np.random.default_rng(i).integers(0, 255, (80, 120, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{cid}.png"), img)
        js = {k: [{"x": x, "y": y} for x, y in v] for k, v in p.items()}
        (root / "groundTruth" / f"{cid}.json").write_text(json.dumps(js))
    return pts


def test_builder_writes_the_seed_layout_with_true_cellularity(tmp_path):
    pts = tiny_brecahad(tmp_path / "brecahad")
    out = build_cellularity_from_brecahad(tmp_path / "brecahad", tmp_path / "cell", radius=6, ring_width=2,
                                          test_fraction=0.34, seed=0, progress=False)
    rows = {r["id"]: r for r in csv.DictReader(open(out / "cellularity.csv"))}
    assert set(rows) == set(pts)
    assert sum(r["split"] == "test" for r in rows.values()) == 1
    reader = CellularityReader(out)
    for cid, r in rows.items():
        split = r["split"]
        assert (out / split / "input" / f"{cid}.png").is_file() and (out / split / "gt" / f"{cid}_gt.png").is_file()
        s = reader.read(cid)
        h, w = s.mask.shape
        at = {k: [s.mask[int(round(y * h)), int(round(x * w))] for x, y in v] for k, v in pts[cid].items()}
        assert all(v == 1 for v in at["tumor"] + at["mitosis"])
        assert all(v == 2 for v in at["non_tumor"] + at["apoptosis"])  # apoptosis -> non-tumour by default
        assert all(v == 0 for v in at["lumen"])  # tubule points are not nuclei
        assert int(r["n_tumour"]) == len(pts[cid]["tumor"]) + len(pts[cid]["mitosis"])
        assert int(r["n_non_tumour"]) == len(pts[cid]["non_tumor"]) + len(pts[cid]["apoptosis"])
        assert int(r["tumour_px"]) == int((s.mask == 1).sum()) and int(r["boundary_px"]) == int((s.mask == 3).sum())
        # every point sits on an integer pixel here, and 113 pixel centres lie within 6 px of a pixel centre
        assert int(r["tumour_px"]) == 113 * int(r["n_tumour"])
        if r["cellularity"]:
            assert float(r["cellularity"]) == pytest.approx(cellularity_of(s.mask), abs=1e-6)
        else:
            assert np.isnan(cellularity_of(s.mask))
    assert rows["Case_2-01"]["cellularity"] == "1.000000" and rows["Case_3-01"]["cellularity"] == "0.000000"
    assert float(rows["Case_1-01"]["cellularity"]) == pytest.approx(0.5)
    assert reader.group_of("Case_1-01") == "Case_1"


def test_builder_reuses_fresh_output_and_rebuilds_stale(tmp_path):
    tiny_brecahad(tmp_path / "brecahad")
    kw = dict(radius=6, ring_width=2, test_fraction=0.34, progress=False)
    out = build_cellularity_from_brecahad(tmp_path / "brecahad", tmp_path / "cell", **kw)
    stamp = (out / "build.json").stat().st_mtime_ns
    build_cellularity_from_brecahad(tmp_path / "brecahad", tmp_path / "cell", **kw)
    assert (out / "build.json").stat().st_mtime_ns == stamp  # reused
    build_cellularity_from_brecahad(tmp_path / "brecahad", tmp_path / "cell", **{**kw, "ring_width": 0})
    assert json.loads((out / "build.json").read_text())["params"]["ring_width"] == 0
    assert not any((CellularityReader(out).read(c).mask == 3).any() for c in CellularityReader(out).case_ids())
    # the source changes -> rebuilt; nothing but the finished folder is left beside it
    js = tmp_path / "brecahad" / "groundTruth" / "Case_2-01.json"
    js.write_text(json.dumps({"tumor": [], "non_tumor": [{"x": 0.5, "y": 0.5}]}))
    build_cellularity_from_brecahad(tmp_path / "brecahad", tmp_path / "cell", **{**kw, "ring_width": 0})
    rows = {r["id"]: r for r in csv.DictReader(open(out / "cellularity.csv"))}
    assert rows["Case_2-01"]["n_tumour"] == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brecahad", "cell"]


def _build_in_child(src, out, kw):
    build_cellularity_from_brecahad(src, out, **kw)


def test_builder_waits_for_a_concurrent_build_and_reuses_it(tmp_path):
    """Two runs deriving the set at once (experiments/batch.py --parallel 2): the second must wait for the first
    instead of checking a half-published folder, then reuse it. Here the test holds the lock, and the folder lacks
    its build.json while it does (as mid-swap): a builder that did not wait would reject the folder and fail."""
    import multiprocessing as mp
    import time

    from histoseg.data.io import exclusive_lock

    tiny_brecahad(tmp_path / "brecahad")
    kw = dict(radius=6, ring_width=2, test_fraction=0.34, progress=False)
    out = build_cellularity_from_brecahad(tmp_path / "brecahad", tmp_path / "cell", **kw)
    meta = (out / "build.json").read_bytes()
    with exclusive_lock(tmp_path):
        (out / "build.json").unlink()
        child = mp.get_context("fork").Process(target=_build_in_child, args=(tmp_path / "brecahad", out, kw))
        child.start()
        time.sleep(1.0)
        assert child.is_alive()  # waiting on the lock, not failing on the incomplete folder
        (out / "build.json").write_bytes(meta)
    child.join(60)
    assert child.exitcode == 0
    assert (out / "build.json").read_bytes() == meta  # reused, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brecahad", "cell"]  # no lock file left


def test_builder_never_touches_a_folder_it_did_not_build(tmp_path):
    tiny_brecahad(tmp_path / "brecahad")
    mine = tmp_path / "my_set"
    (mine / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="exists but was not built by histoseg"):
        build_cellularity_from_brecahad(tmp_path / "brecahad", mine, progress=False)
    assert (mine / "train").is_dir()


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import histoseg.data.readers.cellularity as cell

    tiny_brecahad(tmp_path / "brecahad")
    calls = {"n": 0}
    real = cell.write_image

    def failing(path, arr):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(path, arr)

    monkeypatch.setattr(cell, "write_image", failing)
    with pytest.raises(KeyboardInterrupt):
        build_cellularity_from_brecahad(tmp_path / "brecahad", tmp_path / "cell", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brecahad"]


def test_palette_order_is_background_tumour_non_tumour_boundary():
    assert PALETTE.tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
    assert CellularityReader.class_names == ("background", "tumour", "non_tumour", "boundary")


def ring_around_nucleus(hole: bool = True) -> np.ndarray:
    """A tumour nucleus (class 1, radius 11) inside a 3 px boundary ring (class 3), as the cellularity masks
    draw them, with an optional 3x3 background hole in the nucleus."""
    from skimage.draw import disk

    lab = np.zeros((64, 64), np.uint8)
    lab[disk((32, 32), 14)] = 3
    lab[disk((32, 32), 11)] = 1
    if hole:
        lab[30:33, 30:33] = 0
    return lab


def test_hole_filling_never_overwrites_another_class():
    """The hole in the nucleus is filled with the nucleus's class; the ring (whose inside is the nucleus) is
    neither filled nor changed, and the nucleus is not painted over by the ring's class."""
    from histoseg.inference.postprocess import clean_class_map

    lab = ring_around_nucleus()
    out = clean_class_map(lab, fill_holes=True)
    assert np.array_equal(out, ring_around_nucleus(hole=False))


def test_clean_classes_leaves_the_boundary_ring_as_predicted():
    """An opening of radius 2 erases a 3 px ring when every class is cleaned; ``clean_classes=[1, 2]`` cleans
    only the nuclei and keeps the ring pixel for pixel."""
    from histoseg.inference.postprocess import PostProcessor, clean_class_map

    lab = ring_around_nucleus()
    lab[2:4, 2:4] = 1  # a 4-pixel tumour speck the opening removes
    every = clean_class_map(lab, opening_radius=2, fill_holes=True)
    assert not (every == 3).any()
    nuclei_only = clean_class_map(lab, opening_radius=2, fill_holes=True, classes=[1, 2])
    assert np.array_equal(nuclei_only == 3, lab == 3)
    assert not nuclei_only[2:4, 2:4].any() and nuclei_only[32, 32] == 1
    pp = PostProcessor(opening_radius=2, fill_holes=True, instances="none", clean_classes=[2, 1])
    assert pp.config()["clean_classes"] == [1, 2] and pp.with_params(min_size=5).clean_classes == [1, 2]
    assert np.array_equal(pp(np.eye(4, dtype=np.float32)[lab].transpose(2, 0, 1))["labels"], nuclei_only)


def test_class_map_cleaning_equals_binary_cleaning_on_binary_maps():
    from histoseg.inference.postprocess import clean_binary, clean_class_map

    rng = np.random.default_rng(0)
    for _ in range(5):
        b = rng.random((60, 60)) > 0.45
        for r, f, m in [(0, True, 0), (1, True, 5), (2, False, 30), (1, True, 30)]:
            assert np.array_equal(clean_class_map(b.astype(np.uint8), r, f, m) == 1, clean_binary(b, r, f, m))


def test_tuning_grid_may_hold_lists_of_classes():
    """``clean_classes`` takes list values in a tuning grid; on a ring map the Dice objective prefers cleaning
    the nuclei only (the opening would erase the ring)."""
    from types import SimpleNamespace

    from histoseg.inference.postprocess import PostProcessor
    from histoseg.inference.tuning import tune_postprocess

    lab = ring_around_nucleus(hole=False)
    probs = np.eye(4, dtype=np.float32)[lab].transpose(2, 0, 1)
    pp = PostProcessor(instances="watershed", nuclei_classes=[1, 2])
    task = SimpleNamespace(postprocess=pp, heads=None, predict_maps=lambda image: {"probs": probs}, num_classes=4)
    sample = SimpleNamespace(image=None, instances=None, mask=lab)
    best, table = tune_postprocess(task, [sample], "dice",
                                   {"opening_radius": [2], "clean_classes": [[1, 2, 3], [1, 2]]}, workers=1)
    assert best["clean_classes"] == [1, 2] and len(table) == 2
    scores = {tuple(r["clean_classes"]): r["dice"] for r in table}
    assert scores[(1, 2)] == pytest.approx(1.0) and scores[(1, 2, 3)] < 0.7


def test_score_maps_rescores_saved_test_maps_per_setting(tmp_path):
    """experiments/cellularity_postprocess/score_maps.py on a saved map whose probabilities are the ground truth:
    cleaning the ring class too erases it (boundary Dice 0), cleaning the nuclei only keeps Dice 1, and the
    tuned setting is read from the run's postprocess_tuning.json."""
    from tests.helpers_scripts import load_experiment_script

    sm = load_experiment_script("cellularity_postprocess/score_maps")
    lab = ring_around_nucleus(hole=False)
    run = tmp_path / "run"
    (run / "maps").mkdir(parents=True)
    probs = np.eye(4, dtype=np.float16)[lab].transpose(2, 0, 1)
    np.savez_compressed(run / "maps" / "img.npz", probs=probs, true_mask=lab)
    (run / "postprocess_tuning.json").write_text(json.dumps({"best": {"opening_radius": 3, "clean_classes": [1, 2]}}))
    out = sm.main(["--runs", str(run), "--out", str(tmp_path / "s.json")])["runs"]["run"]
    assert out["all_classes"]["dice_3"] == 0 and out["nuclei_only"]["dice"] == 1 and out["none"]["dice"] == 1
    assert out["tuned"]["params"]["opening_radius"] == 3 and out["tuned"]["dice_3"] == 1
    assert out["none"]["cellularity_mae"] == 0
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert "| run | nuclei_only | 1.000 |" in (tmp_path / "s.md").read_text()
    assert out["nuclei_rings"]["dice_1"] == 1 and out["nuclei_rings"]["dice_3"] > 0.95
    assert len(rows) == 5 and {r["setting"] for r in rows} == {"all_classes", "nuclei_only", "none", "nuclei_rings",
                                                               "tuned"}


def test_cellularity_presets_clean_the_nucleus_classes_only(make_cfg):
    cfg = make_cfg("experiment=cellularity_strong")
    assert list(cfg.postprocess.clean_classes) == [1, 2] and cfg.tune_postprocess.objective == "dice"
    assert [1, 2] in [list(c) for c in cfg.tune_postprocess.grid.clean_classes]


def test_rings_are_redrawn_around_the_predicted_nuclei_as_the_masks_draw_them():
    """``ring_class=3``: predicted ring pixels are dropped and a 3 px ring is drawn around the nuclei, nearly pixel
    for pixel the builder's ring (its disc of radius + 3 less the nucleus disc); a ring never covers a nucleus."""
    from histoseg.data.readers.cellularity import cellularity_labels
    from histoseg.inference.postprocess import PostProcessor, draw_rings

    shape = (80, 96)
    # two tumour nuclei and a non-tumour one 20 px away (their rings overlap each other and the next nucleus)
    pts = {"tumor": np.array([[30.0, 30.0], [62.4, 41.7]]), "non_tumor": np.array([[30.0, 50.0]]),
           "mitosis": np.zeros((0, 2)), "apoptosis": np.zeros((0, 2))}
    truth = cellularity_labels(shape, pts, 10, 3, "non_tumour", "exact")
    assert set(np.unique(truth)) == {0, 1, 2, 3}
    pred = np.where(truth == 3, 0, truth).astype(np.uint8)
    pred[2:6, 2:6] = 3  # a spurious ring blob far from every nucleus
    out = draw_rings(pred, 3, 3, [1, 2])
    assert np.array_equal(np.where(out == 3, 0, out), np.where(truth == 3, 0, truth))  # nuclei untouched
    assert not out[2:6, 2:6].any()
    # the rasters differ only where a pixel centre is within 3.5 px of a nucleus pixel but not 13 px of its centre
    ring, true_ring = out == 3, truth == 3
    assert 2 * (ring & true_ring).sum() / (ring.sum() + true_ring.sum()) > 0.95
    pp = PostProcessor(instances="none", ring_class=3, ring_width=3, nuclei_classes=[1, 2])
    assert np.array_equal(pp(np.eye(4, dtype=np.float32)[pred].transpose(2, 0, 1))["labels"], out)
    assert pp.with_params(min_size=1).config()["ring_class"] == 3
    with pytest.raises(ValueError, match="ring_width"):
        PostProcessor(ring_class=3, ring_width=0)


def test_cellularity_errors_confusion_on_hand_made_masks(tmp_path):
    """experiments/cellularity/cellularity_errors.py: class areas and where each true class's pixels went."""
    from histoseg.data.io import write_image
    from tests.helpers_scripts import load_experiment_script

    errors = load_experiment_script("cellularity/cellularity_errors")
    root, run = tmp_path / "set", tmp_path / "run"
    truth = np.zeros((20, 40), np.uint8)
    truth[:, :10] = 1    # 200 tumour px
    truth[:, 10:15] = 2  # 100 non-tumour px
    pred = np.zeros_like(truth)
    pred[:, :5] = 1      # half the tumour found as tumour, the rest background
    pred[:, 10:12] = 1   # 40 % of the non-tumour called tumour
    pred[:, 12:13] = 2   # 20 % called non-tumour, 40 % background
    pred[:, 30:] = 2     # non-tumour predicted where nothing is annotated
    write_image(root / "test" / "gt" / "img_gt.png", encode_cellularity_mask(truth))
    write_image(run / "predict" / "masks" / "img.png", encode_cellularity_mask(pred))
    (root / "cellularity.csv").write_text("id,cellularity,n_tumour,n_non_tumour\nimg,0.666667,2,1\n")
    (run / "predict" / "report.csv").write_text("image,status,cellularity_pct,mask\nimg,ok,41.38,masks/img.png\n")
    res = errors.analyse_run(run, root, "test")
    row = res["per_image"][0]
    assert (row["true_tumour_px"], row["true_non_tumour_px"]) == (200, 100)
    assert (row["pred_tumour_px"], row["pred_non_tumour_px"]) == (140, 220)
    assert row["true_tumour_as"] == {"background": 0.5, "tumour": 0.5, "non_tumour": 0.0, "boundary": 0.0}
    assert row["true_non_tumour_as"] == {"background": 0.4, "tumour": 0.4, "non_tumour": 0.2, "boundary": 0.0}
    assert row["true_pct"] == pytest.approx(66.67) and row["pred_pct"] == pytest.approx(41.38)
    # a mask of another size is an error naming both files
    write_image(run / "predict" / "masks" / "img.png", encode_cellularity_mask(pred[:, :30]))
    with pytest.raises(DataError, match="img_gt.png"):
        errors.analyse_run(run, root, "test")


def test_cellularity_scripts_share_one_pearson_that_is_null_when_undefined():
    """cellularity_pct.py and cellularity_errors.py report Pearson r through one helper: a constant side or under
    three values gives None (JSON null), never NaN, which json.dumps would write as invalid JSON."""
    from tests.helpers_scripts import load_experiment_script

    pct = load_experiment_script("cellularity/cellularity_pct")
    errors = load_experiment_script("cellularity/cellularity_errors")
    # one definition (the two loaders give two module objects, so compare where the function was defined)
    assert errors.pearson.__code__.co_filename == pct.pearson.__code__.co_filename
    assert pct.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == 1.0
    assert pct.pearson([1, 2, 3, 4], [8, 6, 4, 2]) == -1.0
    assert pct.pearson([1, 2, 3, 4], [85.0, 85.0, 85.0, 85.0]) is None  # a model predicting one value everywhere
    assert pct.pearson([5, 5, 5], [1, 2, 3]) is None
    assert pct.pearson([1, 2], [1, 2]) is None
