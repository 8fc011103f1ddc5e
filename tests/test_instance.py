"""Instance-aware targets, multi-head models and marker-controlled watershed."""
import warnings

import hydra
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from histoseg.data.datasets import InMemorySource, PatchDataset
from histoseg.data.sample import Sample
from histoseg.data.targets import IGNORE, InstanceTargets
from histoseg.inference.postprocess import MARKER_MAPS, PostProcessor
from histoseg.metrics.instance import aji
from histoseg.utils.config import conf_dir


def two_touching_discs(h=40, w=60, r=10):
    yy, xx = np.mgrid[:h, :w]
    inst = np.zeros((h, w), np.int32)
    inst[(yy - 20) ** 2 + (xx - 20) ** 2 <= r * r] = 1
    inst[((yy - 20) ** 2 + (xx - 38) ** 2 <= r * r) & (inst == 0)] = 2  # overlaps disc 1's right edge
    return inst


def brute_force_boundary(inst, width):
    """Nucleus pixels within Chebyshev distance width-1 of a pixel that has a 4-neighbour of another label."""
    h, w = inst.shape
    pad = np.pad(inst, 1, mode="edge")
    edge = np.zeros_like(inst, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        edge |= (pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] != inst) & (inst > 0)
    out = np.zeros_like(edge)
    for y, x in zip(*np.nonzero(edge)):
        out[max(y - width + 1, 0) : y + width, max(x - width + 1, 0) : x + width] = True
    return out & (inst > 0)


def test_three_class_targets_of_two_touching_discs():
    inst = two_touching_discs()
    t = InstanceTargets(["three_class"], boundary_width=2)(torch.from_numpy(inst > 0), torch.from_numpy(inst))
    seg = t["seg"].numpy()
    expected = (inst > 0).astype(int)
    expected[brute_force_boundary(inst, 2)] = 2
    assert np.array_equal(seg, expected)
    # the interface between the two discs is boundary: interiors of the two nuclei do not touch
    lab, n = ndi.label(seg == 1)
    assert n == 2
    assert t["inst_valid"].item() is True


def test_distance_targets_peak_at_each_centre_and_vanish_outside():
    inst = two_touching_discs()
    d = InstanceTargets(["distance"])(torch.from_numpy(inst > 0), torch.from_numpy(inst))["dist"][0].numpy()
    assert d.shape == inst.shape and (d[inst == 0] == 0).all()
    for i, (cy, cx) in ((1, (20, 20)), (2, (20, 38))):
        assert d[inst == i].max() == pytest.approx(1.0)
        yy, xx = np.unravel_index(np.argmax(np.where(inst == i, d, -1)), d.shape)
        assert abs(yy - cy) <= 1 and abs(xx - cx) <= 2
        assert d[inst == i].min() > 0  # border pixels are inside the nucleus: positive, small


def test_hv_targets_are_normalised_offsets_to_each_centre():
    inst = two_touching_discs()
    hv = InstanceTargets(["hv"])(torch.from_numpy(inst > 0), torch.from_numpy(inst))["hv"].numpy()
    for i in (1, 2):
        m = inst == i
        cy, cx = ndi.center_of_mass(m)
        yy, xx = np.nonzero(m)
        h, v = hv[0][m], hv[1][m]
        assert h.min() == pytest.approx(-1) and h.max() == pytest.approx(1)
        assert v.min() == pytest.approx(-1) and v.max() == pytest.approx(1)
        # sign follows the offset to the centre of mass; monotonic in x along a row
        assert (np.sign(h) == np.sign(np.round(xx - cx, 6))).mean() > 0.97
        assert (np.sign(v) == np.sign(np.round(yy - cy, 6))).mean() > 0.97
    assert (hv[:, inst == 0] == 0).all()


def test_without_instance_maps_only_certain_pixels_are_supervised():
    inst = two_touching_discs()
    t = InstanceTargets(["three_class", "distance"])(torch.from_numpy(inst > 0), None, False)
    seg = t["seg"].numpy()
    assert (seg[inst == 0] == 0).all()
    assert set(np.unique(seg[inst > 0])) <= {2, IGNORE}
    # the interface between the merged discs is not claimed as boundary
    assert seg[20, 29] == IGNORE
    assert t["inst_valid"].item() is False


