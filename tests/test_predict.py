"""histoseg-predict: folders / globs / single files, corrupt inputs, known morphometry, colour-coded masks."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.draw import disk

from histoseg.analysis.palette import CELLULARITY_PALETTE, decode
from histoseg.data.io import DataError, write_image
from histoseg.tasks.predict import output_names, predict, resolve_inputs, run
from histoseg.tasks.utils import ConfigError
from tests.conftest import compose_cfg
from tests.helpers_ckpt import dark_is_nucleus, nearest_palette_colour, write_checkpoint

PINK, PURPLE = (232, 170, 205), (72, 38, 125)
MPP = 0.5


def nuclei_image(centres, radius, shape=(100, 160)):
    img = np.full((*shape, 3), PINK, np.uint8)
    for c in centres:
        img[disk(c, radius, shape=shape)] = PURPLE
    return img


@pytest.fixture
def binary_ckpt(tmp_path):
    return write_checkpoint(tmp_path / "binary.ckpt", 2, dark_is_nucleus, {"instances": "connected"}, mpp=MPP)


def predict_cfg(tmp_path, ckpt, inp, *overrides):
    return compose_cfg(tmp_path / "out", f"ckpt_path={ckpt}", f"input={inp}", "progress=false", *overrides,
                       base=[], config_name="predict")


def read_report(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_folder_with_a_corrupt_file_completes_the_rest_and_names_it(tmp_path, binary_ckpt, caplog):
    inp = tmp_path / "in"
    write_image(inp / "a.png", nuclei_image([(30, 30), (60, 100)], 8))
    write_image(inp / "b.jpg", nuclei_image([(50, 50)], 8))
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (inp / "notes.txt").write_text("not an image, not an image extension: ignored")
    cfg = predict_cfg(tmp_path, binary_ckpt, inp)
    summary, obj = predict(cfg)
    out = tmp_path / "out"
    assert summary["n_images"] == 3 and summary["n_ok"] == 2 and summary["n_errors"] == 1
    assert summary["errors"][0][0].endswith("broken.png")
    assert any("broken.png" in r.getMessage() and "cannot decode" in r.getMessage() for r in caplog.records)
    rows = {r["image"]: r for r in read_report(out / "report.csv")}
    assert set(rows) == {"a", "b", "broken"}
    assert rows["broken"]["status"] == "error" and "broken.png" in rows["broken"]["error"]
    assert rows["a"]["status"] == rows["b"]["status"] == "ok" and rows["a"]["error"] == ""
    assert int(rows["a"]["nuclei_count"]) == 2 and int(rows["b"]["nuclei_count"]) == 1
    for name in ("a", "b"):
        for sub in ("masks", "overlays", "instances"):
            assert (out / sub / f"{name}.png").is_file()
    assert not (out / "masks" / "broken.png").exists()
    assert not [p for p in out.rglob("*.tmp")], "temporary files left behind"
    # the console entry exits non-zero after finishing the others
    with pytest.raises(SystemExit) as e:
        run(predict_cfg(tmp_path, binary_ckpt, inp))
    assert e.value.code == 1


def test_morphometry_report_has_the_known_answers(tmp_path, binary_ckpt):
    r = 10
    img = nuclei_image([(30, 40), (65, 110)], r)
    write_image(tmp_path / "two.png", img)
    summary, obj = predict(predict_cfg(tmp_path, binary_ckpt, tmp_path / "two.png"))
    row = read_report(tmp_path / "out" / "report.csv")[0]
    disc_px = int((nuclei_image([(50, 50)], r)[..., 0] == PURPLE[0]).sum())  # a digital disc's exact area
    assert int(row["nuclei_count"]) == 2
    assert float(row["area_mean_px"]) == pytest.approx(disc_px)
    assert float(row["area_mean_um2"]) == pytest.approx(disc_px * MPP**2, rel=1e-5)
    assert float(row["density_per_mm2"]) == pytest.approx(2 / (100 * 160 * MPP**2 * 1e-6), rel=1e-5)
    assert float(row["eccentricity_mean"]) < 0.05 and float(row["solidity_mean"]) > 0.95
    assert float(row["mpp"]) == MPP  # from the checkpoint
    assert row["cellularity_pct"] == ""  # binary model
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "two.png"), cv2.IMREAD_UNCHANGED)
    assert mask.dtype == np.uint8 and mask.ndim == 2 and set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask > 0, img[..., 0] == PURPLE[0])
    inst = cv2.imread(str(tmp_path / "out" / "instances" / "two.png"), cv2.IMREAD_UNCHANGED)
    assert inst.dtype == np.uint16 and set(np.unique(inst)) == {0, 1, 2}
    overlay = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "overlays" / "two.png")), cv2.COLOR_BGR2RGB)
    green = (overlay == (0, 255, 0)).all(-1)
    assert 0 < green.sum() < 0.2 * (mask > 0).sum()  # outlines only, on the nuclei
    assert (mask[green] > 0).all()


def test_stain_norm_moves_a_pale_image_to_the_reference_colours(tmp_path, binary_ckpt):
    """A faintly stained copy of an image: the model (dark = nucleus) misses every nucleus; with
    ``inference.stain_norm=reinhard`` and the well-stained image's statistics as the reference it finds them."""
    import json

    from histoseg.data.stain import reinhard_reference

    centres, r = [(30, 40), (65, 110)], 10
    well = nuclei_image(centres, r)
    pale = well.copy()
    pale[(well == PURPLE).all(-1)] = (165, 140, 200)
    pale[(well == PINK).all(-1)] = (246, 226, 240)
    write_image(tmp_path / "in" / "pale.png", pale)
    (tmp_path / "ref.json").write_text(json.dumps(reinhard_reference([well])))
    predict(predict_cfg(tmp_path, binary_ckpt, tmp_path / "in"))
    assert int(read_report(tmp_path / "out" / "report.csv")[0]["nuclei_count"]) == 0
    with pytest.raises(ConfigError, match="stores no stain reference.*stain_ref_from"):
        predict(predict_cfg(tmp_path, binary_ckpt, tmp_path / "in", "inference.stain_norm=reinhard"))
    predict(predict_cfg(tmp_path, binary_ckpt, tmp_path / "in", "inference.stain_norm=reinhard",
                        f"stain_ref_from={tmp_path / 'ref.json'}"))
    assert int(read_report(tmp_path / "out" / "report.csv")[0]["nuclei_count"]) == 2
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "pale.png"), cv2.IMREAD_UNCHANGED)
    assert ((mask > 0) == (well == PURPLE).all(-1)).mean() > 0.99
    (tmp_path / "in" / "slide.svs").write_bytes(b"a slide by its extension")
    with pytest.raises(ConfigError, match=r"not implemented for whole slides \(1 in input="):
        predict(predict_cfg(tmp_path, binary_ckpt, tmp_path / "in", "inference.stain_norm=reinhard",
                            f"stain_ref_from={tmp_path / 'ref.json'}"))
    (tmp_path / "bad.json").write_text(json.dumps({"stain_ref": {"method": "reinhard", "mean": [1, 2, 3]}}))
    with pytest.raises(ConfigError, match=r"stain_ref_from=.*bad\.json: .*'std'"):
        predict(predict_cfg(tmp_path, binary_ckpt, tmp_path / "in", "inference.stain_norm=reinhard",
                            f"stain_ref_from={tmp_path / 'bad.json'}"))


