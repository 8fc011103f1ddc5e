"""Super-resolution (SRGAN): networks, losses, LR degradation, GAN steps, resume, tiled SR, the SR pipeline."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from histoseg.data.superres import Degradation, SRPatchDataset, SRWholeImageDataset, case_seed
from histoseg.inference.superres import bicubic_upsample, super_resolve
from histoseg.losses.gan import AdversarialLoss, PerceptualLoss, PixelLoss
from histoseg.models.backbones.srgan_discriminator import SRGANDiscriminator
from histoseg.models.backbones.srgan_generator import SRGANGenerator
from histoseg.models.modules.superres import SuperResolutionTask, image_quality
from histoseg.tasks.train import train
from histoseg.tasks.utils import ConfigError
from histoseg.utils.config import conf_dir

# its module-scoped fixtures are built once: keep the module on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("superres")

# tiny SR settings every SR test starts from (task=sr selects model=srgan and dataset=sr_synthetic)
SR_TINY = [
    "task=sr",
    "model.net.width=8",
    "model.net.depth=1",
    "model.discriminator.width=8",
    "model.discriminator.depth=2",
    "model.discriminator.dense_width=16",
    "model.pretrain_epochs=0",
    "patch_size=32",
    "dataset.reader.n_train=4",
    "dataset.reader.n_val=1",
    "dataset.reader.n_test=2",
    "dataset.reader.image_shape=[64,64]",
    "dataset.samples_per_epoch=8",
    "dataset.batch_size=4",
    "dataset.num_workers=0",
    "inference.tile_shape=[16,16]",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


# ---------------------------------------------------------------------- networks
@pytest.mark.parametrize("scale", [2, 4])
def test_generator_output_is_scale_times_larger(scale):
    net = SRGANGenerator(scale=scale, width=8, depth=2).eval()
    y = net(torch.rand(2, 3, 12, 20))
    assert y.shape == (2, 3, 12 * scale, 20 * scale) and torch.isfinite(y).all()


def test_zero_tail_generator_is_the_bicubic_baseline():
    net = SRGANGenerator(scale=4, width=8, depth=1, residual_mode="bicubic", tail_init_scale=0.0).eval()
    lr = torch.rand(3, 10, 14)
    torch.testing.assert_close(net(lr[None])[0].clamp(0, 1), bicubic_upsample(lr, 4))
    with pytest.raises(ValueError, match="residual_mode must be"):
        SRGANGenerator(residual_mode="nearest")


def test_discriminator_gives_one_logit_per_image_of_any_size():
    from histoseg.models.registry import available_backbones, get_backbone_class

    assert get_backbone_class("srgan_discriminator").kind == "discriminator"
    assert "srgan_discriminator" in available_backbones()
    d = SRGANDiscriminator(width=8, depth=3, dense_width=16).eval()
    for h, w in [(32, 32), (48, 40)]:
        assert d(torch.rand(3, 3, h, w)).shape == (3, 1)


# ---------------------------------------------------------------------- losses and metrics
def test_adversarial_losses_at_chance_and_when_discriminator_is_right():
    zeros = torch.zeros(4, 1)
    for kind in ("bce", "relativistic"):
        adv = AdversarialLoss(kind)
        # logits 0 everywhere: every BCE term is log 2
        expected_d = 2 * np.log(2) if kind == "bce" else np.log(2)
        assert adv.discriminator_loss(zeros, zeros).item() == pytest.approx(expected_d, rel=1e-6)
        assert adv.generator_loss(zeros, zeros).item() == pytest.approx(np.log(2), rel=1e-6)
        real, fake = torch.full((4, 1), 5.0), torch.full((4, 1), -5.0)
        # a confident, correct discriminator has a small loss and the generator a large one
        assert adv.discriminator_loss(real, fake).item() < 0.02
        assert adv.generator_loss(fake, real).item() > 4.0
    with pytest.raises(ValueError, match="relativistic generator loss needs"):
        AdversarialLoss("relativistic").generator_loss(zeros)
    with pytest.raises(ValueError, match="choose one of"):
        AdversarialLoss("wgan")


def test_pixel_loss_kinds():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert PixelLoss("l1")(a, b).item() == pytest.approx(0.5)
    assert PixelLoss("mse")(a, b).item() == pytest.approx(0.25)


def test_psnr_ssim_of_identical_images_are_capped_and_one():
    x = torch.rand(3, 40, 40)
    q = image_quality(x, x.clone(), max_psnr=100.0)
    assert q["psnr"] == 100.0 and q["ssim"] == pytest.approx(1.0, abs=1e-6)
    # a known MSE: constant offset 0.1 -> MSE 0.01 -> 20 dB
    t = torch.full((3, 32, 32), 0.4)
    q = image_quality(t + 0.1, t, quantize=False)
    assert q["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert q["ssim"] < 1.0
    # border shaving: an error confined to the border does not count
    p = t.clone()
    p[:, :2] = 1.0
    assert image_quality(p, t, border=2, max_psnr=100.0)["psnr"] == 100.0
    with pytest.raises(ValueError, match="differ in shape"):
        image_quality(x, x[:, :20])


def test_image_quality_is_float32_even_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 48, 48, generator=g), torch.rand(3, 48, 48, generator=g)
    ref = image_quality(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = image_quality(x, y)
    assert got == pytest.approx(ref, abs=1e-6)


# ---------------------------------------------------------------------- degradation
def test_degradation_is_deterministic_per_seed_and_has_lr_shape():
    deg = Degradation(scale=4, blur_sigma=[0.5, 1.5], noise_sigma=[1.0, 8.0], jpeg_quality=[50, 90])
    hr = torch.rand(3, 64, 48)
    a = deg(hr, np.random.default_rng([7, 3]))
    b = deg(hr, np.random.default_rng([7, 3]))
    c = deg(hr, np.random.default_rng([8, 3]))
    assert a.shape == (3, 16, 12) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal((a * 255).round(), a * 255)  # an 8-bit image
    with pytest.raises(ValueError, match="not divisible by the scale 4; crop it to 48x64"):
        deg(torch.rand(3, 66, 50), np.random.default_rng(0))
    with pytest.raises(ValueError, match="must be one of"):
        Degradation(downsample="nearest")
    with pytest.raises(ValueError, match="jpeg_quality values must be in"):
        Degradation(jpeg_quality=[0, 90])


def test_area_downsampling_is_the_block_mean_and_bicubic_keeps_constants():
    hr = torch.rand(3, 8, 8)
    lr = Degradation(scale=2, downsample="area")(hr, np.random.default_rng(0))
    block = hr.reshape(3, 4, 2, 4, 2).mean(dim=(2, 4))
    assert torch.allclose(lr, (block * 255).round() / 255, atol=1e-6)
    flat = torch.full((3, 16, 16), 100 / 255)
    assert torch.allclose(
        Degradation(scale=4)(flat, np.random.default_rng(0)), torch.full((3, 4, 4), 100 / 255)
    )


def test_sr_datasets_degrade_deterministically(make_cfg):
    from histoseg.tasks.train import build_datamodule

    dm = build_datamodule(make_cfg(base=SR_TINY))
    dm.setup("fit")
    ds = dm.train_set
    assert isinstance(ds, SRPatchDataset)
    x1, x2, y = ds[(0, 3)], ds[(0, 3)], ds[(1, 3)]
    assert set(x1) == {"hr", "lr", "case_id"}
    assert x1["hr"].shape == (3, 32, 32) and x1["lr"].shape == (3, 8, 8)
    assert torch.equal(x1["lr"], x2["lr"]) and torch.equal(x1["hr"], x2["hr"])
    assert not torch.equal(x1["lr"], y["lr"])
    # a second datamodule (e.g. a resumed run) sees the same pairs
    dm2 = build_datamodule(make_cfg(base=SR_TINY))
    dm2.setup("fit")
    assert torch.equal(dm2.train_set[(1, 3)]["lr"], y["lr"])
    # whole images: LR depends on (seed, case_id), not on the position in the list
    val = dm.val_set
    assert isinstance(val, SRWholeImageDataset)
    item = val[0]
    assert (
        item["hr"].shape == (3, 64, 64) and item["lr"].shape == (3, 16, 16) and item["mask"].shape == (64, 64)
    )
    again = dm.degradation(item["hr"], case_seed(dm.seed, item["case_id"]))
    assert torch.equal(again, item["lr"])


def test_sr_training_patches_are_cut_from_the_images_as_read(make_cfg):
    """Regression: SRDataModule once stored the SR factor in ``scale``, the name HistoDataModule uses for the
    working resolution, so every HR training image was resized 4x before patching (the generator learnt to
    sharpen blurred, upsampled tissue and fell below bicubic on real validation images)."""
    from histoseg.tasks.train import build_datamodule

    dm = build_datamodule(make_cfg(base=SR_TINY + ["aug=none"]))
    dm.setup("fit")
    assert dm.sr_scale == 4 and dm.scale == 1.0
    train = dm.train_set.patches.source.samples
    read = dm._read(dm.train_ids())
    assert [s.image.shape for s in train] == [s.image.shape for s in read] == [(64, 64, 3)] * len(read)
    # each HR patch (no augmentation) is a crop of one training image, pixel for pixel
    images = {s.case_id: s.image for s in read}
    for i in range(4):
        item = dm.train_set[(0, i)]
        hr = (item["hr"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        img = images[item["case_id"]]
        windows = np.lib.stride_tricks.sliding_window_view(img, hr.shape)[:, :, 0]
        assert (windows == hr).all(axis=(-3, -2, -1)).any(), f"patch {i} is not a crop of {item['case_id']}"
    with pytest.raises(ValueError, match="working resolution"):
        build_datamodule(make_cfg(base=SR_TINY + ["+inference.scale=0.5"]))


def test_whole_images_are_centre_cropped_to_multiples_of_the_scale():
    from histoseg.data.datasets import WholeImageDataset
    from histoseg.data.sample import Sample

    img = np.random.default_rng(0).integers(0, 255, (30, 43, 3), dtype=np.uint8)
    mask = (img[..., 0] > 128).astype(np.uint8)
    ds = SRWholeImageDataset(WholeImageDataset([Sample(img, mask, "c1")]), Degradation(scale=4), seed=0)
    item = ds[0]
    assert item["hr"].shape == (3, 28, 40) and item["lr"].shape == (3, 7, 10)
    # centre crop: rows 1..28, cols 1..40
    assert torch.equal(item["mask"], torch.from_numpy(mask[1:29, 1:41].astype(np.int64)))
    crop = SRWholeImageDataset(
        WholeImageDataset([Sample(img, mask, "c1")]), Degradation(scale=4), crop_shape=(16, 16)
    )
    assert crop[0]["hr"].shape == (3, 16, 16)


# ---------------------------------------------------------------------- tiled SR
class PointwiseSR(nn.Module):
    """A pointwise x``scale`` generator (1x1 conv + PixelShuffle): tiling cannot change its output."""

    def __init__(self, scale: int = 4):
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(3, 3 * scale * scale, 1), nn.PixelShuffle(scale))
        torch.manual_seed(0)
        nn.init.uniform_(self.body[0].weight, 0.0, 0.3)

    def forward(self, x):
        return self.body(x)


def test_sr_tile_stitching_equals_a_whole_image_pass():
    g = torch.Generator().manual_seed(1)
    lr = torch.rand(3, 37, 51, generator=g)
    net = PointwiseSR(4).eval()
    whole = net(lr[None])[0].clamp(0, 1)
    tiled = super_resolve(lr, net, tile_shape=(16, 16), overlap=0.5, batch_size=3)
    assert tiled.shape == (3, 148, 204)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    # a real (non-pointwise) generator: one tile covering the image is the whole-image pass
    gen = SRGANGenerator(scale=2, width=8, depth=2).eval()
    one_tile = super_resolve(lr, gen, tile_shape=(37, 51), overlap=0.25)
    torch.testing.assert_close(one_tile, gen(lr[None])[0].clamp(0, 1), atol=1e-5, rtol=1e-5)
    # numpy uint8 input gives the same result as the equivalent float tensor
    u8 = (lr * 255).round().byte().permute(1, 2, 0).numpy()
    torch.testing.assert_close(
        super_resolve(u8, net, tile_shape=(16, 16)),
        super_resolve(torch.from_numpy(u8).permute(2, 0, 1) / 255.0, net, tile_shape=(16, 16)),
    )


def test_bicubic_upsample_shape_and_range():
    up = bicubic_upsample(torch.rand(3, 10, 12), 4)
    assert up.shape == (3, 40, 48) and up.min() >= 0 and up.max() <= 1
    with pytest.raises(ValueError, match="not an upscaling generator"):
        super_resolve(torch.rand(3, 8, 8), SRGANGenerator(scale=1, width=4, depth=1))


# ---------------------------------------------------------------------- GAN training
class RecordSteps(L.Callback):
    """Snapshots both networks' parameters around every optimizer step (torch step hooks)."""

    def __init__(self):
        self.steps: list[dict] = []

    @staticmethod
    def _params(module):
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_train_start(self, trainer, pl_module):
        names = ["generator", "discriminator"]
        for name, opt in zip(names, trainer.optimizers):

            def pre(o, args, kwargs, name=name):
                self._before = (self._params(pl_module.net), self._params(pl_module.discriminator))

            def post(o, args, kwargs, name=name):
                after = (self._params(pl_module.net), self._params(pl_module.discriminator))
                self.steps.append({"optimizer": name, "before": self._before, "after": after})

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def _recorded_steps(make_cfg, *overrides: str) -> list[dict]:
    """Train SR_TINY without validation or test and return what RecordSteps saw at each optimizer step."""
    cfg = make_cfg(*overrides, "test=false", "callbacks=none", "+trainer.limit_val_batches=0", base=SR_TINY)
    with open_dict(cfg):
        cfg.callbacks = {"record": {"_target_": "tests.test_superres.RecordSteps"}}
    _, obj = train(cfg)
    return next(c for c in obj["callbacks"] if isinstance(c, RecordSteps)).steps


