"""Reinhard stain normalisation (histoseg.data.stain) and its use by the task's whole-image prediction."""
import cv2
import numpy as np
import pytest
import torch
from skimage.draw import disk

from histoseg.data.stain import (
    check_method,
    check_reference,
    lab_stats,
    reinhard_normalize,
    reinhard_reference,
    to_lab,
)


def he_like(seed: int = 0, shape=(120, 160)) -> np.ndarray:
    """Pink stroma with purple nuclei and some texture (colours well inside the RGB gamut)."""
    rng = np.random.default_rng(seed)
    img = np.empty((*shape, 3), np.float32)
    img[:] = (0.85, 0.62, 0.76)
    for _ in range(25):
        c = rng.integers(8, min(shape) - 8, 2)
        img[disk(tuple(c), int(rng.integers(4, 9)), shape=shape)] = (0.35, 0.2, 0.5)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def lab_affine(image: np.ndarray, scale, shift) -> np.ndarray:
    """The image with each L*a*b* channel scaled and shifted (a stain / scanner change Reinhard undoes)."""
    lab = to_lab(image) * np.asarray(scale, np.float32) + np.asarray(shift, np.float32)
    return np.round(np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB), 0, 1) * 255).astype(np.uint8)


def test_normalised_image_has_the_reference_statistics():
    ref = reinhard_reference([he_like(1)])
    out = reinhard_normalize(lab_affine(he_like(2), (0.9, 0.8, 1.1), (4.0, -5.0, 3.0)), ref)
    mean, std = lab_stats(out)
    np.testing.assert_allclose(mean, ref["mean"], atol=0.6)
    np.testing.assert_allclose(std, ref["std"], rtol=0.03)
    assert out.dtype == np.uint8 and out.shape == (120, 160, 3)


def test_a_colour_shifted_copy_normalises_back_to_the_original():
    """Reinhard removes any per-channel L*a*b* affine change: the image and its re-stained copy become one."""
    a = he_like(3)
    ref = reinhard_reference([he_like(4), he_like(5)])
    b = lab_affine(a, (0.85, 1.2, 0.9), (-6.0, 4.0, -3.0))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10  # the change is visible
    na, nb = reinhard_normalize(a, ref).astype(int), reinhard_normalize(b, ref).astype(int)
    assert np.abs(na - nb).mean() < 1.5 and np.percentile(np.abs(na - nb), 99) <= 4


def test_an_image_normalised_to_its_own_statistics_is_unchanged():
    a = he_like(6)
    out = reinhard_normalize(a, reinhard_reference([a], step=1))
    assert np.abs(out.astype(int) - a.astype(int)).max() <= 1


def test_float_input_stays_float_in_range_and_matches_uint8():
    a = he_like(7)
    ref = reinhard_reference([he_like(8)])
    f = reinhard_normalize(a.astype(np.float32) / 255, ref)
    assert f.dtype == np.float32 and 0 <= f.min() and f.max() <= 1
    assert np.abs(np.round(f * 255) - reinhard_normalize(a, ref)).max() <= 1


def test_reference_pools_pixels_over_images():
    a, b = he_like(9, (60, 80)), he_like(10, (120, 80))
    ref = reinhard_reference([a, b], step=1)
    lab = np.concatenate([to_lab(a).reshape(-1, 3), to_lab(b).reshape(-1, 3)]).astype(np.float64)
    np.testing.assert_allclose(ref["mean"], lab.mean(0), atol=1e-3)
    np.testing.assert_allclose(ref["std"], lab.std(0), atol=1e-3)
    assert ref["pixels"] == 60 * 80 + 120 * 80 and ref["method"] == "reinhard"


def test_explicit_source_statistics_replace_the_images_own():
    """A tile normalised with its whole image's statistics equals that part of the normalised whole image."""
    a = he_like(11)
    ref = reinhard_reference([he_like(12)])
    whole = reinhard_normalize(a, ref)
    tile = reinhard_normalize(a[:40, :50], ref, source=lab_stats(a))
    assert np.abs(tile.astype(int) - whole[:40, :50].astype(int)).max() <= 1
    assert np.abs(reinhard_normalize(a[:40, :50], ref).astype(int) - whole[:40, :50].astype(int)).max() > 1