def perfect_maps(inst, kind):
    fg = (inst > 0).astype(np.float32)
    targets = InstanceTargets(["three_class", "distance", "hv"])(torch.from_numpy(inst > 0), torch.from_numpy(inst))
    seg = targets["seg"].numpy()
    maps = {"fg": fg, "probs": fg[None]}
    needs = MARKER_MAPS[kind]  # the maps that marker source reads
    if "interior" in needs:
        maps["interior"] = (seg == 1).astype(np.float32)
    if "dist" in needs:
        maps["dist"] = targets["dist"][0].numpy()
    if "hv" in needs:
        maps["hv"] = targets["hv"].numpy()
    return maps


@pytest.mark.parametrize("source,threshold,extra", [
    ("interior", 0.5, {}), ("distance", 0.5, {}), ("interior_distance", 0.5, {}), ("hv", 0.4, {}),
    ("hv", 0.4, {"hv_ksize": 21, "hv_signed": True}), ("hv", 0.4, {"hv_ksize": 7, "hv_signed": False}),
    ("interior_distance_hv", 0.5, {"hv_ksize": 21, "hv_signed": True})])
def test_marker_watershed_separates_two_touching_discs_from_perfect_maps(source, threshold, extra):
    inst = two_touching_discs()
    pp = PostProcessor(instances="markers", marker_source=source, marker_threshold=threshold, min_marker_size=3,
                       fill_holes=True, min_size=0, **extra)
    out = pp(perfect_maps(inst, source))["instances"]
    assert len(np.unique(out)) - 1 == 2
    assert aji(inst, out) > 0.95


def merged_maps_with_true_hv(gap=12):
    """Two discs of radius 10, centres ``gap`` px apart, split along their bisector (deeply overlapping nuclei),
    whose interior and distance maps are those of the merged blob, as a model that missed the line between them
    would predict; only the hv maps are right."""
    yy, xx = np.mgrid[:40, :60]
    d1, d2 = (yy - 20) ** 2 + (xx - 24) ** 2, (yy - 20) ** 2 + (xx - 24 - gap) ** 2
    inst = np.where(np.minimum(d1, d2) <= 100, np.where(d1 <= d2, 1, 2), 0).astype(np.int32)
    maps = perfect_maps(inst, "interior_distance_hv")
    merged = InstanceTargets(["distance"])(torch.from_numpy(inst > 0), torch.from_numpy((inst > 0).astype(np.int32)))
    maps["interior"] = (inst > 0).astype(np.float32)
    maps["dist"] = merged["dist"][0].numpy()
    return inst, maps


def test_hv_edges_split_markers_the_interior_and_distance_maps_merge():
    inst, maps = merged_maps_with_true_hv()
    kw = dict(instances="markers", marker_threshold=0.5, min_marker_size=3, fill_holes=True, min_size=0)
    merged = PostProcessor(marker_source="interior_distance", **kw)(maps)["instances"]
    assert len(np.unique(merged)) - 1 == 1  # without the offsets the blob stays one nucleus
    split = PostProcessor(marker_source="interior_distance_hv", hv_ksize=21, hv_signed=True, **kw)(maps)["instances"]
    assert len(np.unique(split)) - 1 == 2
    assert aji(inst, split) > 0.95 > 0.6 > aji(inst, merged)


def test_interior_distance_hv_cache_follows_the_hv_settings(monkeypatch):
    """The flooding energy depends on the hv rule: a cache filled under one rule must not serve another."""
    import histoseg.inference.postprocess as pp_mod

    seen = []
    real = pp_mod.segmentation.watershed
    monkeypatch.setattr(pp_mod.segmentation, "watershed", lambda e, m, mask: seen.append(e.copy()) or real(e, m, mask=mask))
    _, maps = merged_maps_with_true_hv()
    fg = maps["fg"] > 0.5
    runs = [(21, True), (3, False), (21, True)]
    cache = pp_mod.StageCache()
    for k, sg in runs:  # the tuner's order: one cache per image, the rule changing between calls
        pp_mod.marker_watershed(fg, maps, "interior_distance_hv", 0.3, 3, 1.0, cache=cache, hv_ksize=k, hv_signed=sg)
    for k, sg in runs:
        pp_mod.marker_watershed(fg, maps, "interior_distance_hv", 0.3, 3, 1.0, hv_ksize=k, hv_signed=sg)
    cached, fresh = seen[:3], seen[3:]
    for a, b in zip(cached, fresh):
        np.testing.assert_array_equal(a, b)
    assert np.abs(fresh[0] - fresh[1]).max() > 0.05  # the two rules do flood different energies