def test_one_gan_step_updates_each_network_only_in_its_own_step(make_cfg):
    steps = _recorded_steps(make_cfg, "dataset.samples_per_epoch=4")
    # one batch: a discriminator step, then a generator step
    assert [s["optimizer"] for s in steps] == ["discriminator", "generator"]
    d_step, g_step = steps
    g_before, d_before = d_step["before"]
    g_after, d_after = d_step["after"]
    assert _changed(d_before, d_after), "the discriminator step did not change the discriminator"
    assert not _changed(g_before, g_after), "the discriminator step changed the generator"
    g_before, d_before = g_step["before"]
    g_after, d_after = g_step["after"]
    assert _changed(g_before, g_after), "the generator step did not change the generator"
    assert not _changed(d_before, d_after), "the generator step changed the discriminator"


def test_pretraining_phase_steps_only_the_generator(make_cfg):
    steps = _recorded_steps(make_cfg, "dataset.samples_per_epoch=8", "model.pretrain_epochs=1")
    assert [s["optimizer"] for s in steps] == ["generator", "generator"]


def test_srresnet_without_discriminator_trains_the_generator_alone(make_cfg):
    metrics, obj = train(
        make_cfg(
            "trainer=debug", "model.discriminator=null", "model.loss_weights.adversarial=0", base=SR_TINY
        )
    )
    assert len(obj["trainer"].optimizers) == 1
    assert "train/pixel" in metrics and "train/adversarial" not in metrics and "train/d_loss" not in metrics