def test_mpp_option_overrides_and_is_required_when_the_checkpoint_has_none(tmp_path):
    ckpt = write_checkpoint(tmp_path / "nompp.ckpt", 2, dark_is_nucleus, {"instances": "connected"}, mpp=None)
    write_image(tmp_path / "x.png", nuclei_image([(50, 50)], 8))
    with pytest.raises(ConfigError, match=r"mpp is unknown: .*nompp\.ckpt.*pass mpp="):
        predict(predict_cfg(tmp_path, ckpt, tmp_path / "x.png"))
    assert not (tmp_path / "out" / "report.csv").exists()
    predict(predict_cfg(tmp_path, ckpt, tmp_path / "x.png", "mpp=0.25"))
    row = read_report(tmp_path / "out" / "report.csv")[0]
    assert float(row["density_per_mm2"]) == pytest.approx(1 / (100 * 160 * 0.25**2 * 1e-6), rel=1e-5)


def test_four_class_model_writes_colour_masks_and_cellularity(tmp_path):
    ckpt = write_checkpoint(tmp_path / "cell.ckpt", 4, nearest_palette_colour,
                            {"instances": "connected", "nuclei_classes": [1, 2]}, mpp=0.5)
    labels = np.zeros((90, 120), np.uint8)
    labels[disk((30, 30), 12)] = 1   # tumour
    labels[disk((60, 90), 12)] = 1   # tumour
    labels[disk((30, 90), 12)] = 2   # non-tumour
    ring = np.zeros_like(labels, bool)
    ring[disk((60, 30), 10)] = True
    labels[ring] = 3                 # boundary: counts as neither
    write_image(tmp_path / "cells" / "c.png", CELLULARITY_PALETTE[labels])
    predict(predict_cfg(tmp_path, ckpt, tmp_path / "cells"))
    row = read_report(tmp_path / "out" / "report.csv")[0]
    expected = 100 * (labels == 1).sum() / np.isin(labels, [1, 2]).sum()
    assert float(row["cellularity_pct"]) == pytest.approx(expected, abs=1e-3)
    assert abs(expected - 200 / 3) < 1  # two of three equal discs are tumour
    assert int(row["nuclei_count"]) == 3  # tumour + non-tumour nuclei (nuclei_classes)
    mask = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "masks" / "c.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decode(mask), labels)  # red / green / blue / black encoding
    with pytest.raises(ConfigError, match=r"report: tumour_classes \[3\] must be a non-empty subset"):
        predict(predict_cfg(tmp_path, ckpt, tmp_path / "cells", "report.tumour_classes=[3]"))


