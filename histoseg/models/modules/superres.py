"""``SuperResolutionTask``: SRGAN training (Ledig et al. 2017) with Lightning manual optimisation.

* ``net`` is the generator (registry backbone ``srgan_generator``, ``scale`` 2/4/8), ``discriminator`` the
  VGG-style adversary (``srgan_discriminator``; ``None`` trains a plain SRResNet with pixel/perceptual loss);
* phase 1, the first ``pretrain_epochs`` epochs: the generator alone, pixel loss only (SRResNet
  pre-training, as in the paper and the source system); phase 2: alternating discriminator / generator
  steps, generator loss = ``pixel`` + ``perceptual`` + ``adversarial`` terms weighted by ``loss_weights``
  (without a discriminator: pixel + perceptual, i.e. SRResNet);
* mixed precision through Lightning's precision plugin (``self.manual_backward`` and
  ``LightningOptimizer.step``), gradient clipping in ``on_before_optimizer_step`` (after AMP unscaling),
  schedulers stepped manually (the discriminator's only in the adversarial phase);
* checkpoints hold both networks, both optimiser and scheduler states (Lightning does this for the
  optimisers returned by ``configure_optimizers``), the torch RNG state and the resolved model config
  (``histoseg`` key), so a run resumes mid-GAN-phase and :func:`histoseg.models.loading.load_task` rebuilds
  the generator from the checkpoint alone;
* validation and test super-resolve *whole images* tile by tile (:func:`histoseg.inference.super_resolve`)
  and log PSNR / SSIM (torchmetrics) beside the bicubic baseline: ``val/psnr``, ``val/ssim``,
  ``val/psnr_bicubic``, ``val/ssim_bicubic``, ``val/psnr_best``; test writes ``per_image.csv`` and
  ``summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import lightning as L
import torch
import torch.nn as nn
from torchmetrics import MaxMetric, MeanMetric

from histoseg.inference.superres import bicubic_upsample, super_resolve
from histoseg.losses.gan import AdversarialLoss, PerceptualLoss, PixelLoss
from histoseg.metrics.image import image_quality as metric_image_quality

log = logging.getLogger(__name__)

DEFAULT_SR_INFERENCE = {
    "tile_shape": [64, 64],
    "overlap": 0.25,
    "batch_size": 4,
    "blend": "gaussian",
    "autocast": None,
}
LOSS_TERMS = ("pixel", "perceptual", "adversarial")


# ---------------------------------------------------------------------- image quality
def image_quality(
    pred: torch.Tensor, target: torch.Tensor, border: int = 0, max_psnr: float = 100.0, quantize: bool = True
) -> dict[str, float]:
    """PSNR (dB) and SSIM of one ``3xHxW`` image in [0,1] against its reference (torchmetrics, data range 1).

    ``border`` pixels are shaved on every side first (the usual SR protocol: ``border = scale``).
    ``quantize`` rounds both to 8 bits (what a saved image holds). Identical images have infinite PSNR:
    it is reported as ``max_psnr`` so means stay finite; their SSIM is 1.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(pred.shape)} and reference {tuple(target.shape)} differ in shape"
        )
    with torch.autocast(pred.device.type, enabled=False):  # SSIM's convolutions are meaningless in bf16
        return _image_quality(pred.float()[None], target.float()[None], border, max_psnr, quantize)


def _image_quality(
    p: torch.Tensor, t: torch.Tensor, border: int, max_psnr: float, quantize: bool
) -> dict[str, float]:
    if border:
        p, t = p[..., border:-border, border:-border], t[..., border:-border, border:-border]
    if quantize:
        p, t = (p.clamp(0, 1) * 255).round() / 255, (t.clamp(0, 1) * 255).round() / 255
    return metric_image_quality(p, t, data_range=1.0, max_db=max_psnr)