def test_sr_debug_run_logs_psnr_beside_bicubic(make_cfg, tmp_path):
    metrics, obj = train(make_cfg("trainer=debug", base=SR_TINY))
    for k in (
        "val/psnr",
        "val/ssim",
        "val/psnr_bicubic",
        "val/ssim_bicubic",
        "test/psnr",
        "test/psnr_bicubic",
    ):
        assert k in metrics, k
    assert 5.0 < float(metrics["val/psnr_bicubic"]) < 60.0 and 0 < float(metrics["val/ssim_bicubic"]) <= 1
    assert obj["cfg"].monitor == obj["cfg"].optimized_metric == "val/psnr"


def test_bf16_mixed_gan_training_with_clipping_on_cpu(make_cfg, tmp_path):
    metrics, obj = train(
        make_cfg("trainer.precision=bf16-mixed", "model.gradient_clip_val=0.01", "test=false", base=SR_TINY)
    )
    assert obj["trainer"].precision == "bf16-mixed"
    assert np.isfinite(float(metrics["val/psnr"])) and np.isfinite(float(metrics["train/d_loss_epoch"]))
    # clipping happened after backward: the recorded generator grad norm would be tiny; check weights stayed finite
    assert all(torch.isfinite(p).all() for p in obj["model"].parameters())