def test_hv_edges_default_rule_is_unchanged():
    """hv_ksize=3, unsigned is the rule stored checkpoints were tuned with: pinned to its first formula."""
    from skimage.filters import sobel_h, sobel_v

    from histoseg.inference.postprocess import hv_edges

    hv = perfect_maps(two_touching_discs(), "hv")["hv"] + np.random.default_rng(0).normal(0, 0.05, (2, 40, 60))
    h, v = ((m - m.min()) / (m.max() - m.min()) for m in hv.astype(np.float32))
    gh, gv = np.abs(sobel_v(h)), np.abs(sobel_h(v))
    gh = 1 - (gh - gh.min()) / (gh.max() - gh.min())
    gv = 1 - (gv - gv.min()) / (gv.max() - gv.min())
    np.testing.assert_allclose(hv_edges(hv), np.maximum(1 - gh, 1 - gv), atol=1e-6)


def test_signed_hv_edges_mark_falling_offsets_only():
    """HoVer-Net's signed rule: the offsets rise across a nucleus, so a rise is interior and only a fall is a
    border; the magnitude rule cannot tell them apart."""
    from histoseg.inference.postprocess import hv_edges

    hv = perfect_maps(two_touching_discs(), "hv")["hv"]
    for k in (3, 21):
        signed, unsigned = hv_edges(hv, k, True), hv_edges(hv, k, False)
        # the interface of the two discs (column 29 or so, where disc 1's +1 meets disc 2's -1) is the strongest edge
        assert signed[15:26, 28:31].max() == pytest.approx(1.0, abs=0.05)
        # a nucleus interior, where h rises: far below the border under the signed rule
        assert signed[18:23, 14:26].max() < 0.35 * signed[15:26, 28:31].max()
        assert signed[18:23, 14:26].max() < unsigned[18:23, 14:26].max()


@pytest.mark.parametrize("bad", [2, 4, 33, 1])
def test_hv_ksize_must_be_an_odd_sobel_size(bad):
    with pytest.raises(ValueError, match="hv_ksize"):
        PostProcessor(instances="markers", marker_source="hv", hv_ksize=bad)


def test_hv_settings_round_trip_through_the_config():
    pp = PostProcessor(instances="markers", marker_source="hv", hv_ksize=21, hv_signed=True)
    again = PostProcessor(**pp.config())
    assert (again.hv_ksize, again.hv_signed) == (21, True)
    maps = perfect_maps(two_touching_discs(), "hv")
    np.testing.assert_array_equal(pp(maps)["instances"], again(maps)["instances"])


def test_distance_watershed_separates_two_touching_discs():
    inst = two_touching_discs()
    out = PostProcessor(instances="watershed", h=1.0, smooth=1.0, min_size=0)(np.stack([(inst > 0).astype(float)]))
    assert len(np.unique(out["instances"])) - 1 == 2
    assert aji(inst, out["instances"]) > 0.9


def test_markers_without_a_seed_keep_their_blob():
    fg = np.zeros((20, 20), np.float32)
    fg[5:10, 5:10] = 1
    maps = {"fg": fg, "probs": fg[None], "interior": np.zeros_like(fg)}
    out = PostProcessor(instances="markers", marker_source="interior", min_size=0)(maps)["instances"]
    assert (out[5:10, 5:10] > 0).all()


AUGS = sorted(p.stem for p in (conf_dir() / "aug").glob("*.yaml"))


