"""PSNR / SSIM helpers for super-resolution outputs."""
import math

import numpy as np
import pytest
import torch

from histoseg.metrics.image import DEFAULT_MAX_DB, image_quality, psnr, rgb_to_y, ssim


def test_identical_images_give_the_documented_cap_and_ssim_one():
    x = torch.rand(2, 3, 32, 32)
    assert psnr(x, x).tolist() == [DEFAULT_MAX_DB, DEFAULT_MAX_DB]
    assert math.isinf(float(psnr(x, x, max_db=float("inf"))[0]))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))


def test_psnr_matches_its_definition_per_image():
    torch.manual_seed(0)
    t = torch.rand(2, 3, 40, 40) * 0.8 + 0.1
    p = t.clone()
    p[0] += 0.01  # MSE 1e-4 -> 40 dB
    p[1] += torch.randn(3, 40, 40) * 0.05
    got = psnr(p, t)
    mse1 = float(((p[1] - t[1]) ** 2).mean())
    assert float(got[0]) == pytest.approx(40.0, abs=1e-3)
    assert float(got[1]) == pytest.approx(10 * math.log10(1 / mse1), abs=1e-3)
    assert float(ssim(p, t)[1]) < float(ssim(p, t)[0]) < 1.0


def test_uint8_arrays_and_y_channel():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)
    q = image_quality(b, a)
    assert set(q) == {"psnr", "ssim"} and 35 < q["psnr"] < 45 and q["ssim"] > 0.95
    y = rgb_to_y(torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(y, torch.full((1, 1, 2, 2), 235 / 255))  # BT.601 white = 235
    assert image_quality(b, a, y_channel=True)["psnr"] != q["psnr"]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.rand(3, 8, 8), torch.rand(3, 8, 9))