class StopAfterSecondEpoch(L.Callback):
    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.should_stop = True


def _state(task):
    return {
        k: v.detach().clone()
        for k, v in task.state_dict().items()
        if k.startswith(("net.", "discriminator."))
    }


def test_resume_mid_gan_phase_matches_uninterrupted(make_cfg, tmp_path):
    # epoch 0: pixel pre-training; epochs 1-2: adversarial. Interrupt after epoch 1 (mid GAN phase).
    common = [
        "trainer.max_epochs=3",
        "model.pretrain_epochs=1",
        "trainer.deterministic=true",
        "test=false",
        "model.d_scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gamma:0.5}",
    ]
    full_cfg = make_cfg(*common, base=SR_TINY)
    with open_dict(full_cfg):
        full_cfg.paths.output_dir = str(tmp_path / "full")
    m_full, o_full = train(full_cfg)

    cut_cfg = make_cfg(*common, base=SR_TINY)
    with open_dict(cut_cfg):
        cut_cfg.paths.output_dir = str(tmp_path / "cut")
        cut_cfg.callbacks.stop = {"_target_": "tests.test_superres.StopAfterSecondEpoch"}
    _, o_cut = train(cut_cfg)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["histoseg"]["task"] == "sr"
    # both networks and both optimiser states (the discriminator's is non-empty: it has been trained)
    assert any(k.startswith("net.") for k in ckpt["state_dict"]) and any(
        k.startswith("discriminator.") for k in ckpt["state_dict"]
    )
    assert len(ckpt["optimizer_states"]) == 2 and all(s["state"] for s in ckpt["optimizer_states"])
    assert len(ckpt["lr_schedulers"]) == 2

    res_cfg = make_cfg(*common, f"ckpt_path={last}", base=SR_TINY)
    with open_dict(res_cfg):
        res_cfg.paths.output_dir = str(tmp_path / "resumed")
    m_res, o_res = train(res_cfg)
    assert o_res["trainer"].global_step == o_full["trainer"].global_step
    w_full, w_res = _state(o_full["model"]), _state(o_res["model"])
    assert set(w_full) == set(w_res)
    for k in w_full:
        torch.testing.assert_close(
            w_res[k], w_full[k], rtol=0, atol=0, msg=f"weights differ after resume: {k}"
        )
    # the discriminator's scheduler only steps in the adversarial phase: 2 GAN epochs -> lr halved twice
    d_opt = o_full["trainer"].optimizers[1]
    assert d_opt.param_groups[0]["lr"] == pytest.approx(o_full["cfg"].model.d_optimizer.lr * 0.25)
    assert float(m_res["val/psnr"]) == pytest.approx(float(m_full["val/psnr"]), abs=1e-6)