@pytest.mark.parametrize("aug_name", AUGS)
def test_targets_stay_consistent_with_the_image_under_augmentation(aug_name):
    from omegaconf import OmegaConf

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug = hydra.utils.instantiate(OmegaConf.load(conf_dir() / "aug" / f"{aug_name}.yaml"))
    rng = np.random.default_rng(0)
    inst = np.zeros((160, 160), np.uint16)
    yy, xx = np.mgrid[:160, :160]
    k = 1
    for cy in range(20, 160, 40):
        for cx in range(20, 160, 40):
            inst[(yy - cy) ** 2 + ((xx - cx) / 1.5) ** 2 <= rng.integers(8, 13) ** 2] = k
            k += 1
    # the image encodes the nuclei: bright channel 0 inside nuclei (colour transforms may invert or shift it)
    img = np.full((160, 160, 3), 60, np.uint8)
    img[inst > 0, 0] = 220
    s = Sample(image=img, mask=(inst > 0).astype(np.uint8), instances=inst, case_id="grid")
    targets = InstanceTargets(["three_class", "distance", "hv"])
    ds = PatchDataset(InMemorySource([s]), (128, 128), 6, aug, seed=1, targets=targets)
    for i in range(6):
        item = ds[(0, i)]
        mask = item["mask"].numpy() > 0
        seg, dist = item["seg"].numpy(), item["dist"][0].numpy()
        assert np.array_equal(seg > 0, mask) and np.array_equal(dist > 0, mask)
        assert np.array_equal(item["instances"].numpy() > 0, mask)
        assert (item["hv"].numpy()[:, ~mask] == 0).all()
        ch = item["image"][0].numpy()
        if mask.any() and (~mask).any():
            corr = np.corrcoef(ch.ravel(), mask.ravel().astype(float))[0, 1]
            assert abs(corr) > 0.8, f"image and mask misaligned after {aug_name}: corr {corr:.2f}"


def test_tuned_thresholds_round_trip_through_the_checkpoint(make_cfg, tmp_path):
    from histoseg.models.loading import load_task
    from histoseg.tasks.train import train

    cfg = make_cfg("target=three_class", "trainer.max_epochs=1", "test=false",
                   "tune_postprocess.grid={marker_threshold:[0.2,0.4],threshold:[0.5]}")
    metrics, obj = train(cfg)
    tuned = obj["model"].postprocess.config()
    assert tuned["marker_threshold"] in (0.2, 0.4)
    assert (tmp_path / "postprocess_tuning.json").is_file()
    for name in ("last.ckpt",):
        task = load_task(tmp_path / "checkpoints" / name)
        assert task.postprocess.config() == tuned
        assert task.heads == {"seg": 3}


@pytest.mark.parametrize("target", ["binary", "three_class", "distance", "hv", "three_class_distance",
                                    "three_class_distance_hv"])
def test_every_target_config_trains_one_step(make_cfg, target):
    from histoseg.tasks.train import train

    metrics, obj = train(make_cfg(f"target={target}", "trainer=debug"))
    assert "test/aji" in metrics and 0 <= float(metrics["test/aji"]) <= 1


def test_tuning_for_aji_and_pq_drops_spurious_specks():
    """A speck of false foreground hardly moves AJI but costs PQ a whole false positive: the ``aji_pq``
    objective picks a ``min_size`` that removes it, and every grid entry is scored."""
    from types import SimpleNamespace

    from histoseg.inference.tuning import tune_postprocess
    from histoseg.metrics.instance import panoptic_quality

    inst = two_touching_discs()
    maps = perfect_maps(inst, "interior_distance")
    for key in ("fg", "interior", "dist"):
        maps[key] = maps[key].copy()
        maps[key][34:37, 54:57] = 1.0  # 9-pixel speck far from both nuclei
    maps["probs"] = np.stack([1 - maps["fg"], maps["fg"]])
    pp = PostProcessor(instances="markers", marker_source="interior_distance", min_marker_size=1, fill_holes=True)
    task = SimpleNamespace(postprocess=pp, heads={"seg": 3, "dist": 1}, predict_maps=lambda image: maps, num_classes=2)
    sample = SimpleNamespace(image=None, instances=inst)
    grid = {"min_size": [0, 30], "marker_threshold": [0.5]}
    best, table = tune_postprocess(task, [sample], "aji_pq", grid)
    assert best["min_size"] == 30 and len(table) == 2
    kept = pp.with_params(min_size=0, marker_threshold=0.5)(maps)["instances"]
    assert len(np.unique(kept)) - 1 == 3 and panoptic_quality(inst, kept)["pq"] < 0.8
    scores = {r["min_size"]: r["aji_pq"] for r in table}
    assert scores[30] > scores[0] + 0.05


def test_multi_head_model_with_a_plain_loss_names_the_fix(make_cfg):
    """A preset's ``override /loss`` wins over the target config's: the error says which loss to add."""
    from histoseg.tasks.train import build_task
    from histoseg.tasks.utils import ConfigError

    cfg = make_cfg("target=three_class_distance", "loss=dice_ce", "trainer=debug")
    with pytest.raises(ConfigError, match=r"loss=mh_three_class_distance"):
        build_task(cfg)