def test_glob_and_name_collisions(tmp_path, binary_ckpt):
    for sub in ("s1", "s2"):
        write_image(tmp_path / "scans" / sub / "x.png", nuclei_image([(50, 50)], 6))
    files = resolve_inputs(str(tmp_path / "scans" / "**" / "*.png"), [".png"])
    assert len(files) == 2
    assert output_names(files) == ["s1_x", "s2_x"]
    assert output_names([Path("d/x.png"), Path("d/x.jpg")]) == ["x_png", "x_jpg"]
    summary, _ = predict(predict_cfg(tmp_path, binary_ckpt, f"'{tmp_path}/scans/**/*.png'"))
    assert summary["n_ok"] == 2
    assert {p.name for p in (tmp_path / "out" / "masks").iterdir()} == {"s1_x.png", "s2_x.png"}


def test_missing_or_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nothere: no such file or folder"):
        resolve_inputs(str(tmp_path / "nothere"), [".png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images with extensions"):
        resolve_inputs(str(tmp_path / "empty"), [".png"])
    with pytest.raises(DataError, match="matches no files"):
        resolve_inputs(str(tmp_path / "*.png"), [".png"])


def test_missing_ckpt_path_is_named_before_any_work(tmp_path):
    cfg = compose_cfg(tmp_path, "input=x.png", base=[], config_name="predict")
    with pytest.raises(ConfigError, match=r"missing mandatory value\(s\): ckpt_path"):
        predict(cfg)


def test_ckpt_is_an_alias_of_ckpt_path(tmp_path, binary_ckpt):
    """The short form of the issue's command, ``histoseg-predict ckpt=... input=...``, works; two different
    checkpoints are refused instead of silently picking one."""
    write_image(tmp_path / "in" / "a.png", nuclei_image([(30, 30)], 8))
    cfg = compose_cfg(tmp_path / "out", f"ckpt={binary_ckpt}", f"input={tmp_path / 'in'}", "progress=false",
                      base=[], config_name="predict")
    summary, _ = predict(cfg)
    assert summary["n_ok"] == 1 and (tmp_path / "out" / "report.csv").is_file()
    cfg = predict_cfg(tmp_path, binary_ckpt, tmp_path / "in", f"ckpt={tmp_path / 'other.ckpt'}")
    with pytest.raises(ConfigError, match="disagree"):
        predict(cfg)


@pytest.mark.slow  # a fresh interpreter importing torch + lightning: ~10 s; run() is tested in-process above
def test_console_entry_exits_1_and_names_the_bad_file(tmp_path, binary_ckpt):
    """``histoseg-predict`` as the console script runs it (Hydra main), without reinstalling the package."""
    import subprocess
    import sys

    inp = tmp_path / "in"
    write_image(inp / "good.png", nuclei_image([(50, 50)], 8))
    (inp / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", "from histoseg.cli import predict_main; predict_main()", f"ckpt_path={binary_ckpt}",
           f"input={inp}", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "bad.jpg: cannot decode image" in r.stdout + r.stderr
    rows = {row["image"]: row for row in read_report(tmp_path / "run" / "report.csv")}
    assert rows["good"]["status"] == "ok" and rows["bad"]["status"] == "error"
    assert (tmp_path / "run" / "predict.log").is_file()


def test_instance_maps_beyond_16_bits_go_to_tiff(tmp_path):
    import tifffile

    from histoseg.tasks.predict import write_instances

    small = np.arange(12, dtype=np.int32).reshape(3, 4)
    p = write_instances(tmp_path, "slide.v2", small)  # a dot in the name is kept
    assert p.name == "slide.v2.png"
    np.testing.assert_array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), small)
    big = small + 70000
    p = write_instances(tmp_path, "big", big)
    assert p.name == "big.tif"
    np.testing.assert_array_equal(tifffile.imread(p), big)