def test_checkpoint_alone_rebuilds_the_generator(make_cfg, tmp_path):
    from histoseg.models.loading import load_task

    _, obj = train(make_cfg("test=false", base=SR_TINY))
    task = load_task(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(task, SuperResolutionTask) and task.scale == 4
    lr = torch.rand(3, 20, 24)
    ref = obj["model"].eval().super_resolve(lr)
    torch.testing.assert_close(task.super_resolve(lr), ref, atol=1e-6, rtol=1e-6)
    assert task.train_degradation == obj["datamodule"].degradation.config()


# ---------------------------------------------------------------------- config errors
def test_sr_config_errors_are_one_sentence(make_cfg):
    with pytest.raises(ConfigError, match="makes no LR images; use an SR dataset"):
        train(make_cfg("dataset=synthetic", "dataset.reader.image_shape=[64,64]", base=SR_TINY))
    with pytest.raises(ConfigError, match="super-resolution dataset .* train it with task=sr"):
        train(make_cfg("dataset=sr_synthetic"))  # the segmentation task (default) on an SR dataset
    with pytest.raises(Exception, match="patch_size 30 .* not divisible by the SR scale 4"):
        train(make_cfg("patch_size=30", base=SR_TINY))
    with pytest.raises(Exception, match="upscales x2 but the dataset degrades x4"):
        train(make_cfg("model.net.scale=2", "trainer=debug", base=SR_TINY))
    with pytest.raises(ConfigError, match="set model.gradient_clip_val instead"):
        train(make_cfg("trainer.gradient_clip_val=1.0", base=SR_TINY))


# ---------------------------------------------------------------------- perceptual loss
@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory):
    """A tiny trained segmentation checkpoint (the offline perceptual network and the pipeline's segmenter)."""
    from tests.conftest import compose_cfg

    out = tmp_path_factory.mktemp("seg")
    cfg = compose_cfg(
        out,
        "test=false",
        "dataset.reader.image_shape=[64,64]",
        "patch_size=32",
        "inference.tile_shape=[32,32]",
        "dataset.reader.n_val=1",
    )
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def test_perceptual_loss_from_a_segmentation_checkpoint(seg_ckpt):
    loss = PerceptualLoss(network="seg", seg_ckpt=str(seg_ckpt))
    assert loss.build()
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 32, 32, generator=g)
    sr = torch.rand(2, 3, 32, 32, generator=g, requires_grad=True)
    assert loss(hr, hr).item() == pytest.approx(0.0, abs=1e-7)
    value = loss(sr, hr)
    assert value.item() > 0
    value.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    net = loss._frozen["net"]
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert not list(loss.parameters()) and not loss.state_dict()  # frozen net stays out of the module tree