def test_tuning_for_dice_scores_the_post_processed_mask_and_needs_no_instances():
    """``dice`` scores the class map the test step scores: a faint false blob (p = 0.55) is dropped by the
    higher threshold, and the best entry's Dice equals the image Dice of that post-processed mask."""
    from types import SimpleNamespace

    from histoseg.inference.tuning import tune_postprocess
    from histoseg.metrics.pixel import image_scores

    inst = two_touching_discs()
    fg = np.where(inst > 0, 0.9, 0.05)
    fg[5:35, 50:59] = 0.55  # 270-pixel blob right of both discs, no nucleus there
    probs = fg[None].astype(np.float32)  # a binary model: (1, H, W) foreground probability
    pp = PostProcessor(instances="watershed")
    task = SimpleNamespace(postprocess=pp, heads=None, predict_maps=lambda image: {"probs": probs}, num_classes=2)
    sample = SimpleNamespace(image=None, instances=None, mask=(inst > 0).astype(np.uint8))
    best, table = tune_postprocess(task, [sample], "dice", {"threshold": [0.5, 0.6], "min_size": [0]})
    assert best["threshold"] == 0.6 and len(table) == 2
    scores = {r["threshold"]: r["dice"] for r in table}
    assert scores[0.6] == pytest.approx(1.0) and scores[0.5] < 0.9
    low = pp.with_params(threshold=0.5, min_size=0)(probs)["labels"]
    assert scores[0.5] == pytest.approx(image_scores(low, sample.mask, 2)["dice"])
    with pytest.raises(ValueError, match="instance maps"):
        tune_postprocess(task, [sample], "aji", {"threshold": [0.5]})
    # an invalid setting is named before any prediction is made (render=disc without a radius)
    task.predict_maps = lambda image: pytest.fail("predicted before checking the grid")
    with pytest.raises(ValueError, match=r"tuning grid: setting \{'render': 'disc'.*disc_radius"):
        tune_postprocess(task, [sample], "dice", {"render": ["mask", "disc"]})


