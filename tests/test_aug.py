"""Every ``conf/aug`` pipeline keeps image and masks aligned, never interpolates labels, and uses only
albumentations 2.x argument names (1.x names only warn, so warnings are errors here).

Alignment is checked with a pattern whose mask is known after any geometric transform: the image's red
and green channels are the pixel's x and y coordinate (a linear ramp, which bilinear interpolation
reproduces exactly) and two masks carry the same coordinates as labels (nearest-neighbour). After the
transform, wherever a pixel came from, the image and the masks must name the same source pixel. Colour
(image-only) transforms would change the ramp, so the geometric check runs with them switched off, and
each colour transform is checked on its own to leave the masks untouched.
"""
from __future__ import annotations

import random
import warnings

import albumentations as A
import hydra
import numpy as np
import pytest
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform

from histoseg.data.readers.synthetic import generate_tile
from tests.test_configs import options

AUGS = options("aug")
SIDE = 256  # ramp of one grey level per pixel: x and y fit in uint8 exactly
LABELS = (0, 5, 9)  # sparse label values: any interpolation would create values in between


def build(make_cfg, name: str) -> A.Compose:
    cfg = make_cfg(f"aug={name}", f"patch_size={SIDE}", base=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # albumentations warns (not raises) on unknown / 1.x argument names
        return hydra.utils.instantiate(cfg.aug)


def seed(aug: A.Compose, s: int) -> None:
    aug.set_random_state(np.random.default_rng(s), random.Random(s))


def ramp_sample() -> tuple[np.ndarray, list[np.ndarray]]:
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    image = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    checker = np.asarray(LABELS, np.uint8)[((y // 8) + (x // 8)) % 3]
    return image, [x.astype(np.uint16), y.astype(np.uint16), checker]


def geometric(aug: A.Compose) -> list[A.BasicTransform]:
    return [t for t in aug.transforms if isinstance(t, DualTransform)]


def colour(aug: A.Compose) -> list[A.BasicTransform]:
    return [t for t in aug.transforms if isinstance(t, ImageOnlyTransform)]


def test_every_transform_is_geometric_or_colour(make_cfg):
    # the checks below split pipelines into these two kinds; an unclassified transform would go unchecked
    for name in AUGS:
        aug = build(make_cfg, name)
        for t in aug.transforms:
            assert isinstance(t, DualTransform | ImageOnlyTransform), f"aug={name}: {type(t).__name__}"


# exact geometric transforms (flips, 90-degree rotations) move pixels without resampling
EXACT = (A.HorizontalFlip, A.VerticalFlip, A.RandomRotate90, A.Transpose, A.SquareSymmetry)


def alignment_error(img: np.ndarray, mx: np.ndarray, my: np.ndarray) -> np.ndarray:
    """Per pixel, how far (in pixels) the source position read from the image is from the masks'."""
    ex = np.abs(img[..., 0].astype(int) - mx.astype(int))
    ey = np.abs(img[..., 1].astype(int) - my.astype(int))
    return np.maximum(ex, ey)


def test_alignment_check_detects_a_two_pixel_shift():
    # negative control: the same ramp, image shifted by 2 px while the masks stay put
    image, (mx, my, _) = ramp_sample()
    shifted = np.roll(image, 2, axis=1)
    assert np.mean(alignment_error(shifted, mx, my) <= 1) < 0.05


@pytest.mark.parametrize("name", AUGS)
def test_geometric_transforms_keep_image_and_masks_aligned(make_cfg, name):
    aug = build(make_cfg, name)
    for t in colour(aug):
        t.p = 0.0
    for t in geometric(aug):
        t.p = 1.0  # exercise every geometric transform on every draw
    # each resampling stage may put the nearest-neighbour mask up to half a pixel from the bilinear image,
    # plus half a grey level of uint8 rounding: at most one pixel per stage; exact transforms add nothing
    stages = sum(not isinstance(t, EXACT) for t in geometric(aug))
    image, masks = ramp_sample()
    moved = 0
    for s in range(6):
        seed(aug, s)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = aug(image=image, masks=masks)
        img, (mx, my, checker) = out["image"], out["masks"]
        assert img.shape == image.shape and img.dtype == np.uint8
        assert all(m.shape == (SIDE, SIDE) for m in (mx, my, checker))
        # labels are never interpolated: only the original label values survive
        assert set(np.unique(checker).tolist()) <= set(LABELS), f"aug={name}: interpolated labels"
        # image and masks name the same source pixel
        err = alignment_error(img, mx, my)
        assert err.max() <= stages, f"aug={name} seed={s}: image and masks {err.max()} px apart ({stages} stages)"
        assert np.mean(err <= 1) > 0.9, f"aug={name} seed={s}: {np.mean(err > 1):.1%} of pixels > 1 px apart"
        moved += int(not np.array_equal(mx, masks[0]) or not np.array_equal(my, masks[1]))
    if geometric(aug):
        assert moved >= 5, f"aug={name}: geometric transforms left the sample unchanged in {6 - moved}/6 draws"
    else:
        assert moved == 0


@pytest.mark.parametrize("name", AUGS)
def test_colour_transforms_leave_masks_unchanged(make_cfg, name):
    aug = build(make_cfg, name)
    tile, inst = generate_tile(0, 0, (SIDE, SIDE))
    mask = (inst > 0).astype(np.uint8)
    for t in colour(aug):
        solo = A.Compose([t], mask_interpolation=aug.mask_interpolation)
        t.p = 1.0
        changed = False
        for s in range(4):
            seed(solo, s)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = solo(image=tile, masks=[mask, inst])
            assert np.array_equal(out["masks"][0], mask) and np.array_equal(out["masks"][1], inst), type(t).__name__
            assert out["image"].shape == tile.shape and out["image"].dtype == np.uint8
            changed |= not np.array_equal(out["image"], tile)
        assert changed, f"aug={name}: {type(t).__name__} never changed the image"


@pytest.mark.parametrize("name", AUGS)
def test_full_pipeline_as_configured_keeps_labels_and_shape(make_cfg, name):
    aug = build(make_cfg, name)
    assert aug.mask_interpolation == 0  # cv2.INTER_NEAREST, set by histoseg.aug.build_aug for every transform
    assert all(getattr(t, "mask_interpolation", 0) == 0 for t in aug.transforms)
    tile, inst = generate_tile(1, 3, (SIDE, SIDE))
    mask = (inst > 0).astype(np.uint8) * 2  # a class value > 1, as multiclass masks have
    ids = set(np.unique(inst).tolist())
    for s in range(8):
        seed(aug, s)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = aug(image=tile, masks=[mask, inst])
        m, i = out["masks"]
        assert out["image"].shape == tile.shape and m.shape == mask.shape and i.shape == inst.shape
        assert set(np.unique(m).tolist()) <= {0, 2}
        assert set(np.unique(i).tolist()) <= ids  # instance ids are never blended into new ids
        # class mask and instance map stay consistent with each other after the transform
        assert np.array_equal(m > 0, i > 0)