def test_perceptual_loss_trains_and_is_not_saved(make_cfg, tmp_path, seg_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="histoseg.models.modules.superres"):
        metrics, obj = train(
            make_cfg(f"model.perceptual_loss.seg_ckpt={seg_ckpt}", "test=false", base=SR_TINY)
        )
    assert obj["model"].use_perceptual and "train/perceptual" in metrics
    assert "perceptual loss: encoder of segmentation checkpoint" in caplog.text
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("perceptual_loss.") for k in ckpt["state_dict"])


def test_no_perceptual_network_warns_once_and_trains(make_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="histoseg.models.modules.superres"):
        metrics, obj = train(make_cfg("trainer=debug", base=SR_TINY))
    warnings = [r for r in caplog.records if "No perceptual network" in r.getMessage()]
    assert len(warnings) == 1
    assert not obj["model"].use_perceptual and "train/perceptual" not in metrics
    assert "train/adversarial" in metrics


def test_vgg19_perceptual_from_a_state_dict_path(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "vgg19.pth"
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"])  # = vgg19().features
    # keys as in vgg19().state_dict()
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss = PerceptualLoss(network="vgg19", vgg_weights=str(path), layers=[2, 7])
    assert loss.build()
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-7) and loss(x, y).item() > 0
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a VGG19 state_dict"):
        PerceptualLoss(network="vgg19", vgg_weights=str(tmp_path / "other.pth")).build()
    with pytest.raises(FileNotFoundError, match="VGG19 state_dict not found"):
        PerceptualLoss(network="vgg19", vgg_weights=str(tmp_path / "missing.pth")).build()