def _touching_discs(seed: int, size: int = 96) -> np.ndarray:
    """An instance map of 14 random, partly touching discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    for i in range(1, 15):
        cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(6, 13)
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)] = i
    return inst


@pytest.mark.parametrize("mode", ["watershed", "markers"])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_tuning_grid_equals_a_plain_loop_over_every_setting(mode, workers, caplog):
    """The tuner's shortcuts (stages reused across settings, one overlap table for AJI and PQ, images scored in
    worker processes, with 5 workers for 3 images also pieces of one image's grid, relabelling by look-up table)
    change nothing: every grid entry equals the mean over images of the plain post-processor + metrics called
    afresh, in the same table order."""
    from benchmarks.tuning import plain_grid, simulated_maps, tuner_task
    from histoseg.inference.tuning import DEFAULT_GRIDS, tune_postprocess

    images = [(inst, simulated_maps(inst, s)) for s, inst in enumerate(_touching_discs(s) for s in range(3))]
    heads = mode == "markers"
    pp = PostProcessor(instances=mode, marker_source="interior_distance")
    if heads:
        grid = {k: v[:2] for k, v in DEFAULT_GRIDS["markers"].items()}
    else:
        grid = {"h": [0.5, 2.0], "smooth": [0.5, 1.0], "threshold": [0.4, 0.6], "min_size": [10, 60]}
    task, samples = tuner_task(pp, images, heads)
    caplog.set_level("INFO", logger="histoseg.inference.tuning")
    best, table = tune_postprocess(task, samples, "aji_pq", grid, workers=workers)
    # progress is logged; with 5 workers for 3 images each image's grid is cut in two
    done = 6 if workers == 5 else 3
    assert f"tuning post-processing: {done}/{done} images (or grid pieces) scored" in caplog.text
    expected = plain_grid(pp, grid, images, heads)
    assert table == expected
    assert len({r["aji_pq"] for r in table}) > 1  # the grid is not degenerate
    assert best == {k: max(expected, key=lambda r: r["aji_pq"])[k] for k in sorted(grid)}


@pytest.mark.parametrize("mode", ["watershed", "markers", "watershed+disc"])
def test_dice_tuning_equals_the_full_post_processing(mode):
    """The Dice objective skips the instance stage where the class map does not depend on it (watershed with
    ``render=mask``); the scores still equal the Dice of the full post-processor's class map (markers, and
    ``render=disc``, redraw it from the instances)."""
    from benchmarks.tuning import simulated_maps, tuner_task
    from histoseg.inference.tuning import tune_postprocess
    from histoseg.metrics.pixel import image_scores

    images = [(inst, simulated_maps(inst, s)) for s, inst in enumerate(_touching_discs(s) for s in range(2))]
    heads = mode == "markers"
    pp = PostProcessor(instances=mode.split("+")[0], marker_source="interior_distance", fill_holes=True,
                       disc_radius=8)
    grid = {"threshold": [0.3, 0.5, 0.7], "min_size": [0, 60]}
    if mode.endswith("disc"):
        grid["render"] = ["mask", "disc"]
    task, samples = tuner_task(pp, images, heads)
    _, table = tune_postprocess(task, samples, "dice", grid, workers=1)
    if mode.endswith("disc"):  # the rendered discs differ from the masks, and splitting touching nuclei matters
        by = {(r["threshold"], r["min_size"], r["render"]): r["dice"] for r in table}
        assert any(by[t, m, "disc"] != by[t, m, "mask"] for t in grid["threshold"] for m in grid["min_size"])
        unsplit = pp.with_params(instances="connected", render="disc", threshold=0.5, min_size=0)
        split = pp.with_params(render="disc", threshold=0.5, min_size=0)
        maps0 = images[0][1]["binary"]
        assert not np.array_equal(unsplit(maps0)["labels"], split(maps0)["labels"])
    for row in table:
        cand = pp.with_params(**{k: row[k] for k in grid})
        full = [image_scores(cand(maps if heads else maps["binary"])["labels"], (inst > 0).astype(np.uint8), 2)["dice"]
                for inst, maps in images]
        assert row["dice"] == pytest.approx(float(np.mean(full)), abs=1e-12)
    assert len({r["dice"] for r in table}) > 1


@pytest.mark.parametrize("mode", ["none", "connected", "watershed"])
def test_dice_tuning_default_grid_without_markers(mode):
    """With no grid, the Dice objective tunes the class map's settings (threshold x min_size) in every mode whose
    instances do not redraw the class map, not only in watershed mode; its best is the table's maximum and at
    least the untuned default's Dice."""
    from benchmarks.tuning import simulated_maps, tuner_task
    from histoseg.inference.tuning import DEFAULT_DICE_GRID, tune_postprocess
    from histoseg.metrics.pixel import image_scores

    images = [(inst, simulated_maps(inst, s)) for s, inst in enumerate(_touching_discs(s) for s in range(2))]
    pp = PostProcessor(instances=mode, fill_holes=True)
    task, samples = tuner_task(pp, images, False)
    best, table = tune_postprocess(task, samples, "dice", None, workers=1)
    assert sorted(best) == sorted(DEFAULT_DICE_GRID)
    assert len(table) == int(np.prod([len(v) for v in DEFAULT_DICE_GRID.values()]))
    top = max(r["dice"] for r in table)
    assert {k: v for k, v in max(table, key=lambda r: r["dice"]).items() if k != "dice"} == best
    untuned = float(np.mean([image_scores(pp(maps["binary"])["labels"], (inst > 0).astype(np.uint8), 2)["dice"]
                             for inst, maps in images]))
    assert top >= untuned - 1e-12
    assert len({r["dice"] for r in table}) > 1


def test_relabelling_matches_np_unique_for_any_ids():
    from histoseg.metrics.instance import remap_label

    def reference(inst):
        ids, inv = np.unique(inst, return_inverse=True)
        inv = inv.reshape(inst.shape)
        return (inv + 1 if ids[0] != 0 else inv).astype(np.int32)

    rng = np.random.default_rng(0)
    cases = [rng.choice([0, 3, 7, 1000, 65535], size=(20, 30)).astype(np.uint16),   # gaps, background
             rng.choice([5, 9, 12], size=(10, 10)).astype(np.int64),                 # no background
             np.zeros((4, 4), np.int32),                                            # background only
             rng.choice([0, -4, 2], size=(6, 6)),                                   # negative ids (np.unique path)
             rng.choice([0, 2**40], size=(6, 6)).astype(np.int64)]                  # ids far above the pixel count
    for inst in cases:
        got = remap_label(inst)
        assert got.dtype == np.int32 and np.array_equal(got, reference(inst)), inst.dtype


