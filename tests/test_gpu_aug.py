"""GPU-side batch augmentation (histoseg/aug/gpu.py) equals the CPU transforms it replaces.

* flips / quarter turns of image, mask and instances equal albumentations' HorizontalFlip, VerticalFlip and
  RandomRotate90 (same order, same parameters) applied sample by sample on the CPU;
* transformed HoVer-Net ``hv`` maps (and three-class / distance targets) equal the targets recomputed from the
  transformed instance map, so targets can be computed in the workers before the device step;
* stain jitter equals colour deconvolution written independently in numpy with skimage's stain matrices.
"""
from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from skimage.draw import disk

from histoseg.aug.gpu import AugParams, BatchAug, hed_jitter
from histoseg.data.targets import InstanceTargets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# (hflip, vflip, quarter turns): the 8 distinct symmetries of the square, vertical flip included
DIHEDRAL = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (1, 0, 0), (1, 0, 1), (0, 1, 0), (1, 0, 3)]


def all_dihedral() -> AugParams:
    p = AugParams.identity(len(DIHEDRAL))
    p.hflip = torch.tensor([bool(h) for h, _, _ in DIHEDRAL])
    p.vflip = torch.tensor([bool(v) for _, v, _ in DIHEDRAL])
    p.rot90 = torch.tensor([k for _, _, k in DIHEDRAL])
    return p


