"""Every ``conf/experiment`` preset composes, says what it reproduces, and trains one fast_dev_run step.

Parametrised over the folder: a new preset is tested without editing this file. Training steps on real
data are marked ``data`` and ``slow`` (they read the kit in place, and whole-image validation and test of
1-2 megapixel images take ~15-60 s each on 2 CPU cores): ``make test`` (and CI) runs them, ``make test-fast`` skips them.
Composition checks of every preset run in the fast suite.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from omegaconf import open_dict

from histoseg.utils.config import conf_dir
from tests.test_configs import options

EXPERIMENTS = options("experiment")


def dataset_of(name: str) -> str:
    defaults = yaml.safe_load((conf_dir() / "experiment" / f"{name}.yaml").read_text()).get("defaults", [])
    for d in defaults:
        if isinstance(d, dict) and "override /dataset" in d:
            return d["override /dataset"]
    return "synthetic"


def embedded(name: str) -> bool:
    """Presets on the embedded synthetic data (``synthetic``, ``sr_synthetic``) need no data kit."""
    return dataset_of(name).endswith("synthetic")


CASES = [pytest.param(n, marks=[] if embedded(n) else [pytest.mark.data, pytest.mark.slow]) for n in EXPERIMENTS]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_is_overrides_only_with_tags_and_a_run_command(name):
    text = (conf_dir() / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"python train.py experiment={name}" in text  # the run command, in a comment
    body = yaml.safe_load(text)
    assert body.get("tags"), f"{name}: no tags"
    for d in body.get("defaults", []):
        assert isinstance(d, dict) and all(k.startswith("override /") for k in d), f"{name}: {d} is not an override"


EVAL_CROP = 256  # px: validation / test images of the preset checks are cropped to this (>= every preset's tile)
SMALL_PATCH = 128  # px: the segmentation presets' training patches and tiles in these checks (SR keeps its own)


def crop_eval_images(monkeypatch, side: int = EVAL_CROP) -> None:
    """Whole-image validation and test read the top-left ``side`` x ``side`` of each image: the same code path
    (tiling, stitching, post-processing, metrics) at a twentieth of the pixels of a 1360x1024 BreCaHAD image."""
    import dataclasses

    from histoseg.data import datamodule

    def crop(s):
        if s.image.shape[0] <= side and s.image.shape[1] <= side:
            return s
        cut = {k: getattr(s, k)[:side, :side] for k in ("image", "mask", "instances") if getattr(s, k) is not None}
        return dataclasses.replace(s, **cut)

    class Cropped(datamodule.WholeImageDataset):
        def __init__(self, samples):
            super().__init__([crop(s) for s in samples])

    monkeypatch.setattr(datamodule, "WholeImageDataset", Cropped)


@pytest.mark.parametrize("name", CASES)
def test_preset_trains_one_fast_dev_run_step(make_cfg, name, request, monkeypatch):
    from histoseg.tasks.train import train

    if not embedded(name):
        request.getfixturevalue("data_dir")  # a clear failure if the kit is missing
    crop_eval_images(monkeypatch)
    cfg = make_cfg(f"experiment={name}", "trainer=debug", "logger=csv", base=[])
    assert cfg.dataset.name == dataset_of(name)
    with open_dict(cfg):  # tiny: 1 batch of 2 patches, 1 validation and 1 test image (cropped), tiles without overlap
        cfg.dataset.batch_size, cfg.dataset.samples_per_epoch = 2, 2
        if cfg.monitor == "val/dice":  # segmentation (SR keeps its 96 px crops): its own patch size only costs time
            cfg.patch_size, cfg.inference.tile_shape = SMALL_PATCH, [SMALL_PATCH, SMALL_PATCH]
        cfg.dataset.limit_val = cfg.dataset.limit_test = 1
        if "limit_train" in cfg.dataset:  # read 2 training images, not the whole set
            cfg.dataset.limit_train = 2
        cfg.inference.overlap, cfg.inference.tta = 0.0, "none"
        if cfg.dataset.get("patch_store"):
            cfg.dataset.patch_store.patches_per_image = 2
    metrics, obj = train(cfg)
    assert obj["trainer"].global_step >= 1  # one batch (a GAN step counts each optimiser)
    assert torch.isfinite(torch.as_tensor(float(metrics[cfg.monitor])))  # val/dice, or val/psnr for task=sr
    assert any(k.startswith("test/") for k in metrics)
    if cfg.monitor == "val/dice":
        assert 0.0 <= float(metrics["val/dice"]) <= 1.0 and 0.0 <= float(metrics["test/dice"]) <= 1.0
    whole = getattr(obj["datamodule"].test_set, "samples", None)  # segmentation sets (SR sets hold HR/LR pairs)
    if whole:
        assert max(whole[0].image.shape[:2]) <= EVAL_CROP  # the crop applied
        assert obj["datamodule"].patch_shape == (SMALL_PATCH, SMALL_PATCH)  # the one key moved the patches


def compose(make_cfg, name):
    return make_cfg(f"experiment={name}", base=[])


def test_seed_presets_match_their_source_systems(make_cfg):
    from hydra.utils import get_class

    c = compose(make_cfg, "epithelium_seed")
    assert c.model.net._target_.endswith("unet.UNet") and c.model.net.up_mode == "transpose"
    assert c.loss._target_.endswith("CrossEntropyLoss") and c.aug.name == "seed_epithelium"
    assert c.patch_size == 256 and list(c.dataset.patch_store.patch_shape) == [500, 500]

    c = compose(make_cfg, "brecahad_seed")
    assert c.dataset.batch_size == 8 and get_class(c.optimizer.optimizer._target_).__name__ == "Adam"
    assert c.loss._target_.endswith("BCEWithLogitsLoss") and c.aug.name == "seed_brecahad"
    assert c.model.net._target_.endswith("unet.UNet")

    c = compose(make_cfg, "nuclei_seed")
    assert c.dataset.name == "nuclei" and c.trainer.max_epochs == 20
    assert c.model.net._target_.endswith("unet.UNet") and c.model.net.up_mode == "transpose"

    c = compose(make_cfg, "cellularity_seed")
    assert c.model.net._target_.endswith("resunet.ResUNet") and c.loss.weight == "auto"
    assert get_class(c.optimizer.optimizer._target_).__name__ == "RMSprop"
    assert c.aug.name == "seed_cellularity" and c.postprocess.opening_radius > 0


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.endswith("_strong")])
def test_strong_presets_share_the_reference_recipe(make_cfg, name):
    c = compose(make_cfg, name)
    assert c.model.net.encoder_name == "resnet34" and c.loss._target_.endswith("DiceCELoss")
    assert c.aug.name == "strong" and c.optimizer.optimizer._target_ == "torch.optim.AdamW"
    assert c.optimizer.scheduler._target_.endswith("CosineAnnealingLR") and c.inference.overlap == 0.5