def test_a_blank_image_does_not_divide_by_zero():
    out = reinhard_normalize(np.full((20, 20, 3), 240, np.uint8), reinhard_reference([he_like(13)]))
    assert np.isfinite(out).all() and out.dtype == np.uint8


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="stain_norm='macenco'.*reinhard"):
        check_method("macenco")
    with pytest.raises(ValueError, match="HxWx3"):
        reinhard_normalize(np.zeros((8, 8), np.uint8), reinhard_reference([he_like(0)]))
    with pytest.raises(ValueError, match="'std' must be 3 finite numbers"):
        check_reference({"method": "reinhard", "mean": [1, 2, 3], "std": [1, 2]})
    with pytest.raises(ValueError, match="no images"):
        reinhard_reference([])


def test_task_normalises_whole_images_before_tiling():
    """``inference.stain_norm``: the network sees the normalised image; without a stored reference the task says
    how to get one."""
    from histoseg.models.modules.segmentation import SegmentationTask
    from tests.helpers_ckpt import PointwiseNet

    seen = []

    class Recorder(PointwiseNet):
        def forward(self, x):
            seen.append(x.detach().clone())
            return super().forward(x)

    img = he_like(14, (64, 64))
    task = SegmentationTask(net=Recorder(), inference={"tile_shape": [64, 64], "overlap": 0.0, "batch_size": 1,
                                                       "stain_norm": "reinhard"})
    x = torch.from_numpy(img.transpose(2, 0, 1).copy()).float() / 255
    with pytest.raises(ValueError, match="stores no stain reference.*stain_ref_from"):
        task.predict_logits(x)
    ref = reinhard_reference([lab_affine(he_like(15, (64, 64)), (0.8, 1.0, 1.0), (10.0, 0.0, 0.0))])
    task.data_info["stain_ref"] = ref
    task.predict_logits(x)
    want = reinhard_normalize(img.astype(np.float32) / 255, ref)
    np.testing.assert_allclose(seen[-1][0].permute(1, 2, 0).numpy(), want, atol=1e-5)
    task.predict_logits(x, stain_norm=None)  # off: the image as it is
    np.testing.assert_allclose(seen[-1][0].numpy(), x.numpy(), atol=1e-6)


def test_training_images_are_normalised_like_inference_images(tmp_path):
    """``inference.stain_norm=reinhard`` also normalises the training images (whole, before patches), to the same
    reference the task gets; validation images stay as read (the task normalises them); ``stain_norm_train=false``
    keeps the training images as read; a patch store cannot be combined."""
    from histoseg.tasks.train import build_datamodule
    from tests.conftest import compose_cfg

    data = ["dataset=synthetic", "dataset.reader.n_train=3", "dataset.reader.n_val=1", "dataset.reader.n_test=1",
            "dataset.reader.image_shape=[96,96]"]
    dm = build_datamodule(compose_cfg(tmp_path, *data, "inference.stain_norm=reinhard"))
    dm.setup("fit")
    ref = dm.stain_reference()
    raw = [dm.reader.read(c).image for c in dm.train_ids()]
    assert ref == reinhard_reference(raw)  # of the images as read
    for s, r in zip(dm.train_set.source.samples, raw):
        np.testing.assert_array_equal(s.image, reinhard_normalize(r, ref))
        np.testing.assert_allclose(lab_stats(s.image)[0], ref["mean"], atol=1.0)
    np.testing.assert_array_equal(dm.val_set.samples[0].image, dm.reader.read(dm.resolve_split()["val"][0]).image)

    off = build_datamodule(compose_cfg(tmp_path, *data, "inference.stain_norm=reinhard",
                                       "inference.stain_norm_train=false"))
    off.setup("fit")
    for s, r in zip(off.train_set.source.samples, raw):
        np.testing.assert_array_equal(s.image, r)
    with pytest.raises(ValueError, match="stain_norm=reinhard normalises whole training images.*patch_store"):
        build_datamodule(compose_cfg(tmp_path, *data, "inference.stain_norm=reinhard",
                                     "+dataset.patch_store={path: x.h5}"))