# ---------------------------------------------------------------------- SR -> segmentation pipeline
def _compose_sr_eval(tmp_path: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("sr_eval", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg.hydra
    return cfg


def test_evaluate_sr_pipeline_three_way(make_cfg, tmp_path, seg_ckpt):
    from histoseg.tasks.superres import evaluate_sr_pipeline

    sr_out = tmp_path / "sr"
    sr_cfg = make_cfg("test=false", base=SR_TINY)
    with open_dict(sr_cfg):
        sr_cfg.paths.output_dir = str(sr_out)
    train(sr_cfg)
    out = tmp_path / "eval"
    cfg = _compose_sr_eval(
        out,
        f"sr_ckpt={sr_out / 'checkpoints' / 'last.ckpt'}",
        f"seg_ckpt={seg_ckpt}",
        "dataset=sr_synthetic",
        "dataset.reader.n_test=2",
        "dataset.reader.image_shape=[64,64]",
        "sr_inference.tile_shape=[8,8]",
        "seg_inference.tta=flip",
        "device=cpu",
    )
    summary = evaluate_sr_pipeline(cfg)
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["case_id"] for r in rows] == ["syn-test-0000", "syn-test-0001"]
    for r in rows:
        for k in ("dice_hr", "dice_bicubic", "dice_sr", "aji_hr", "aji_sr", "ssim_sr", "ssim_bicubic"):
            assert 0.0 <= float(r[k]) <= 1.0, k
        assert float(r["psnr_bicubic"]) > 10
        # ground-truth morphometry counts the nuclei of the (64x64) test image
        from histoseg.data.readers.synthetic import SyntheticReader

        inst = SyntheticReader(n_test=2, image_shape=(64, 64)).read(r["case_id"]).instances
        assert int(r["gt_nuclei_count"]) == len(np.unique(inst[inst > 0]))
        assert float(r["gt_density_per_mm2"]) == pytest.approx(
            len(np.unique(inst[inst > 0])) / (64 * 64 * 0.25e-6)
        )
    saved = json.loads((out / "summary.json").read_text())
    assert saved["n_images"] == 2 and saved["scale"] == 4
    assert saved["psnr_gain_over_bicubic_db"] == pytest.approx(
        saved["mean"]["psnr_sr"] - saved["mean"]["psnr_bicubic"]
    )
    assert summary["dice_ratio_sr_to_hr"] == pytest.approx(
        saved["mean"]["dice_sr"] / saved["mean"]["dice_hr"]
    )
    # the HR branch is exactly the segmenter on the HR image
    from histoseg.metrics.pixel import image_scores
    from histoseg.models.loading import load_task

    ds_item = SyntheticReader(n_test=2, image_shape=(64, 64)).read("syn-test-0000")
    seg = load_task(seg_ckpt)
    assert saved["seg_inference"]["tta"] == "flip"  # the override, recorded
    pred = seg.predict_image(ds_item.image, tta="flip")
    assert float(rows[0]["dice_hr"]) == pytest.approx(
        image_scores(pred["labels"], ds_item.mask, 2)["dice"], abs=1e-6
    )


def test_sr_eval_rejects_swapped_checkpoints(tmp_path, seg_ckpt):
    from histoseg.tasks.superres import evaluate_sr_pipeline

    cfg = _compose_sr_eval(
        tmp_path, f"sr_ckpt={seg_ckpt}", f"seg_ckpt={seg_ckpt}", "dataset=sr_synthetic", "device=cpu"
    )
    with pytest.raises(ConfigError, match="not a super-resolution model"):
        evaluate_sr_pipeline(cfg)


# ---------------------------------------------------------------------- real data
@pytest.mark.data
def test_train_sr_tcia_nuclei_debug(make_cfg, data_dir):
    metrics, _ = train(make_cfg("dataset=sr_tcia_nuclei", "trainer=debug", "patch_size=64", base=SR_TINY[:7]))
    assert "val/psnr" in metrics and "val/psnr_bicubic" in metrics


def test_predict_cli_super_resolves_then_segments(make_cfg, tmp_path, seg_ckpt):
    """histoseg-predict sr_ckpt=...: LR folder -> SR (x4, tiled) -> segmentation at SR resolution."""
    from histoseg.data.io import read_image, write_image
    from histoseg.data.readers.synthetic import generate_tile
    from histoseg.tasks.predict import predict
    from tests.conftest import compose_cfg

    sr_out = tmp_path / "srrun"
    sr_out.mkdir()
    sr_cfg = make_cfg("test=false", base=SR_TINY)
    with open_dict(sr_cfg):
        sr_cfg.paths.output_dir = str(sr_out)
    train(sr_cfg)
    lr_dir = tmp_path / "lr"
    for i in range(2):
        img, _ = generate_tile(5, i, (40, 48))
        write_image(lr_dir / f"lr{i}.png", img)
    cfg = compose_cfg(tmp_path / "pred", f"ckpt_path={seg_ckpt}", f"sr_ckpt={sr_out / 'checkpoints' / 'last.ckpt'}",
                      f"input={lr_dir}", "progress=false", "mpp=1.0", "sr.tile_shape=[16,16]", base=[],
                      config_name="predict")
    summary, obj = predict(cfg)
    assert summary["n_ok"] == 2 and summary["n_errors"] == 0
    for i in range(2):
        sr = read_image(tmp_path / "pred" / "sr" / f"lr{i}.png")
        mask = read_image(tmp_path / "pred" / "masks" / f"lr{i}.png", mode="gray")
        assert sr.shape == (160, 192, 3) and mask.shape == (160, 192)
    # morphometry refers to SR pixels: mpp of the LR input divided by the scale
    assert all(abs(float(r["mpp"]) - 0.25) < 1e-9 for r in obj["rows"])
