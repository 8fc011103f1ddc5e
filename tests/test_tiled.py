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


# ---------------------------------------------------------------------- hooks used by whole-slide inference
@pytest.mark.parametrize("stripe_width", [None, 100])
def test_regions_of_the_grid_reproduce_the_whole_image_run(stripe_width):
    """Regions (also cut into vertical stripes) write exactly the whole-image values; ``tile_batches`` plans the
    tiles a region run reads."""
    from histoseg.inference import tile_batches

    net = conv_net()
    img = torch.rand(3, 300, 417)
    kw = dict(batch_size=5, device="cpu", stripe_width=stripe_width)
    full = tiled_predict(img, net, (64, 64), 0.25, batch_size=5, device="cpu", stripe_width=None)
    out = np.full((2, 300, 417), np.nan, np.float32)
    for y0 in range(0, 300, 128):
        for x0 in range(0, 417, 160):
            region = (y0, min(y0 + 128, 300), x0, min(x0 + 160, 417))
            assert tiled_predict(img, net, (64, 64), 0.25, out=out, region=region, **kw) is out
    assert np.abs(out - full.numpy()).max() < 1e-5  # every pixel written, equal to the whole-image run
    part = tiled_predict(img, net, (64, 64), 0.25, region=(50, 170, 100, 290), **kw)
    torch.testing.assert_close(part, full[:, 50:170, 100:290], atol=1e-5, rtol=0)
    # a region's tiles are those of the whole grid that overlap it; stripes re-read the tiles on their borders
    tiles = [t for g in tile_batches((300, 417), (64, 64), 0.25, 5, region=(50, 170, 100, 290),
                                     stripe_width=stripe_width) for t in g]
    assert min(y for y, _ in tiles) < 50 and max(y for y, _ in tiles) + 64 > 169
    assert min(x for _, x in tiles) < 100 and max(x for _, x in tiles) + 64 > 289
    assert (len(set(tiles)) == len(tiles)) == (stripe_width is None)
    seen = []

    def reader(batches):
        for g in batches:
            seen.append(g)
            yield torch.stack([img[:, y : y + 64, x : x + 64] for y, x in g])

    got = tiled_predict(img, net, (64, 64), 0.25, region=(50, 170, 100, 290), read_batches=reader, **kw)
    torch.testing.assert_close(got, part, atol=0, rtol=0)
    assert [t for g in seen for t in g] == tiles


def test_sparse_tile_filter_read_batches_and_empty_value():
    from histoseg.inference import tile_batches

    net = conv_net()
    img = (np.random.default_rng(1).random((400, 300, 3)) * 255).astype(np.uint8)
    keep = lambda y, x, th, tw: x == 0 or y == 0  # noqa: E731  (one tile per row: batches would span many rows)
    kw = dict(tile_shape=(64, 64), overlap=0.25, device="cpu", tile_filter=keep, empty_value=float("nan"))
    a = tiled_predict(img, net, batch_size=8, **kw).numpy()
    b = tiled_predict(img, net, batch_size=1, **kw).numpy()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    cov = ~np.isnan(a)
    assert cov[:, :64].all() and cov[:, :, :64].all() and not cov[:, 100:, 100:].any()
    assert np.abs(a[cov] - b[cov]).max() < 1e-5  # the batch size changes nothing

    seen = []

    def reader(batches):  # what a DataLoader would do: read the positions asked for, in order
        for g in batches:
            seen.append(g)
            yield torch.stack([torch.from_numpy(img[y : y + 64, x : x + 64].transpose(2, 0, 1).copy()) for y, x in g])

    out = np.full((2, 400, 300), 7.0, np.float32)  # stale values: every pixel gets rewritten
    tiled_predict(img, net, batch_size=8, out=out, read_batches=reader, **kw)
    np.testing.assert_array_equal(np.isnan(out), ~cov)
    assert np.abs(out[cov] - a[cov]).max() < 1e-6
    assert seen == tile_batches(img.shape[:2], (64, 64), 0.25, 8, tile_filter=keep)
    with pytest.raises(ValueError, match="read_batches needs an image of at least one tile"):
        tiled_predict(img[:50], net, batch_size=8, read_batches=reader, **kw)


class HVOracle(torch.nn.Module):
    """A perfect HoVer-Net-style model: channel 0 of its input holds an instance map; it outputs a foreground
    logit and the exact (h, v) offset maps of whatever (flipped / rotated) view it is given."""

    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from histoseg.data.targets import hv_map

        inst = x[:, 0].round().long().numpy()
        hv = torch.stack([torch.from_numpy(hv_map(i)) for i in inst])
        return torch.cat([x[:, :1] * 2 - 1, hv], 1)


def nuclei_image(h: int = 48, w: int = 64) -> torch.Tensor:
    """Instance ids in channel 0: a few ellipses, none symmetric about the image's axes."""
    yy, xx = np.mgrid[0:h, 0:w]
    inst = np.zeros((h, w), np.float32)
    for i, (cy, cx, ry, rx) in enumerate([(10, 12, 6, 9), (30, 20, 8, 5), (20, 45, 5, 11), (38, 52, 7, 7)], 1):
        inst[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i
    return torch.from_numpy(np.stack([inst, np.zeros_like(inst), np.zeros_like(inst)]))


@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_tta_turns_hv_offset_vectors_back(mode):
    from histoseg.inference import with_tta

    x = nuclei_image()[None]
    net = HVOracle()
    ref = net(x)
    torch.testing.assert_close(with_tta(net, mode, vector_channels=(1, 2))(x), ref, atol=1e-6, rtol=0)
    # moving only the pixels back averages h with -h (and, under d4, h with +-v): the offsets wash out
    naive = with_tta(net, mode, vector_channels=None)(x)
    fg = x[0, 0] > 0
    assert naive[0, 1][fg].abs().mean() < 0.5 * ref[0, 1][fg].abs().mean()


def test_segmentation_task_tta_keeps_hv_heads_exact():
    from histoseg.models.modules.segmentation import SegmentationTask

    task = SegmentationTask(net=HVOracle(), num_classes=2, heads={"seg": 1, "hv": 2},
                            inference={"tile_shape": [48, 64], "overlap": 0.0, "batch_size": 1})
    assert task.vector_channels == (1, 2)
    img = nuclei_image()
    plain = task.predict_logits(img, tta="none")
    for mode in ("flip", "d4"):
        torch.testing.assert_close(task.predict_logits(img, tta=mode), plain, atol=1e-6, rtol=0)
    no_hv = SegmentationTask(net=pointwise_net(), num_classes=2, heads={"seg": 1, "dist": 1})
    assert no_hv.vector_channels is None
