"""Metrics against hand-computed examples."""
import numpy as np
import pytest
import torch

from histoseg.metrics import SegMetrics, aji, aji_plus, image_scores, instance_scores, panoptic_quality


def test_binary_image_scores_by_hand():
    t = np.array([[1, 1, 0, 0]] * 2)
    p = np.array([[1, 0, 1, 0]] * 2)
    s = image_scores(p, t, 2)
    # tp=2 fp=2 fn=2 tn=2
    assert s["dice"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
    assert s["iou"] == pytest.approx(2 / 6)
    assert s["acc"] == pytest.approx(0.5)


def test_multiclass_scores_average_foreground_only():
    t = np.array([0, 1, 1, 2, 2, 3])
    p = np.array([0, 1, 2, 2, 2, 0])
    s = image_scores(p, t, 4)
    assert s["dice_1"] == pytest.approx(2 / 3)  # tp1 fn1
    assert s["dice_2"] == pytest.approx(4 / 5)  # tp2 fp1
    assert s["dice_3"] == pytest.approx(0.0)
    assert s["dice"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert s["acc"] == pytest.approx(4 / 6)


def test_empty_prediction_of_empty_target_is_perfect():
    z = np.zeros((5, 5), int)
    assert image_scores(z, z, 2)["dice"] == 1.0


def test_online_metrics_match_per_image_scores_on_pooled_pixels():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randint(0, 4, (2, 16, 16), generator=g), torch.randint(0, 4, (2, 16, 16), generator=g)
    m = SegMetrics(4)
    m.update(p, t)
    on = m.compute()
    off = image_scores(p.numpy(), t.numpy(), 4)
    assert float(on["dice"]) == pytest.approx(off["dice"], abs=1e-6)
    assert float(on["iou"]) == pytest.approx(off["iou"], abs=1e-6)
    assert float(on["acc"]) == pytest.approx(off["acc"], abs=1e-6)


def two_squares():
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2  # 16 px
    return gt


def test_instance_metrics_gt_vs_gt_are_one():
    gt = two_squares()
    s = instance_scores(gt, gt)
    for k in ("aji", "aji_plus", "pq", "dq", "sq", "obj_f1"):
        assert s[k] == pytest.approx(1.0, abs=1e-5), k


def test_aji_and_pq_by_hand():
    gt = two_squares()
    pred = np.zeros_like(gt)
    pred[0:4, 0:2] = 5  # covers half of nucleus 1 (8 px), IoU 0.5
    pred[8:10, 0:2] = 7  # false positive, 4 px
    # AJI: gt1 paired with pred5: inter 8, union 16; gt2 unpaired -> +16; pred7 unpaired -> +4
    assert aji(gt, pred) == pytest.approx(8 / (16 + 16 + 4))
    assert aji_plus(gt, pred) == pytest.approx(8 / (16 + 16 + 4))
    pq = panoptic_quality(gt, pred)
    # IoU 0.5 is not > 0.5: no match; tp 0 fp 2 fn 2
    assert pq["tp"] == 0 and pq["fp"] == 2 and pq["fn"] == 2 and pq["pq"] == 0.0
    pred[0:4, 2:3] = 5  # now 12/16 = 0.75
    pq = panoptic_quality(gt, pred)
    assert pq["tp"] == 1 and pq["fp"] == 1 and pq["fn"] == 1
    assert pq["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert pq["sq"] == pytest.approx(0.75, abs=1e-5)
    assert pq["pq"] == pytest.approx(0.375, abs=1e-5)


def test_aji_plus_does_not_reuse_a_merged_prediction():
    gt = two_squares()
    pred = (gt > 0).astype(int)  # one prediction covering both nuclei
    # AJI pairs both nuclei with the merged object: C = 16 + 16, U = 32 + 32
    assert aji(gt, pred) == pytest.approx(0.5)
    # AJI+ pairs one nucleus only: C = 16, U = 32 (pair) + 16 (unpaired gt)
    assert aji_plus(gt, pred) == pytest.approx(16 / 48)