def test_disc_rendering_redraws_each_nucleus_as_the_annotation_disc():
    """``render=disc``: irregular predicted blobs (a square, an ellipse, a ring-shaped blob) with the same centroids
    as ground-truth discs drawn at integer points become exactly those discs, in each blob's majority class; a
    class that is not a nucleus class stays; pixel Dice goes from < 1 to 1."""
    from histoseg.data.readers.common import draw_discs
    from histoseg.inference.postprocess import render_discs
    from histoseg.metrics.pixel import image_scores

    shape, r = (80, 100), 7
    gt, gt_inst = draw_discs(shape, [(1, np.array([[20.0, 20.0], [70.0, 25.0]])), (2, np.array([[45.0, 60.0]]))], r)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint8)
    labels[14:27, 14:27] = 1  # a square centred on (20, 20)
    labels[((xx - 70) / 10.0) ** 2 + ((yy - 25) / 5.0) ** 2 <= 1] = 1  # an ellipse centred on (70, 25)
    blob = ((xx - 45) ** 2 + (yy - 60) ** 2 <= 81) & ((xx - 45) ** 2 + (yy - 60) ** 2 > 4)  # a ring: hole inside
    labels[blob] = 2
    labels[blob & (xx < 42)] = 1  # a minority of the ring is class 1: the disc takes class 2
    inst, _ = ndi.label(labels > 0)
    out, out_inst = render_discs(labels, inst, r)
    np.testing.assert_array_equal(out, gt)
    assert out_inst.max() == 3 and np.array_equal(out_inst > 0, gt_inst > 0)
    assert image_scores(labels, gt, 3)["dice"] < 0.9 and image_scores(out, gt, 3)["dice"] == pytest.approx(1.0)
    # class 3 is not a nucleus class: kept as it is, where no disc covers it
    other = labels.copy()
    other[0:5, 90:100] = 3
    kept, _ = render_discs(other, ndi.label(np.isin(other, [1, 2]))[0], r, nuclei_classes=[1, 2])
    assert (kept[0:5, 90:100] == 3).all() and np.array_equal(kept == 3, other == 3)
    # through the PostProcessor (binary probabilities; connected components when instances=none)
    probs = np.where(labels > 0, 0.9, 0.1)[None]
    for mode in ("none", "connected"):
        res = PostProcessor(instances=mode, render="disc", disc_radius=r)(probs)
        np.testing.assert_array_equal(res["labels"], (gt > 0).astype(np.uint8))
        assert (res["instances"] is None) == (mode == "none")
    empty = PostProcessor(instances="watershed", render="disc", disc_radius=r)(np.zeros((1, 20, 20)))
    assert not empty["labels"].any() and not empty["instances"].any()
    with pytest.raises(ValueError, match="disc_radius"):
        PostProcessor(render="disc")
    with pytest.raises(ValueError, match="render must be"):
        PostProcessor(render="circle", disc_radius=3)
    pp = PostProcessor(render="disc", disc_radius=5)
    assert PostProcessor(**pp.config()).config() == pp.config()  # stored in checkpoints as its config


def test_tuning_without_instance_maps_falls_back_to_dice(tmp_path, caplog):
    """Validation images with masks but no instance maps (epithelium, cellularity) cannot score ``aji_pq``: the
    post-processing is tuned for whole-image Dice instead (threshold / min_size, the settings that change the
    mask), with a warning, and the objective used is recorded."""
    import json
    import logging
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from histoseg.tasks.train import tune_and_store

    inst = two_touching_discs()
    fg = np.where(inst > 0, 0.9, 0.05)
    fg[5:35, 50:59] = 0.55  # a faint false blob: only a threshold above 0.55 drops it
    task = SimpleNamespace(postprocess=PostProcessor(instances="watershed"), heads=None, num_classes=2,
                           predict_maps=lambda image: {"probs": fg[None].astype(np.float32)}, report_dir=str(tmp_path))
    sample = SimpleNamespace(image=None, instances=None, mask=(inst > 0).astype(np.uint8), case_id="v0")
    dm = SimpleNamespace(val_set=SimpleNamespace(samples=[sample]))
    with caplog.at_level(logging.WARNING):
        tune_and_store(task, dm, None, OmegaConf.create({"objective": "aji_pq", "grid": None, "workers": 1}))
    assert "tuning the post-processing for 'dice'" in caplog.text
    assert task.postprocess.threshold >= 0.6
    saved = json.loads((tmp_path / "postprocess_tuning.json").read_text())
    assert saved["objective"] == "dice" and {tuple(sorted(r)) for r in saved["table"]} == {("dice", "min_size", "threshold")}


