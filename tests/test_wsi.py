"""Whole-slide images: reading, tissue detection, streaming inference == in-memory tiled inference, GeoJSON,
the mask pyramid, resume after an interrupted run, and bad slides in a folder.

Slides are built here: a pyramidal TIFF of synthetic generator tiles inside blank margins, with its exact
instance map (histoseg.wsi.testslides). Models are tiny hand-made checkpoints (tests/helpers_ckpt.py).
"""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
import zarr
from shapely.geometry import shape as to_shape

from histoseg.inference import tiled_predict
from histoseg.wsi import Slide, SlideError, is_slide, predict_slide
from histoseg.wsi.testslides import synthetic_slide
from histoseg.wsi.tiles import SlideTileSource
from histoseg.wsi.tissue import detect_tissue
from tests.conftest import compose_cfg
from tests.helpers_ckpt import dark_is_nucleus, write_checkpoint

# its module-scoped fixtures are built once: keep the module on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("wsi")

MPP = 0.5
SMALL_UNET = {"_target_": "histoseg.models.backbones.unet.UNet", "_partial_": True, "depth": 2, "width": 4,
              "batch_norm": False}
# small blocks so a ~1.4k x 1.8k slide still has several inference and post-processing blocks
WSI_TEST = ["wsi.block_shape=[512,768]", "wsi.chunk_shape=[128,128]", "wsi.post.block=256", "wsi.post.halo=32",
            "wsi.num_workers=0", "progress=false"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads only contend (results do not depend on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """The synthetic slide (generic tiled TIFF, resolution tags) and its exact instance map."""
    return synthetic_slide(tmp_path_factory.mktemp("slides") / "syn.tif", mpp=MPP)


def wsi_cfg(tmp_path, ckpt, inp, *overrides):
    return compose_cfg(tmp_path / "out", f"ckpt_path={ckpt}", f"input={inp}", *WSI_TEST, *overrides, base=[],
                       config_name="predict")


def restore(ckpt):
    from histoseg.tasks.restore import restore_task

    return restore_task(ckpt)[0]


def tiles_of(slide_shape, tile, overlap):
    from histoseg.inference.tiled import tile_starts

    return [(y, x) for y in tile_starts(slide_shape[0], tile, overlap) for x in tile_starts(slide_shape[1], tile, overlap)]


# ---------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind", ["tif", "ome", "svs"])
def test_read_region_at_level_0_equals_the_source_array(tmp_path, syn, kind):
    from histoseg.wsi.tiff import array_tile_fn, downsample_levels, level_shapes, write_pyramid

    path = tmp_path / {"tif": "s.tif", "ome": "s.ome.tif", "svs": "s.svs"}[kind]
    shapes = level_shapes(syn.image.shape[:2])
    write_pyramid(path, syn.image.shape[:2], array_tile_fn(downsample_levels(syn.image, shapes)), 3, MPP, kind)
    assert is_slide(path)
    with Slide(path) as s:
        assert s.shape == syn.image.shape[:2] and s.level_count == len(shapes) > 2
        assert s.mpp == pytest.approx(MPP)  # resolution tags / OME PhysicalSizeX / Aperio MPP
        np.testing.assert_array_equal(s.read_region(0, 0, s.shape), syn.image)
        np.testing.assert_array_equal(s.read_region(301, 517, (250, 333)), syn.image[301:551, 517:850])
        # beyond the edge reads black
        edge = s.read_region(s.shape[0] - 10, 0, (20, 5))
        assert (edge[10:] == 0).all() and np.array_equal(edge[:10], syn.image[-10:, :5])
        # a target resolution of twice the pixel size is level 1, read as is
        lv1 = downsample_levels(syn.image, shapes)[1]
        np.testing.assert_array_equal(s.read_region_mpp(200, 400, (64, 80), 2 * MPP), lv1[100:164, 200:280])
        # a resolution between levels: resampled from the finer level, close to the area-averaged image
        r = s.read_region_mpp(0, 0, (200, 200), 1.5 * MPP).astype(float)
        ref = downsample_levels(syn.image[:300, :300], [(300, 300), (200, 200)])[1].astype(float)
        assert np.abs(r - ref).mean() < 3


def test_missing_pixel_size_is_a_clear_error_and_mpp_overrides(tmp_path, syn):
    from histoseg.wsi.tiff import array_tile_fn, downsample_levels, level_shapes, write_pyramid

    path = tmp_path / "nompp.tif"
    shapes = level_shapes(syn.image.shape[:2])
    write_pyramid(path, syn.image.shape[:2], array_tile_fn(downsample_levels(syn.image, shapes)), 3, None, "tif")
    with Slide(path) as s:
        with pytest.raises(SlideError, match=r"nompp\.tif: the slide's metadata has no pixel size.*wsi\.mpp="):
            _ = s.mpp
    with Slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.level_mpp(1) == pytest.approx(0.5)
    with pytest.raises(SlideError, match=r"nothere\.svs: slide file not found"):
        Slide(tmp_path / "nothere.svs")
    (tmp_path / "junk.svs").write_bytes(b"II*\x00 this is not a slide")
    with pytest.raises(SlideError, match=r"junk\.svs: cannot open slide"):
        Slide(tmp_path / "junk.svs")
    with pytest.raises(SlideError, match=r"needs OpenSlide.*pip install 'histoseg\[wsi\]'") if not _has_openslide() \
            else pytest.raises(SlideError, match=r"x\.mrxs"):
        (tmp_path / "x.mrxs").write_bytes(b"not a mirax")
        Slide(tmp_path / "x.mrxs")


def _has_openslide() -> bool:
    try:
        import openslide  # noqa: F401
    except ImportError:
        return False
    return True


def test_plain_tiffs_are_images_and_pyramids_are_slides(tmp_path, syn):
    tifffile.imwrite(tmp_path / "plain.tif", syn.image[:300, :300])
    tifffile.imwrite(tmp_path / "tiled.tif", syn.image, tile=(256, 256))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    assert not is_slide(tmp_path / "plain.tif")
    assert not is_slide(tmp_path / "tiled.tif")  # one tiled level, smaller than min_slide_side
    assert is_slide(tmp_path / "tiled.tif", min_slide_side=1000)
    assert not is_slide(tmp_path / "broken.tif")  # left to the image reader, which names the problem
    assert is_slide(syn.path) and is_slide(tmp_path / "any.svs") and not is_slide(tmp_path / "a.png")


# ---------------------------------------------------------------------- tissue
def test_tissue_detection_covers_the_tissue_and_skips_the_blank_margins(syn, monkeypatch):
    levels_read = []
    orig = Slide.read_level

    def spy(self, level, *a, **k):
        levels_read.append(level)
        return orig(self, level, *a, **k)

    monkeypatch.setattr(Slide, "read_level", spy)
    with Slide(syn.path) as s:
        t = detect_tissue(s, mpp=8.0)
    assert min(levels_read) == s.level_count - 1 > 0  # the overview came from the coarsest level, never level 0
    box_area = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in syn.tissue_boxes) * (MPP * 1e-3) ** 2
    assert t.area_mm2 == pytest.approx(box_area, rel=0.1)
    keep = t.tile_filter(1.0)
    tiles = tiles_of(syn.image.shape[:2], 64, 0.25)
    kept = [(y, x) for y, x in tiles if keep(y, x, 64, 64)]
    covered = np.zeros(syn.image.shape[:2], bool)
    for y, x in kept:
        covered[y : y + 64, x : x + 64] = True
    assert covered[syn.instances > 0].all()  # every nucleus pixel is in a predicted tile
    y0, x0 = min(b[0] for b in syn.tissue_boxes), min(b[2] for b in syn.tissue_boxes)
    y1, x1 = max(b[1] for b in syn.tissue_boxes), max(b[3] for b in syn.tissue_boxes)
    margin = 16  # one overview pixel of slack around the tissue
    for y, x in kept:  # no kept tile lies in the blank margin
        assert y + 64 > y0 - margin and y < y1 + margin and x + 64 > x0 - margin and x < x1 + margin
    assert 0.3 < len(kept) / len(tiles) < 0.8


# ---------------------------------------------------------------------- streaming == in memory
def test_streaming_slide_prediction_equals_in_memory_tiled_prediction(tmp_path, syn):
    ckpt = write_checkpoint(tmp_path / "unet.ckpt", 2, None, {"instances": "connected"}, mpp=MPP,
                            net_config=SMALL_UNET, inference={"tile_shape": [64, 64], "overlap": 0.25, "batch_size": 6})
    cfg = wsi_cfg(tmp_path, ckpt, syn.path, "wsi.num_workers=1")  # tiles read by a DataLoader worker
    task = restore(ckpt)
    reads = []
    orig = SlideTileSource.read

    def spy(self, y, x, th, tw):
        reads.append((y, x))
        return orig(self, y, x, th, tw)

    SlideTileSource.read = spy  # the worker (forked) records into its own copy: check the main process reads none
    try:
        row = predict_slide(syn.path, "syn", task, cfg.wsi, cfg.wsi.output_dir, ckpt_path=ckpt, report=cfg.report,
                            progress=False)
    finally:
        SlideTileSource.read = orig
    assert reads == []  # every tile came from the worker process
    logits = zarr.open_array(str(Path(cfg.wsi.output_dir) / "syn" / "work" / "logits.zarr"), mode="r")[:]

    with Slide(syn.path) as s:
        tissue = detect_tissue(s, **{k: v for k, v in cfg.wsi.tissue.items() if k != "min_tile_fraction"})
    ref = tiled_predict(syn.image, task, (64, 64), 0.25, batch_size=6, device="cpu",
                        tile_filter=tissue.tile_filter(1.0), empty_value=float("nan")).numpy()
    assert logits.shape == ref.shape == (1, *syn.image.shape[:2])
    np.testing.assert_array_equal(np.isnan(logits), np.isnan(ref))  # the same pixels predicted
    both = ~np.isnan(ref)
    assert both.mean() > 0.3
    assert np.abs(logits[both] - ref[both]).max() <= 1e-5
    assert row["tissue_tiles"] < row["grid_tiles"]


# ---------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def nuclei_run(tmp_path_factory, syn):
    """The 1x1 'dark is nucleus' model at 1.0 um/px on the 0.5 um/px slide: the model reads pyramid level 1."""
    tmp = tmp_path_factory.mktemp("run")
    ckpt = write_checkpoint(tmp / "dark.ckpt", 2, dark_is_nucleus, {"instances": "connected"}, mpp=2 * MPP,
                            inference={"tile_shape": [64, 64], "overlap": 0.25, "batch_size": 8})
    from histoseg.tasks.predict import predict

    cfg = wsi_cfg(tmp, ckpt, syn.path)
    summary, obj = predict(cfg)
    assert summary["n_ok"] == 1, summary
    return cfg, obj["rows"][0], Path(cfg.wsi.output_dir) / "syn", ckpt


def test_geojson_polygons_are_valid_level0_and_one_per_instance(nuclei_run, syn):
    from histoseg.inference.postprocess import PostProcessor

    cfg, row, out, ckpt = nuclei_run
    name = restore(ckpt).data_info["class_names"][1]  # the checkpoint's class name
    gj = json.loads((out / "syn.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    dets = [f for f in gj["features"] if f["properties"]["objectType"] == "detection"]
    anns = [f for f in gj["features"] if f["properties"]["objectType"] == "annotation"]
    assert [a["properties"]["classification"]["name"] for a in anns] == ["Tissue"]
    assert len({f["id"] for f in gj["features"]}) == len(gj["features"])  # unique ids
    polys = [to_shape(f["geometry"]) for f in dets]
    assert all(p.geom_type == "Polygon" and p.is_valid and p.area > 0 for p in polys)
    for f in dets:
        props = f["properties"]
        assert props["classification"]["name"] == name and len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {"Area µm^2", "Perimeter µm", "Eccentricity", "Solidity"}

    # one feature per instance: the whole model-resolution map post-processed in one piece has as many
    logits = zarr.open_array(str(out / "work" / "logits.zarr"), mode="r")[:]
    probs = 1 / (1 + np.exp(-np.nan_to_num(logits, nan=-50.0)))
    inst = PostProcessor(instances="connected")(probs)["instances"]
    assert len(dets) == int(inst.max()) == int(row["nuclei_count"]) > 100
    total_um2 = sum(f["properties"]["measurements"]["Area µm^2"] for f in dets)
    assert total_um2 == pytest.approx((inst > 0).sum() * (2 * MPP) ** 2, rel=1e-6)

    # level-0 coordinates: the outlines sit on the true nuclei of the level-0 image
    H, W = syn.image.shape[:2]
    xy = np.array([p.representative_point().coords[0] for p in polys])
    assert xy[:, 0].min() >= 0 and xy[:, 0].max() <= W and xy[:, 1].max() <= H
    on_nucleus = syn.instances[xy[:, 1].astype(int), xy[:, 0].astype(int)] > 0
    assert on_nucleus.mean() > 0.9
    union = shapely.union_all(polys)
    truth_px = syn.instances > 0
    assert union.area == pytest.approx(truth_px.sum(), rel=0.1)  # level-0 pixel area, not model pixels
    assert union.area == pytest.approx((inst > 0).sum() * 4, rel=0.05)  # outlines on pixel edges: 2x2 per model px
    tissue = to_shape(anns[0]["geometry"])
    assert tissue.is_valid and tissue.contains(shapely.union_all(polys).centroid)
    assert anns[0]["properties"]["measurements"]["Area mm^2"] == pytest.approx(float(row["tissue_area_mm2"]), rel=1e-3)


def test_mask_tiff_is_a_level0_pyramid_of_the_labels_and_the_summary_adds_up(nuclei_run, syn):
    cfg, row, out, _ = nuclei_run
    labels = zarr.open_group(str(out / "work" / "labels.zarr"), mode="r")["0"][:]
    with Slide(out / "syn_mask.ome.tif") as m:  # tiffslide reads it as a pyramid, with the slide's pixel size
        assert m.shape == syn.image.shape[:2] and m.level_count >= 3
        assert m.mpp == pytest.approx(MPP)
        lv0 = m.read_region(0, 0, m.shape)[..., 0]
    # model pixels are 2x2 level-0 pixels
    np.testing.assert_array_equal(lv0, np.repeat(np.repeat(labels, 2, 0), 2, 1)[: lv0.shape[0], : lv0.shape[1]] * 255)
    with tifffile.TiffFile(out / "syn_mask.ome.tif") as tf:
        assert tf.is_ome and len(tf.series[0].levels) >= 3 and tf.series[0].levels[0].pages[0].is_tiled
    with open(out / "summary.csv") as f:
        s = next(csv.DictReader(f))
    assert s["status"] == "ok" and int(s["nuclei_count"]) == int(row["nuclei_count"])
    assert float(s["density_per_mm2"]) == pytest.approx(int(s["nuclei_count"]) / float(s["tissue_area_mm2"]), rel=1e-4)
    assert s["resampled"] == "False" and s["read_level"] == "1" and float(s["model_mpp"]) == pytest.approx(2 * MPP)
    # report.csv (the run) and slides.csv (the cohort) carry the slide
    with open(Path(cfg.output_dir) / "report.csv") as f:
        rep = next(csv.DictReader(f))
    assert rep["kind"] == "slide" and rep["geojson"].endswith("syn.geojson") and rep["status"] == "ok"
    assert (out.parent / "slides.csv").read_text().count("\n") == 2
    from histoseg.data.io import read_image

    tissue = read_image(out / "syn_tissue.png", "gray")  # the overview mask at 8 um/px: 16 level-0 px per pixel
    assert tissue.shape == (-(-syn.image.shape[0] // 16), -(-syn.image.shape[1] // 16))
    assert set(np.unique(tissue)) == {0, 255}
    assert (tissue > 0).sum() * (8e-3) ** 2 == pytest.approx(float(s["tissue_area_mm2"]), rel=1e-6)
    overlay = read_image(out / "syn_overlay.png").astype(int)  # thumbnail (the slide is under 2048 px: full size)
    assert overlay.shape == syn.image.shape
    green = (overlay[..., 1] > overlay[..., 0] + 60) & (overlay[..., 1] > overlay[..., 2] + 60)
    assert green[syn.instances > 0].mean() > 0.5 and green[syn.instances == 0].mean() < 0.05


def test_complete_slides_are_skipped(nuclei_run):
    from histoseg.tasks.predict import predict

    cfg, row, out, _ = nuclei_run
    before = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    summary, obj = predict(cfg)
    assert summary["n_ok"] == 1 and int(obj["rows"][0]["nuclei_count"]) == int(row["nuclei_count"])
    assert {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


def test_a_model_at_another_working_scale_is_refused_before_any_output(tmp_path, syn):
    """``inference.scale`` (histoseg.data.scale) resizes whole images, which the slide path does not: it says so
    instead of predicting at the wrong resolution."""
    from histoseg.tasks.utils import ConfigError

    ckpt = write_checkpoint(tmp_path / "half.ckpt", 2, dark_is_nucleus, {"instances": "connected"}, mpp=MPP,
                            inference={"tile_shape": [64, 64], "overlap": 0.25, "batch_size": 8, "scale": 0.5})
    cfg = wsi_cfg(tmp_path, ckpt, syn.path)
    with pytest.raises(ConfigError, match="inference.scale=0.5: the whole-slide path"):
        predict_slide(syn.path, "syn", restore(ckpt), cfg.wsi, cfg.wsi.output_dir, ckpt_path=ckpt,
                      report=cfg.report, progress=False)
    assert not (Path(cfg.wsi.output_dir) / "syn").exists()


# ---------------------------------------------------------------------- resume
class Killed(RuntimeError):
    pass


def test_resume_after_an_interrupted_run_gives_the_same_outputs(tmp_path, syn, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "dark.ckpt", 2, dark_is_nucleus, {"instances": "watershed", "min_size": 8},
                            mpp=MPP, inference={"tile_shape": [64, 64], "overlap": 0.25, "batch_size": 8})
    task = restore(ckpt)

    def run(out, predictor=None):
        cfg = wsi_cfg(tmp_path, ckpt, syn.path)
        return predict_slide(syn.path, "syn", task, cfg.wsi, out, ckpt_path=ckpt, report=cfg.report,
                             predictor=predictor, progress=False)

    calls = {"n": 0}

    def counting(limit=None):
        def pred(x):
            calls["n"] += 1
            if limit is not None and calls["n"] > limit:
                raise Killed("simulated kill")
            return task(x)

        return pred

    full = run(tmp_path / "a", counting())
    n_full, calls["n"] = calls["n"], 0

    # killed in the middle of an inference block, then killed during post-processing
    with pytest.raises(Killed):
        run(tmp_path / "b", counting(limit=n_full // 2))
    prog = json.loads((tmp_path / "b" / "syn" / "work" / "progress.json").read_text())
    done_before = len(prog["stages"]["infer"]["blocks"])
    assert 0 < done_before < 9 and not (tmp_path / "b" / "syn" / "done.json").exists()
    calls["n"] = 0
    pp_call = type(task.postprocess).__call__
    seen = {"n": 0}

    def flaky(self, maps):
        seen["n"] += 1
        if seen["n"] == 20:
            raise Killed("simulated kill in post-processing")
        return pp_call(self, maps)

    monkeypatch.setattr(type(task.postprocess), "__call__", flaky)
    with pytest.raises(Killed):
        run(tmp_path / "b", counting())
    assert 0 < calls["n"] < n_full  # only the unfinished blocks were predicted again
    post_done = len(json.loads((tmp_path / "b" / "syn" / "work" / "progress.json").read_text())["stages"]["post"]["blocks"])
    assert 19 <= post_done < 42  # 19 blocks post-processed, plus blocks without tissue (nothing to do)
    monkeypatch.setattr(type(task.postprocess), "__call__", pp_call)
    calls["n"] = 0
    resumed = run(tmp_path / "b", counting())
    assert calls["n"] == 0  # inference was complete: only post-processing resumed
    assert len(json.loads((tmp_path / "b" / "syn" / "work" / "progress.json").read_text())["stages"]["post"]["blocks"]) == 42

    a, b = tmp_path / "a" / "syn", tmp_path / "b" / "syn"
    np.testing.assert_array_equal(zarr.open_array(str(a / "work/logits.zarr"))[:], zarr.open_array(str(b / "work/logits.zarr"))[:])
    assert (a / "syn.geojson").read_text() == (b / "syn.geojson").read_text()
    np.testing.assert_array_equal(tifffile.imread(a / "syn_mask.ome.tif"), tifffile.imread(b / "syn_mask.ome.tif"))
    timing = ("infer_seconds", "post_seconds", "total_seconds")
    assert full["nuclei_count"] > 300
    for k in full:
        if k not in timing:
            assert full[k] == resumed[k] or (full[k] != full[k] and resumed[k] != resumed[k]), k  # NaN == NaN


# ---------------------------------------------------------------------- bad slides in a folder
def test_truncated_and_unreadable_slides_are_named_and_the_others_complete(tmp_path, syn):
    from histoseg.tasks.predict import predict

    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(syn.path, folder / "a_good.tif")
    data = syn.path.read_bytes()
    (folder / "b_truncated.tif").write_bytes(data[: len(data) * 2 // 3])
    (folder / "c_garbage.svs").write_bytes(np.random.default_rng(0).integers(0, 255, 5000, np.uint8).tobytes())
    synthetic_slide(folder / "d_good.svs", grid=(1, 2), tile_shape=(256, 256), margin=128, mpp=MPP, kind="svs",
                    compression="jpeg")
    ckpt = write_checkpoint(tmp_path / "dark.ckpt", 2, dark_is_nucleus, {"instances": "connected"}, mpp=MPP,
                            inference={"tile_shape": [128, 128], "overlap": 0.25, "batch_size": 8})
    cfg = wsi_cfg(tmp_path, ckpt, folder)
    summary, obj = predict(cfg)
    assert summary["n_images"] == 4 and summary["n_ok"] == 2 and summary["n_errors"] == 2
    errors = dict(summary["errors"])
    assert set(Path(p).name for p in errors) == {"b_truncated.tif", "c_garbage.svs"}
    for p, msg in errors.items():
        assert p in msg  # the message names the file
        assert "Traceback" not in msg and "\n" not in msg
    rows = {r["image"]: r for r in obj["rows"]}
    assert rows["a_good"]["status"] == rows["d_good"]["status"] == "ok"
    with open(Path(cfg.wsi.output_dir) / "slides.csv") as f:
        cohort = {r["slide"]: r for r in csv.DictReader(f)}
    assert {k: v["status"] for k, v in cohort.items()} == {"a_good": "ok", "b_truncated": "error",
                                                           "c_garbage": "error", "d_good": "ok"}


def test_input_index_picks_one_input_and_past_the_end_does_nothing(tmp_path, syn):
    from histoseg.tasks.predict import predict

    ckpt = write_checkpoint(tmp_path / "dark.ckpt", 2, dark_is_nucleus, {"instances": "none"}, mpp=MPP,
                            inference={"tile_shape": [128, 128], "overlap": 0.25, "batch_size": 8})
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(syn.path, folder / "s1.tif")
    from histoseg.data.io import write_image

    write_image(folder / "s0.png", syn.image[300:500, 300:500])
    summary, obj = predict(wsi_cfg(tmp_path, ckpt, folder, "input_index=1"))
    assert [r["image"] for r in obj["rows"]] == ["s1"] and obj["rows"][0]["kind"] == "slide"
    assert obj["rows"][0]["nuclei_count"] != obj["rows"][0]["nuclei_count"]  # NaN: no instances configured
    summary, obj = predict(wsi_cfg(tmp_path, ckpt, folder, "input_index=5"))
    assert summary["n_images"] == 0 and summary["n_errors"] == 0


# ---------------------------------------------------------------------- the test slides
def test_synthetic_test_slide_is_a_tiled_pyramid_with_its_exact_mask(syn):
    from histoseg.data.readers.synthetic import generate_tile

    with tifffile.TiffFile(syn.path) as tf:
        page = tf.series[0].levels[0].pages[0]
        assert page.is_tiled and len(tf.series[0].levels) >= 3 and "XResolution" in page.tags
    (y0, y1, _, _), (_, _, x2, x3) = syn.tissue_boxes[0], syn.tissue_boxes[1]
    img, ins = generate_tile(0, 1, (y1 - y0, x3 - x2))  # the second generator tile, and its instance map
    np.testing.assert_array_equal(syn.image[y0:y1, x2:x3], img)
    np.testing.assert_array_equal(syn.instances[y0:y1, x2:x3] > 0, ins > 0)
    inside = np.zeros(syn.instances.shape, bool)
    for a, b, c, d in syn.tissue_boxes:
        inside[a:b, c:d] = True
    assert syn.instances[~inside].max() == 0 and len(np.unique(syn.instances)) - 1 == syn.instances.max()


MOSAIC_IDS = 4  # MoNuSeg test images in a 2 x 2 mosaic (~2.6k px square): seconds


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, data_dir):
    from histoseg.wsi.testslides import monuseg_mosaic

    root = data_dir / "monuseg"
    from histoseg.data.readers.monuseg import MoNuSegReader

    ids = MoNuSegReader(root).official_split()["test"][:MOSAIC_IDS]
    m = monuseg_mosaic(root, ids=ids, cols=2)
    path = m.write(tmp_path_factory.mktemp("mosaic") / "mosaic.tif", mpp=0.25)
    return m, path, root


@pytest.mark.data
def test_monuseg_mosaic_slide_is_a_tiled_pyramid_with_mpp_and_known_mask(mosaic):
    from histoseg.data.readers.monuseg import MoNuSegReader

    m, path, root = mosaic
    assert is_slide(path)
    with tifffile.TiffFile(path) as tf:
        assert tf.series[0].levels[0].pages[0].is_tiled and len(tf.series[0].levels) >= 3
    reader = MoNuSegReader(root)
    mask = m.render_mask()
    with Slide(path) as s:
        assert s.shape == m.shape == mask.shape and s.mpp == pytest.approx(0.25)
        for y0, y1, x0, x1, k in m.boxes():  # each cell holds its MoNuSeg image (lossless) and mask
            sample = reader.read(m.names[k])
            np.testing.assert_array_equal(s.read_region(y0, x0, (y1 - y0, x1 - x0)), sample.image)
            np.testing.assert_array_equal(mask[y0:y1, x0:x1], sample.mask > 0)
        gap = s.read_region(0, 0, (m.margin, m.shape[1]))  # the blank margin is glass
        assert gap.min() > 200 and mask[: m.margin].max() == 0
    assert len(m.boxes()) == MOSAIC_IDS and mask.mean() > 0.05


@pytest.mark.data
def test_whole_slide_dice_on_the_mosaic_agrees_with_per_image_evaluation(tmp_path, mosaic):
    """``histoseg-predict`` on the mosaic slide (tissue detection, streamed tiles, streamed post-processing, mask
    TIFF) scores the same pooled Dice against the MoNuSeg masks as the model's own per-image evaluation
    (``SegmentationTask.test_step``) of the same images. The 5x5 'dark is nucleus' model sees across tile and
    image borders, so the two differ a little at the cell borders (blank glass vs padding)."""
    from torchmetrics.functional.classification import binary_stat_scores

    from histoseg.data.readers.monuseg import MoNuSegReader
    from histoseg.tasks.predict import predict
    from tests.helpers_ckpt import BoxNet  # noqa: F401  (the net_config target)

    m, path, root = mosaic
    box = {"_target_": "tests.helpers_ckpt.BoxNet", "_partial_": True, "k": 5}
    post = {"instances": "connected", "min_size": 10}
    ckpt = write_checkpoint(tmp_path / "box.ckpt", 2, dark_is_nucleus, post, mpp=0.25, dataset="monuseg",
                            net_config=box, inference={"tile_shape": [256, 256], "overlap": 0.25, "batch_size": 8})
    cfg = compose_cfg(tmp_path / "out", f"ckpt_path={ckpt}", f"input={path}", "wsi.num_workers=0", "progress=false",
                      "wsi.block_shape=[1024,1024]", base=[], config_name="predict")
    summary, obj = predict(cfg)
    assert summary["n_ok"] == 1, summary
    out = Path(cfg.wsi.output_dir) / "mosaic"
    for f in ("mosaic_mask.ome.tif", "mosaic.geojson", "summary.csv", "mosaic_overlay.png"):  # the four outputs
        assert (out / f).is_file(), f
    with Slide(out / "mosaic_mask.ome.tif") as s:
        pred = s.read_region(0, 0, s.shape)[..., 0] > 0
    truth = m.render_mask()

    def stats(p, t):
        return binary_stat_scores(torch.from_numpy(np.ascontiguousarray(p)).long().reshape(-1),
                                  torch.from_numpy(np.ascontiguousarray(t)).long().reshape(-1)).numpy()

    tp, fp, _, fn, _ = stats(pred, truth)
    slide_dice = 2 * tp / (2 * tp + fp + fn)

    task, reader, total, differ = restore(ckpt).eval(), MoNuSegReader(root), np.zeros(5, np.int64), []
    for y0, y1, x0, x1, k in m.boxes():
        sample = reader.read(m.names[k])
        batch = {"image": torch.from_numpy(sample.image.transpose(2, 0, 1).copy()).float()[None] / 255,
                 "mask": torch.from_numpy((sample.mask > 0).astype(np.int64))[None], "case_id": [m.names[k]]}
        labels = task.test_step(batch, k)["labels"]
        total += stats(labels > 0, sample.mask > 0)
        np.testing.assert_array_equal(truth[y0:y1, x0:x1], sample.mask > 0)
        differ.append(float(((labels > 0) != pred[y0:y1, x0:x1]).mean()))  # pixel by pixel, in place
    tp, fp, _, fn, _ = total
    image_dice = 2 * tp / (2 * tp + fp + fn)
    assert 0.2 < image_dice < 0.95  # a real, imperfect segmentation (not all or nothing)
    assert abs(slide_dice - image_dice) <= 0.01, (slide_dice, image_dice)
    assert max(differ) < 0.01, differ  # the same pixels, aligned (a 1 px shift differs on a few %)
    assert (pred & (truth == 0)).sum() <= fp + 0.01 * truth.sum()  # no nuclei invented on the blank glass either
