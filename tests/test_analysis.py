"""Morphometry, cellularity, palette and figures on synthetic masks with known answers."""
import cv2
import numpy as np
import pytest
from skimage.draw import disk, ellipse

from histoseg.analysis import CELLULARITY_PALETTE, cellularity, colorize, nuclei_stats
from histoseg.analysis.figures import overlay_contours, panel_figure, training_curves
from histoseg.analysis.palette import decode


def two_discs(r=10, shape=(100, 200), ids=(3, 7)):
    """Two discs of radius ``r`` centred at 1/4 and 3/4 of the width."""
    m = np.zeros(shape, np.int32)
    h, w = shape
    m[disk((h // 2, w // 4), r)] = ids[0]
    m[disk((h // 2, 3 * w // 4), r)] = ids[1]
    return m


def test_two_discs_have_known_count_area_density_and_shape():
    m = two_discs(r=10)
    disc_px = int((m == 3).sum())
    assert abs(disc_px - np.pi * 10**2) < 0.03 * np.pi * 10**2  # a digital disc is close to pi r^2
    s = nuclei_stats(m, mpp=0.5)
    assert s["nuclei_count"] == 2  # non-contiguous ids (3, 7) are fine
    assert s["area_mean_px"] == s["area_median_px"] == disc_px
    assert s["area_mean_um2"] == pytest.approx(disc_px * 0.25)
    assert s["density_per_mm2"] == pytest.approx(2 / (100 * 200 * 0.25 * 1e-6))  # 400 nuclei / mm^2
    assert s["eccentricity_mean"] == pytest.approx(0.0, abs=1e-6)  # symmetric discs
    assert 0.95 < s["solidity_mean"] <= 1.0


def test_ellipse_eccentricity_and_mixed_areas():
    m = np.zeros((120, 120), np.int32)
    m[ellipse(60, 40, 20, 10)] = 1  # semi-axes 20 and 10: e = sqrt(1 - (10/20)^2) = 0.866
    m[disk((60, 100), 5)] = 2
    s = nuclei_stats(m, mpp=None)
    areas = sorted([(m == 1).sum(), (m == 2).sum()])
    assert s["area_median_px"] == pytest.approx(np.median(areas))
    assert s["eccentricity_mean"] == pytest.approx((0.866 + 0.0) / 2, abs=0.02)
    assert np.isnan(s["density_per_mm2"]) and np.isnan(s["area_mean_um2"])  # no mpp, no physical units


def test_empty_map_and_bad_input():
    s = nuclei_stats(np.zeros((50, 50), np.uint16), mpp=0.25)
    assert s["nuclei_count"] == 0 and s["density_per_mm2"] == 0.0 and np.isnan(s["area_mean_px"])
    with pytest.raises(ValueError, match="integer map"):
        nuclei_stats(np.zeros((5, 5), np.float32), 0.5)
    with pytest.raises(ValueError, match="mpp must be a positive"):
        nuclei_stats(np.zeros((5, 5), np.int32), 0.0)


def test_cellularity_of_a_four_class_mask_with_known_tumour_fraction():
    labels = np.zeros((100, 100), np.uint8)
    labels[:30, :50] = 1   # tumour: 1500 px
    labels[60:, :50] = 2   # non-tumour: 2000 px
    labels[30:60, :] = 3   # boundary: neither
    assert cellularity(labels, [1], [1, 2]) == pytest.approx(100 * 1500 / 3500)
    assert np.isnan(cellularity(np.zeros((4, 4), np.uint8), [1], [1, 2]))  # no nuclei
    with pytest.raises(ValueError, match="subset"):
        cellularity(labels, [3], [1, 2])


def test_palette_is_the_cellularity_order_and_round_trips():
    assert CELLULARITY_PALETTE.tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    rgb = colorize(labels, 4)
    assert rgb[0, 1].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [0, 0, 255]
    np.testing.assert_array_equal(decode(rgb), labels)
    assert colorize(np.array([[0, 1]]), 2).tolist() == [[0, 255]]
    with pytest.raises(ValueError, match="not in the palette"):
        decode(np.full((1, 1, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="holds value 5"):
        colorize(np.array([[5]]), 4)


def test_overlay_draws_outlines_only():
    img = np.full((100, 200, 3), 200, np.uint8)
    inst = two_discs()
    labels = (inst > 0).astype(np.uint8)
    ov = overlay_contours(img, labels, 2, inst)
    drawn = (ov != img).any(-1)
    assert (ov[drawn] == (0, 255, 0)).all()
    assert drawn.sum() < 0.3 * (inst > 0).sum() and not drawn[inst == 0].any()
    assert drawn[50, 41] and not drawn[50, 50]  # edge of the disc yes, centre no
    four = overlay_contours(img, np.where(inst == 3, 1, np.where(inst == 7, 2, 0)).astype(np.uint8), 4, inst)
    assert (four[50, 41] == (255, 0, 0)).all() and (four[50, 141] == (0, 255, 0)).all()


def test_panel_figure_is_a_valid_three_panel_png(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    gt = (two_discs(shape=(96, 128), r=8) > 0).astype(np.uint8)
    p = panel_figure(img, gt, gt, 2, tmp_path / "sub" / "case.png", title="case  Dice 1.000", instances=two_discs(shape=(96, 128), r=8))
    png = cv2.imread(str(p))
    assert png is not None and png.shape[1] > 2.5 * png.shape[0]
    two = panel_figure(img, None, gt, 2, tmp_path / "nogt.png")
    assert cv2.imread(str(two)).shape[1] < png.shape[1]
    assert not list(tmp_path.rglob("*.tmp"))


def test_training_curves_from_a_csv_log(tmp_path):
    csv = tmp_path / "metrics.csv"
    # the CSVLogger layout: step rows and epoch rows interleaved, empty cells for metrics not logged
    csv.write_text(
        "epoch,step,train/loss_step,train/loss_epoch,train/dice,val/dice,val/loss\n"
        "0,3,0.9,,,,\n0,3,,,,0.40,0.80\n0,3,,0.85,0.35,,\n"
        "1,7,0.6,,,,\n1,7,,,,0.60,0.55\n1,7,,0.58,0.55,,\n"
    )
    from histoseg.analysis.figures import epoch_table

    t = epoch_table(csv)
    assert t["val/dice"].tolist() == [0.40, 0.60] and t["train/loss_epoch"].tolist() == [0.85, 0.58]
    out = training_curves(csv, tmp_path / "curves.png")
    assert cv2.imread(str(out)) is not None
    (tmp_path / "bad.csv").write_text("epoch,step,lr\n0,1,0.1\n")
    with pytest.raises(ValueError, match="bad.csv: no per-epoch loss or dice"):
        training_curves(tmp_path / "bad.csv", tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