def test_split_mask_splits_a_merged_mask_with_the_models_markers_and_keeps_every_mask_pixel():
    from histoseg.inference.postprocess import split_mask

    inst = two_touching_discs()
    fg = inst > 0  # what a binary annotation keeps: the two nuclei as one blob
    assert ndi.label(fg)[1] == 1
    maps = perfect_maps(inst, "interior_distance")
    maps["dist"] = maps["dist"] * 0.9 + 0.05  # a model's maps are never exact
    pp = PostProcessor(instances="markers", marker_source="interior_distance", marker_threshold=0.7,
                       min_marker_size=3, min_size=30)
    out = split_mask(fg, maps, pp)
    assert np.array_equal(out > 0, fg)  # no pixel enters or leaves the annotated mask
    assert out.max() == 2 and aji(inst, out) > 0.95
    # a spurious marker in the far corner of disc 2 gives a sliver, merged back into its neighbour, not dropped
    maps["interior"] = maps["interior"].copy()
    maps["dist"] = maps["dist"].copy()
    ys, xs = np.nonzero(inst == 2)
    far = np.argmax(xs)
    for dy in (-1, 0, 1):
        for dx in (-3, -2, -1):
            maps["interior"][ys[far] + dy, xs[far] + dx] = 1.0
            maps["dist"][ys[far] + dy, xs[far] + dx] = 1.0
    assert split_mask(fg, maps, pp, merge_below=0).max() == 3  # the sliver ...
    out = split_mask(fg, maps, pp)
    assert out.max() == 2 and np.array_equal(out > 0, fg) and aji(inst, out) > 0.9  # ... merged, not removed


def test_merge_small_instances_merges_into_the_longest_border_and_keeps_isolated_objects():
    from histoseg.inference.postprocess import merge_small_instances

    a = np.zeros((12, 12), np.int32)
    a[1:6, 1:6] = 1  # 25 px
    a[6:9, 1:6] = 2  # 15 px, touches 1 along 5 px
    a[1:6, 6] = 3  # 5 px, touches 1 along 5 px and 2 diagonally
    a[10, 10] = 4  # isolated 1 px
    out = merge_small_instances(a, 10)
    assert out.max() == 3 and np.array_equal(out > 0, a > 0)
    assert len(np.unique(out[a == 3])) == 1 and out[a == 3][0] == out[a == 1][0]  # joined its long neighbour
    assert out[a == 2][0] != out[a == 1][0] and out[10, 10] > 0  # 15 px stays; the isolated pixel is kept


def test_merge_small_instances_follows_a_chain_of_merges():
    from histoseg.inference.postprocess import merge_small_instances

    a = np.zeros((12, 20), np.int32)
    a[2:8, 2:10] = 1  # 48 px
    a[2:6, 10:12] = 2  # 8 px, touches 1
    a[3:6, 12:14] = 3  # 6 px, touches only 2, and reaches 2 px past 2's bounding box
    out = merge_small_instances(a, 15)  # 3 joins 2 (14 px, still small), which then joins 1 with all its pixels
    assert out.max() == 1 and np.array_equal(out > 0, a > 0)
    out = merge_small_instances(a, 10)  # 3 joins 2, which is then 14 px and stays
    assert out.max() == 2 and out[4, 13] == out[4, 10] != out[4, 5]


@pytest.mark.parametrize("source,heads,missing", [
    ("interior_distance_hv", "interior_distance", "hv"), ("hv", "interior_distance", "hv"), ("distance", "interior", "dist")])
def test_marker_source_without_its_head_names_the_missing_map(source, heads, missing):
    """A checkpoint re-scored with a marker source its heads cannot feed (e.g. histoseg-eval
    postprocess.marker_source=interior_distance_hv on a two-head model) fails naming the missing map, not a KeyError."""
    maps = perfect_maps(two_touching_discs(), heads)
    with pytest.raises(ValueError, match=rf"marker_source={source} needs the model's \['{missing}'\]"):
        PostProcessor(instances="markers", marker_source=source)(maps)
    with pytest.raises(ValueError, match="marker source must be one of"):
        PostProcessor(instances="markers", marker_source="centroid")(maps)