def nuclei(side: int, seed: int) -> np.ndarray:
    """An instance map of asymmetric touching discs (so every symmetry changes it)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((side, side), np.int32)
    for i in range(1, 9):
        r = int(rng.integers(3, 7))
        c = rng.integers(r, side - r, 2)
        rr, cc = disk((int(c[0]), int(c[1])), r, shape=inst.shape)
        inst[rr, cc] = i
    inst[:5, : side // 3] = 20  # a bar along the top edge: flips and turns move it
    return inst


def cpu_dihedral(arr: np.ndarray, hflip: bool, vflip: bool, k: int, mask: bool) -> np.ndarray:
    ops = []
    if hflip:
        ops.append(A.HorizontalFlip(p=1.0))
    if vflip:
        ops.append(A.VerticalFlip(p=1.0))
    for t in ops:
        arr = t.apply_to_mask(arr) if mask else t.apply(arr)
    rot = A.RandomRotate90(p=1.0)
    return rot.apply_to_mask(arr, factor=k) if mask else rot.apply(arr, factor=k)


def test_gpu_flips_and_rot90_equal_albumentations_on_the_cpu():
    b, side = 8, 32
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (b, side, side, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (b, side, side), dtype=np.uint8)
    insts = np.stack([nuclei(side, i) for i in range(b)])
    batch = {
        "image": torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()).float().div(255).to(DEVICE),
        "mask": torch.from_numpy(masks.astype(np.int64)).to(DEVICE),
        "instances": torch.from_numpy(insts).to(DEVICE),
        "case_id": [f"c{i}" for i in range(b)],
    }
    p = all_dihedral()
    out = BatchAug(dihedral=True).apply(batch, p)
    assert out["case_id"] == batch["case_id"]
    for i in range(b):
        hf, vf, k = bool(p.hflip[i]), bool(p.vflip[i]), int(p.rot90[i])
        img = cpu_dihedral(imgs[i], hf, vf, k, mask=False)
        np.testing.assert_array_equal((out["image"][i].cpu() * 255).round().byte().permute(1, 2, 0).numpy(), img)
        np.testing.assert_array_equal(out["mask"][i].cpu().numpy(), cpu_dihedral(masks[i], hf, vf, k, True))
        np.testing.assert_array_equal(out["instances"][i].cpu().numpy(), cpu_dihedral(insts[i], hf, vf, k, True))
    # every sample but the identity changed: the test would catch a no-op
    changed = [not torch.equal(out["instances"][i], batch["instances"][i]) for i in range(b)]
    assert changed == [False] + [True] * (b - 1)


def test_transformed_targets_equal_targets_of_the_transformed_instances():
    b, side = 8, 48
    insts = np.stack([nuclei(side, 10 + i) for i in range(b)])
    targets = InstanceTargets(kinds=["three_class", "distance", "hv"], boundary_width=2)
    per = [targets(torch.zeros(side, side, dtype=torch.int64), torch.from_numpy(m)) for m in insts]
    batch = {
        "image": torch.rand(b, 3, side, side, device=DEVICE),
        "instances": torch.from_numpy(insts).to(DEVICE),
        "seg": torch.stack([t["seg"] for t in per]).to(DEVICE),
        "dist": torch.stack([t["dist"] for t in per]).to(DEVICE),
        "hv": torch.stack([t["hv"] for t in per]).to(DEVICE),
        "inst_valid": torch.ones(b, dtype=torch.bool, device=DEVICE),
    }
    p = all_dihedral()
    out = BatchAug(dihedral=True).apply(batch, p)
    assert torch.equal(out["inst_valid"], batch["inst_valid"])
    for i in range(b):
        again = targets(torch.zeros(side, side, dtype=torch.int64), out["instances"][i].cpu())
        assert torch.equal(out["seg"][i].cpu(), again["seg"])
        torch.testing.assert_close(out["dist"][i].cpu(), again["dist"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["hv"][i].cpu(), again["hv"], atol=1e-5, rtol=0)
    # the hv components really change sign / swap (a pixel move alone would fail the check above)
    assert not torch.equal(out["hv"][1], batch["hv"][1])


def numpy_hed_jitter(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Reference: Ruifrok-Johnston deconvolution with skimage's matrices, in float64, HWC."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1e-6))
    stains = od @ hed_from_rgb
    stains[..., :2] = stains[..., :2] * scale + shift
    return np.clip(np.exp(-(stains @ rgb_from_hed)), 0, 1)


def test_stain_jitter_matches_numpy_colour_deconvolution_and_identity_is_exact():
    rng = np.random.default_rng(1)
    img = rng.uniform(0.05, 1.0, (2, 3, 20, 20)).astype(np.float32)
    scale = np.array([[1.2, 0.85], [0.9, 1.1]], np.float32)
    shift = np.array([[0.05, -0.03], [-0.02, 0.04]], np.float32)
    got = hed_jitter(torch.from_numpy(img).to(DEVICE), torch.from_numpy(scale), torch.from_numpy(shift)).cpu().numpy()
    for i in range(2):
        ref = numpy_hed_jitter(img[i].transpose(1, 2, 0), scale[i], shift[i]).transpose(2, 0, 1)
        np.testing.assert_allclose(got[i], ref, atol=2e-5)
    assert np.abs(got - img).max() > 0.02  # it does change colours
    same = hed_jitter(torch.from_numpy(img), torch.ones(2, 2), torch.zeros(2, 2)).numpy()
    np.testing.assert_allclose(same, img, atol=2e-5)


def test_colour_ops_leave_labels_alone_and_stay_in_range():
    b, side = 6, 16
    batch = {"image": torch.rand(b, 3, side, side), "mask": torch.randint(0, 2, (b, side, side)),
             "instances": torch.randint(0, 5, (b, side, side), dtype=torch.int32)}
    aug = BatchAug(dihedral=False, brightness=0.3, contrast=0.3, p_color=1.0, stain_scale=0.3, stain_shift=0.1,
                   p_stain=1.0, seed=3)
    out = aug(batch, 0, 0, 0)
    assert torch.equal(out["mask"], batch["mask"]) and torch.equal(out["instances"], batch["instances"])
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    assert (out["image"] - batch["image"]).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every sample changed


def test_parameters_are_a_pure_function_of_seed_and_key():
    aug = BatchAug(dihedral=True, brightness=0.2, contrast=0.2, stain_scale=0.2, stain_shift=0.05, seed=7)
    batch = {"image": torch.rand(8, 3, 16, 16), "mask": torch.randint(0, 2, (8, 16, 16))}
    a, b, c = aug(batch, 0, 1, 5), aug(batch, 0, 1, 5), aug(batch, 0, 1, 6)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    p = aug.sample(4000, aug.generator(0, 0, 0))
    assert 0.45 < p.hflip.float().mean() < 0.55 and 0.45 < p.vflip.float().mean() < 0.55
    assert set(p.rot90.tolist()) == {0, 1, 2, 3}
    assert p.brightness.abs().max() <= 0.2 + 1e-6 and ((p.contrast - 1).abs() <= 0.2 + 1e-6).all()
    assert aug.sample(64, aug.generator(1), square=False).rot90.remainder(2).eq(0).all()  # 0 / 180 only


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="brightness must be in"):
        BatchAug(brightness=1.5)
    with pytest.raises(ValueError, match="p_stain is a probability"):
        BatchAug(p_stain=2)
    with pytest.raises(ValueError, match=r"RGB image batch \(B, 3, H, W\)"):
        BatchAug()({"image": torch.rand(3, 8, 8)}, 0)


def test_gpu_aug_config_trains_and_sr_rejects_it(make_cfg):
    from histoseg.tasks.train import build_task, check_config, train
    from histoseg.tasks.utils import ConfigError

    cfg = make_cfg("aug=none", "gpu_aug=stain", "test=false", "tune_postprocess.enabled=false")  # 8 patches, batch 4
    task = build_task(cfg)
    assert isinstance(task.gpu_aug, BatchAug) and task.gpu_aug.stain_scale == pytest.approx(0.2)
    metrics, obj = train(cfg)
    assert obj["trainer"].global_step == 2 and torch.isfinite(torch.as_tensor(float(metrics["train/loss_step"])))
    with pytest.raises(ConfigError, match="gpu_aug is implemented for segmentation only"):
        check_config(make_cfg("task=sr", "gpu_aug=light", base=[]))