def test_a_checkpoint_at_half_working_scale_predicts_and_reports_in_input_pixels(tmp_path):
    """A checkpoint stored with ``inference.scale=0.5``: histoseg-predict runs the net on the half-size image and
    writes masks, instances and morphometry at the input's size. One-pixel stripes (purple / grey rows) show the
    scale is applied: at full scale only the purple rows are dark enough, at half scale the rows average to a dark
    enough grey, so the whole block is foreground."""
    from scipy import ndimage as ndi

    r, grey = 10, (180, 180, 180)
    img = nuclei_image([(30, 40), (64, 60)], r, shape=(100, 160))
    img[20:80:2, 100:150] = PURPLE
    img[21:80:2, 100:150] = grey
    write_image(tmp_path / "in" / "x.png", img)
    masks = {}
    for scale in (1.0, 0.5):
        ckpt = write_checkpoint(tmp_path / f"s{scale}.ckpt", 2, dark_is_nucleus, {"instances": "connected"}, mpp=MPP,
                                inference={"tile_shape": [64, 64], "overlap": 0.25, "scale": scale})
        summary, _ = predict(predict_cfg(tmp_path / f"s{scale}", ckpt, tmp_path / "in"))
        out = tmp_path / f"s{scale}" / "out"
        assert summary["n_ok"] == 1
        masks[scale] = cv2.imread(str(out / "masks" / "x.png"), cv2.IMREAD_UNCHANGED) > 0
        assert masks[scale].shape == (100, 160)
        inst = cv2.imread(str(out / "instances" / "x.png"), cv2.IMREAD_UNCHANGED)
        assert inst.shape == (100, 160)
        row = read_report(out / "report.csv")[0]
        n = 2 + (30 if scale == 1.0 else 1)  # each purple row is an object at full scale, the block one at half
        assert int(row["nuclei_count"]) == n and float(row["mpp"]) == MPP
        assert float(row["density_per_mm2"]) == pytest.approx(n / (100 * 160 * MPP**2 * 1e-6), rel=1e-5)
        # the two discs keep their place and (about) their area in input pixels
        for c in [(30, 40), (64, 60)]:
            lab = inst[c]
            assert lab > 0
            cy, cx = ndi.center_of_mass(inst == lab)
            assert abs(cy - c[0]) < 0.75 and abs(cx - c[1]) < 0.75
            assert abs(int((inst == lab).sum()) - np.pi * r * r) < 0.1 * np.pi * r * r
    block = (slice(20, 80), slice(100, 150))
    np.testing.assert_array_equal(masks[1.0][block], np.broadcast_to(
        (np.arange(20, 80) % 2 == 0)[:, None], (60, 50)))
    assert masks[0.5][21:79, 101:149].all()