class SuperResolutionTask(L.LightningModule):
    """SRGAN LightningModule (manual optimisation).

    Args:
        net: generator module (``scale`` >= 2, RGB in, RGB out).
        discriminator: discriminator module returning ``(B, 1)`` logits, or ``None`` (no adversarial phase).
        g_optimizer / d_optimizer: partials ``optimizer(params)``.
        g_scheduler / d_scheduler: partials ``scheduler(optimizer)`` or ``None``.
        scheduler_interval: ``epoch`` or ``step``.
        pixel_loss / adversarial_loss / perceptual_loss: loss modules (:mod:`histoseg.losses.gan`).
        loss_weights: ``{"pixel", "perceptual", "adversarial"}`` weights of the generator's GAN-phase loss.
        pretrain_epochs: epochs of pixel-loss-only generator training before the adversarial phase.
        gradient_clip_val / gradient_clip_algorithm: clipping of both networks' gradients (``None`` = off).
        metric_border: pixels shaved before PSNR / SSIM; max_psnr: cap for identical images.
        inference: tiled SR settings for val/test (``tile_shape`` in LR pixels, ``overlap``, ``batch_size``,
            ``blend``, ``autocast``).
        report_dir: where test writes ``per_image.csv`` / ``summary.json``.
        model_config: resolved config stored in checkpoints (set by :meth:`from_config`).
    """

    def __init__(
        self,
        net: nn.Module,
        discriminator: nn.Module | None = None,
        g_optimizer: Callable | None = None,
        d_optimizer: Callable | None = None,
        g_scheduler: Callable | None = None,
        d_scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        pixel_loss: nn.Module | None = None,
        adversarial_loss: AdversarialLoss | None = None,
        perceptual_loss: PerceptualLoss | None = None,
        loss_weights: Mapping[str, float] | None = None,
        pretrain_epochs: int = 0,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        metric_border: int = 0,
        max_psnr: float = 100.0,
        inference: Mapping | None = None,
        report_dir: str | None = None,
        model_config: dict | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if int(getattr(net, "scale", 1)) < 2:
            raise ValueError(
                f"the generator must upscale (scale >= 2); {type(net).__name__} has scale {getattr(net, 'scale', None)}"
            )
        self.net, self.discriminator = net, discriminator
        self.scale = int(net.scale)
        self.g_optimizer_factory, self.d_optimizer_factory = g_optimizer, d_optimizer
        self.g_scheduler_factory, self.d_scheduler_factory = g_scheduler, d_scheduler
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.scheduler_interval = scheduler_interval
        self.pixel_loss = pixel_loss if pixel_loss is not None else PixelLoss("l1")
        self.adversarial_loss = adversarial_loss if adversarial_loss is not None else AdversarialLoss("bce")
        self.perceptual_loss = perceptual_loss
        weights = dict(loss_weights or {"pixel": 1.0, "perceptual": 0.0, "adversarial": 0.0})
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss_weights {sorted(unknown)}; valid: {list(LOSS_TERMS)}")
        self.loss_weights = {k: float(weights.get(k, 0.0)) for k in LOSS_TERMS}
        if discriminator is None and self.loss_weights["adversarial"]:
            raise ValueError(
                "loss_weights.adversarial > 0 needs a discriminator (model.discriminator is null)"
            )
        if discriminator is not None and d_optimizer is None:
            raise ValueError("a discriminator needs d_optimizer")
        self.pretrain_epochs = int(pretrain_epochs)
        self.gradient_clip_val = float(gradient_clip_val) if gradient_clip_val else None
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.metric_border, self.max_psnr = int(metric_border), float(max_psnr)
        if inference is not None and not isinstance(inference, dict):
            from omegaconf import OmegaConf

            inference = OmegaConf.to_container(inference, resolve=True)
        self.inference = {**DEFAULT_SR_INFERENCE, **dict(inference or {})}
        self.report_dir = report_dir
        self.model_config = model_config or {}
        self.use_perceptual = False
        self.train_degradation: dict | None = None
        self.quality = nn.ModuleDict(
            {
                f"{s}_{m}": MeanMetric()
                for s in ("val", "test")
                for m in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic")
            }
        )
        self.val_psnr_best = MaxMetric()
        self.test_rows: list[dict] = []

    # ------------------------------------------------------------------ construction from the config
    @classmethod
    def from_config(cls, cfg) -> SuperResolutionTask:
        """Build from a composed ``train`` config (``task=sr``); :func:`histoseg.tasks.train.build_task` calls it."""
        from omegaconf import OmegaConf

        from histoseg.tasks.utils import ConfigError, build

        if cfg.dataset.get("degradation") is None:
            raise ConfigError(
                f"model {cfg.model._target_} trains super-resolution but dataset {cfg.dataset.get('name')!r} makes no "
                "LR images; use an SR dataset (dataset=sr_<name>, e.g. sr_synthetic, sr_monuseg)"
            )
        if cfg.trainer.get("gradient_clip_val") is not None:
            raise ConfigError(
                "trainer.gradient_clip_val does not apply to SRGAN's manual optimisation; "
                "set model.gradient_clip_val instead (and trainer.gradient_clip_val=null)"
            )
        extra = {}
        if cfg.get("inference"):
            extra["inference"] = OmegaConf.to_container(cfg.inference, resolve=True)
        if cfg.get("paths") and cfg.paths.get("output_dir"):
            extra["report_dir"] = cfg.paths.output_dir
        task = build(cfg.model, "model", **extra)
        task.model_config = OmegaConf.to_container(cfg.model, resolve=True)
        return task

    # ------------------------------------------------------------------ forward / predict
    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.net(lr)

    def super_resolve(self, image, **overrides) -> torch.Tensor:
        """Whole-image SR with this task's tiled inference settings (``overrides`` replace them)."""
        cfg = {**self.inference, **overrides}
        return super_resolve(
            image,
            self,
            tile_shape=cfg["tile_shape"],
            overlap=cfg["overlap"],
            batch_size=cfg["batch_size"],
            blend=cfg["blend"],
            device=self.device,
            autocast=cfg.get("autocast"),
        )

    @property
    def in_pretraining(self) -> bool:
        """The first ``pretrain_epochs`` epochs: generator only, pixel loss only."""
        return self.current_epoch < self.pretrain_epochs

    @property
    def adversarial(self) -> bool:
        return self.discriminator is not None and not self.in_pretraining

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            scale = getattr(dm, "sr_scale", None)
            if scale is None:
                raise ValueError(
                    f"dataset {getattr(dm, 'name', '?')!r} makes no LR images; use an SR dataset (sr_<name>)"
                )
            if int(scale) != self.scale:
                raise ValueError(
                    f"the generator upscales x{self.scale} but the dataset degrades x{scale}; set one sr_scale"
                )
            self.train_degradation = dm.degradation.config()
        if stage == "fit":
            w = self.loss_weights["perceptual"]
            if w and self.perceptual_loss is not None and self.perceptual_loss.build():
                self.use_perceptual = True
                log.info("perceptual loss: %s (weight %g)", self.perceptual_loss.describe(), w)
            elif w:
                log.warning(
                    "No perceptual network: perceptual.seg_ckpt is not set, so SRGAN trains with pixel + adversarial "
                    "losses only (loss_weights.perceptual=%g ignored). Set model.perceptual_loss.seg_ckpt=<histoseg "
                    "segmentation checkpoint> (offline default) or model.perceptual_loss.network=vgg19.",
                    w,
                )
            if self.discriminator is not None and self.pretrain_epochs >= self.trainer.max_epochs > 0:
                log.warning(
                    "pretrain_epochs=%d >= max_epochs=%d: the adversarial phase never starts",
                    self.pretrain_epochs,
                    self.trainer.max_epochs,
                )

    # ------------------------------------------------------------------ training
    def _optimizers(self):
        opts = self.optimizers()
        return (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)

    def _generator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict]:
        terms = {"pixel": self.pixel_loss(sr, hr)}
        if self.in_pretraining:
            return terms["pixel"], terms
        if self.use_perceptual:
            terms["perceptual"] = self.perceptual_loss(sr, hr)
        if self.adversarial:
            fake_logits = self.discriminator(sr)
            real_logits = (
                self.discriminator(hr).detach() if self.adversarial_loss.needs_real_for_generator else None
            )
            terms["adversarial"] = self.adversarial_loss.generator_loss(fake_logits, real_logits)
        return sum(self.loss_weights[k] * v for k, v in terms.items()), terms

    def training_step(self, batch: dict, batch_idx: int) -> None:
        lr, hr = batch["lr"], batch["hr"]
        g_opt, d_opt = self._optimizers()
        adversarial = self.adversarial
        bs = hr.shape[0]
        sr = self.net(lr)

        if adversarial:
            # discriminator step: the generator's output is detached, its parameters are frozen (toggle)
            with self.toggled_optimizer(d_opt):
                real_logits = self.discriminator(hr)
                fake_logits = self.discriminator(sr.detach())
                d_loss = self.adversarial_loss.discriminator_loss(real_logits, fake_logits)
                self._check_finite(d_loss, "discriminator")
                d_opt.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                d_opt.step()
            self.log("train/d_loss", d_loss, on_step=True, on_epoch=True, batch_size=bs)
            self.log(
                "train/d_real",
                torch.sigmoid(real_logits.detach().float()).mean(),
                on_epoch=True,
                batch_size=bs,
            )
            self.log(
                "train/d_fake",
                torch.sigmoid(fake_logits.detach().float()).mean(),
                on_epoch=True,
                batch_size=bs,
            )

        # generator step: the discriminator's parameters are frozen (toggle); gradients pass through it to sr
        with self.toggled_optimizer(g_opt):
            g_loss, terms = self._generator_loss(sr, hr)
            self._check_finite(g_loss, "generator")
            g_opt.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            g_opt.step()
        self.log("train/loss", g_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=bs)
        if self.scheduler_interval == "step":
            self._step_schedulers(adversarial)

    def _check_finite(self, loss: torch.Tensor, who: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {who} loss {loss.item()} at step {self.global_step}")

    def on_before_optimizer_step(self, optimizer) -> None:
        # called after the precision plugin unscaled the gradients (16-mixed), right before the step
        if self.gradient_clip_val:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def _step_schedulers(self, adversarial: bool) -> None:
        d_opt = self._optimizers()[1]
        for conf in self.trainer.lr_scheduler_configs:
            is_d = d_opt is not None and conf.scheduler.optimizer is d_opt.optimizer
            if is_d and not adversarial:
                continue  # the discriminator's schedule starts with its training
            conf.scheduler.step()

    def on_train_epoch_end(self) -> None:
        self.log("train/adversarial_phase", float(self.adversarial))
        if self.scheduler_interval == "epoch":
            self._step_schedulers(self.adversarial)

    def configure_optimizers(self):
        if self.g_optimizer_factory is None:
            raise ValueError("no g_optimizer configured")
        g_opt = self.g_optimizer_factory(params=[p for p in self.net.parameters() if p.requires_grad])
        opts, scheds = [g_opt], []
        if self.g_scheduler_factory is not None:
            scheds.append(self.g_scheduler_factory(optimizer=g_opt))
        if self.discriminator is not None:
            d_opt = self.d_optimizer_factory(
                params=[p for p in self.discriminator.parameters() if p.requires_grad]
            )
            opts.append(d_opt)
            if self.d_scheduler_factory is not None:
                scheds.append(self.d_scheduler_factory(optimizer=d_opt))
        for sched in scheds:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ValueError("ReduceLROnPlateau needs a metric; SRGAN steps its schedulers without one")
        return opts, scheds

    # ------------------------------------------------------------------ validation / test
    def _quality_step(self, batch: dict, stage: str) -> dict:
        lr, hr = batch["lr"][0], batch["hr"][0].cpu()
        sr = self.super_resolve(lr)
        bic = bicubic_upsample(lr.cpu(), self.scale)
        q = image_quality(sr, hr, self.metric_border, self.max_psnr)
        qb = image_quality(bic, hr, self.metric_border, self.max_psnr)
        row = {**q, **{f"{k}_bicubic": v for k, v in qb.items()}}
        for k, v in row.items():
            self.quality[f"{stage}_{k}"].update(torch.tensor(v, device=self.device))
        return row

    def on_validation_epoch_start(self) -> None:
        for k, m in self.quality.items():
            if k.startswith("val_"):
                m.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "padding" in batch:  # DDP filler (see ShardSampler): every image is scored once
            return
        self._quality_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if not self.quality["val_psnr"].update_called:
            return
        values = {k[4:]: m.compute() for k, m in self.quality.items() if k.startswith("val_")}
        for k, v in values.items():
            self.log(f"val/{k}", v, sync_dist=True, prog_bar=k == "psnr")
        if not self.trainer.sanity_checking:
            self.val_psnr_best.update(values["psnr"])
            self.log("val/psnr_best", self.val_psnr_best.compute(), sync_dist=True)

    def on_test_epoch_start(self) -> None:
        for k, m in self.quality.items():
            if k.startswith("test_"):
                m.reset()
        self.test_rows = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if "padding" in batch:
            return
        row = self._quality_step(batch, "test")
        self.test_rows.append({"case_id": batch["case_id"][0], **row})

    def on_test_epoch_end(self) -> None:
        from histoseg.models.modules.segmentation import finish_test

        extra = {
            "inference": self.inference,
            "scale": self.scale,
            "metric_border": self.metric_border,
            "degradation": self.train_degradation,
        }
        finish_test(self, self.test_rows, extra)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["histoseg"] = {
            "task": "sr",
            "model_config": self.model_config,
            "scale": self.scale,
            "inference": dict(self.inference),
            "degradation": self.train_degradation,
        }
        checkpoint["histoseg_rng"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("histoseg_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        deg = checkpoint.get("histoseg", {}).get("degradation")
        if deg is not None:
            self.train_degradation = deg
