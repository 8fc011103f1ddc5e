"""Tiled inference equals a whole-image pass (pointwise model) and MONAI's sliding window (any model)."""
import numpy as np
import pytest
import torch

from histoseg.inference import gaussian_weights, tile_starts, tiled_predict


def pointwise_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Tanh(), torch.nn.Conv2d(8, 2, 1)).eval()


def conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 3, padding=1)).eval()


def test_tile_starts_cover_and_end_flush():
    s = tile_starts(1000, 256, 0.25)
    assert s[0] == 0 and s[-1] == 1000 - 256
    assert all(b - a <= 192 for a, b in zip(s, s[1:]))


def test_gaussian_sigma_is_tile_over_8():
    g = gaussian_weights((64, 64))
    x = torch.arange(64) - 31.5
    expected = torch.exp(-(x**2) / (2 * 8.0**2))
    row, exp = g[31] / g[31].max(), expected / expected.max()
    keep = exp > 2e-3
    torch.testing.assert_close(row[keep], exp[keep], atol=1e-5, rtol=0)
    assert g.min().item() >= 1e-3 - 1e-9  # floored, never zero (weights are divided by)


@pytest.mark.parametrize("shape", [(300, 417), (100, 90), (257, 600)])
def test_tiled_predict_equals_forward_for_a_pointwise_model(shape):
    net = pointwise_net()
    img = torch.rand(3, *shape)
    out = tiled_predict(img, net, (128, 128), 0.5, batch_size=3, device="cpu")
    torch.testing.assert_close(out, net(img[None])[0], atol=1e-5, rtol=0)


def test_tiled_predict_equals_forward_for_one_tile():
    net = conv_net()
    img = torch.rand(3, 128, 128)
    torch.testing.assert_close(tiled_predict(img, net, (128, 128), 0.25, device="cpu"), net(img[None])[0])


@pytest.mark.parametrize("shape,tile,overlap,bs", [((300, 417), 128, 0.25, 4), ((100, 90), 128, 0.5, 2),
                                                     ((257, 600), 64, 0.3, 1), ((512, 512), 96, 0.5, 16)])
def test_matches_monai_sliding_window_gaussian(shape, tile, overlap, bs):
    monai_inf = pytest.importorskip("monai.inferers")
    net = conv_net()
    img = torch.rand(1, 3, *shape)
    ours = tiled_predict(img, net, (tile, tile), overlap, batch_size=bs, device="cpu", pad_mode="constant")
    ref = monai_inf.sliding_window_inference(img, (tile, tile), bs, net, overlap=overlap, mode="gaussian",
                                             padding_mode="constant")[0]
    assert (ours - ref).abs().max().item() < 1e-5


def test_numpy_uint8_input_and_memmap_output(tmp_path):
    net = pointwise_net()
    img = (np.random.default_rng(0).random((200, 150, 3)) * 255).astype(np.uint8)
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(2, 200, 150))
    res = tiled_predict(img, net, (64, 64), 0.25, device="cpu", out=out)
    assert res is out
    ref = net(torch.from_numpy(img.transpose(2, 0, 1)).float()[None] / 255)[0].detach().numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_tta_of_an_equivariant_model_changes_nothing():
    net = pointwise_net()
    img = torch.rand(3, 100, 120)
    a = tiled_predict(img, net, (64, 64), 0.25, device="cpu")
    for mode in ("flip", "d4"):
        torch.testing.assert_close(tiled_predict(img, net, (64, 64), 0.25, device="cpu", tta=mode), a, atol=1e-5, rtol=0)


def test_out_scale_for_upsampling_predictors():
    up = torch.nn.Upsample(scale_factor=2, mode="nearest")
    img = torch.rand(3, 70, 90)
    out = tiled_predict(img, up, (32, 32), 0.25, out_scale=2, device="cpu")
    torch.testing.assert_close(out, up(img[None])[0], atol=1e-6, rtol=0)
