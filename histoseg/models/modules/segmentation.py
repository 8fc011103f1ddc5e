"""``SegmentationTask``: the LightningModule for semantic (and, with heads, instance-aware) segmentation.

* mode from ``num_classes``: 2 -> binary (1 logit, sigmoid), K > 2 -> multiclass (K logits, softmax);
* the backbone comes from the registry (``net`` is a partial taking ``in_channels`` and ``num_classes``);
* loss, optimizer and scheduler are objects built from config (``conf/loss``, ``conf/optimizer``);
* training sees random patches; validation and test predict *whole images* with
  :func:`histoseg.inference.tiled_predict`, so ``val/dice`` and ``test/*`` are whole-image numbers;
* test writes ``per_image.csv`` and ``summary.json`` (pixel and, with instance maps, AJI / PQ; with centre-point
  annotations, detection precision / recall / F1 of the predicted nuclei);
* checkpoints carry the resolved model config (``histoseg`` key) so a checkpoint alone rebuilds the net.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from torchmetrics import MaxMetric, MeanMetric

from histoseg.data.scale import check_scale, resize_chw, scaled_size
from histoseg.inference.postprocess import PostProcessor
from histoseg.inference.tiled import tiled_predict, to_float, with_tta
from histoseg.losses.multihead import MultiHeadLoss
from histoseg.losses.segmentation import mode_for
from histoseg.metrics.instance import instance_scores
from histoseg.metrics.pixel import SegMetrics, image_scores
from histoseg.metrics.points import point_scores

log = logging.getLogger(__name__)

DEFAULT_INFERENCE = {"tile_shape": [256, 256], "overlap": 0.25, "batch_size": 8, "tta": "none", "blend": "gaussian"}


class SegmentationTask(L.LightningModule):
    """Segmentation LightningModule.

    Args:
        net: backbone module, or a callable ``net(in_channels=, num_classes=)`` building it (Hydra partial).
        loss: a loss module taking ``(logits, target)``.
        optimizer: partial ``optimizer(params)``; scheduler: partial ``scheduler(optimizer)`` or ``None``.
        num_classes: classes including background (2 = binary).
        in_channels: input channels.
        scheduler_interval: ``epoch`` or ``step``.
        inference: tiled inference settings for val/test (tile_shape, overlap, batch_size, tta, blend, and
            ``stain_norm``: null or ``reinhard``, whole images moved to the training images' colour statistics
            ``data_info['stain_ref']`` before tiling, see :mod:`histoseg.data.stain`; ``scale``: the working
            resolution, each whole image resized by it before tiling and the logits back, :mod:`histoseg.data.scale`).
        postprocess: a :class:`PostProcessor` (instances for AJI/PQ at test time).
        channels_last / compile: speed options (``torch.compile`` wraps the forward, weights stay plain).
        gpu_aug: batch augmentation applied to training batches on the device at the start of the training
            step (:class:`histoseg.aug.gpu.BatchAug`, ``conf/gpu_aug``); ``None`` = off.
        report_dir: where test writes ``per_image.csv`` / ``summary.json`` (default: the logger's dir).
        model_config: resolved config stored in checkpoints (set by ``histoseg.tasks.train``).

    ``data_info`` (dataset ``name``, ``mpp``, ``class_names``, ``stain_ref``) is taken from the trainer's datamodule at
    setup and stored in checkpoints, so prediction knows the pixel size and evaluation the training split.
    """

    def __init__(
        self,
        net: nn.Module | Callable[..., nn.Module],
        loss: nn.Module | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        num_classes: int = 2,
        in_channels: int = 3,
        scheduler_interval: str = "epoch",
        inference: dict | None = None,
        postprocess: PostProcessor | None = None,
        channels_last: bool = False,
        compile: bool = False,
        report_dir: str | None = None,
        model_config: dict | None = None,
        heads: dict[str, int] | None = None,
        head_activations: dict[str, str] | None = None,
        gpu_aug: Callable[..., dict] | None = None,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.mode = mode_for(self.num_classes)
        self.heads = self._check_heads(heads)
        self.head_activations = {"dist": "sigmoid", "hv": "tanh", **dict(head_activations or {})}
        self.out_channels = sum(self.heads.values()) if self.heads else (1 if self.mode == "binary" else self.num_classes)
        self.net = net if isinstance(net, nn.Module) else net(in_channels=in_channels, num_classes=self.out_channels)
        got = getattr(self.net, "num_classes", self.out_channels)
        if got != self.out_channels:
            raise ValueError(f"net outputs {got} channels but a {self.mode} task with {num_classes} classes needs {self.out_channels}")
        self.loss_fn = loss
        if self.heads and loss is not None and not isinstance(loss, MultiHeadLoss):
            raise ValueError(
                f"model.heads={dict(self.heads)} needs a MultiHeadLoss, got {type(loss).__name__}: a target=... config "
                "sets it, but an experiment preset's `override /loss` wins over it; add the matching loss=mh_<target> "
                "(e.g. loss=mh_three_class_distance) or use an instance preset (experiment=monuseg_instance / nuclei_instance)"
            )
        if loss is not None and getattr(loss, "mode", None) not in (None, self.mode) and not self.heads:
            raise ValueError(
                f"loss is configured for {loss.mode} segmentation but the dataset has {num_classes} classes ({self.mode})"
            )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        if inference is not None and not isinstance(inference, dict):
            from omegaconf import OmegaConf

            inference = OmegaConf.to_container(inference, resolve=True)
        self.inference = {**DEFAULT_INFERENCE, **dict(inference or {})}
        self.postprocess = postprocess or PostProcessor(instances="none")
        self.channels_last, self.compile_net = bool(channels_last), bool(compile)
        self.report_dir = report_dir
        self.model_config = model_config or {}
        self.data_info: dict = {}
        self.report_meta: dict = {}  # extra keys for summary.json (histoseg-eval: checkpoint, split)
        self.maps_dir: str | None = None  # histoseg-eval save_maps=true: each test image's maps as <case>.npz
        self._fwd = None
        self.gpu_aug = gpu_aug
        self.metrics = nn.ModuleDict({f"{s}_metrics": SegMetrics(self.num_classes) for s in ("train", "val", "test")})
        self.val_loss = MeanMetric()
        self.val_dice_best = MaxMetric()
        self.test_rows: list[dict] = []
        # the first ``val_keep`` whole-image validation predictions of an epoch (image, mask, pred, case_id)
        # on this rank, for callbacks that show them (histoseg.callbacks.ValidationPanels sets val_keep)
        self.val_keep = 0
        self.val_examples: list[dict] = []

    def _check_heads(self, heads) -> dict[str, int] | None:
        if not heads:
            return None
        heads = {str(k): int(v) for k, v in dict(heads).items()}
        if "seg" not in heads:
            raise ValueError(f"model.heads needs a 'seg' class head; got {sorted(heads)}")
        if self.mode != "binary":
            raise ValueError("multi-head (instance-aware) models need a binary nuclei dataset (num_classes=2)")
        if heads["seg"] not in (1, 3):
            raise ValueError(f"the seg head has 1 (binary) or 3 (three_class) channels, got {heads['seg']}")
        return heads

    # ------------------------------------------------------------------ forward / predict
    @property
    def head_slices(self) -> dict[str, slice]:
        """Each head's output channels, in ``model.heads`` order (empty without heads)."""
        out, i = {}, 0
        for name, c in (self.heads or {}).items():
            out[name], i = slice(i, i + c), i + c
        return out

    def split(self, out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw output -> ``{head: tensor}``; regression heads get their activation (class heads stay logits)."""
        parts = {}
        for name, sl in self.head_slices.items():
            t = out[:, sl]
            act = self.head_activations.get(name, "none") if name != "seg" else "none"
            parts[name] = torch.sigmoid(t) if act == "sigmoid" else torch.tanh(t) if act == "tanh" else t
        return parts

    @property
    def vector_channels(self) -> tuple[int, int] | None:
        """Output channels ``(h, v)`` of the ``hv`` head (an offset field: test-time flips and rotations must turn
        its vectors, :func:`histoseg.inference.tiled.with_tta`); None without one."""
        sl = self.head_slices.get("hv")
        return None if sl is None else (sl.start, sl.start + 1)

    def foreground_logit_hard(self, out: torch.Tensor) -> torch.Tensor:
        """Hard nucleus mask from raw output (any head layout)."""
        if not self.heads:
            return self.hard(out)
        seg = out[:, : self.heads["seg"]]
        if seg.shape[1] == 1:
            return (seg[:, 0] > 0).long()
        return (seg.argmax(1) > 0).long()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit" and dm is not None and hasattr(dm, "class_names"):
            self.data_info = {"name": getattr(dm, "name", None), "mpp": getattr(dm, "mpp", None),
                              "class_names": list(dm.class_names)}
            ref = dm.stain_reference() if hasattr(dm, "stain_reference") else None
            if ref is not None:  # stored in checkpoints: inference.stain_norm can be switched on later
                self.data_info["stain_ref"] = ref
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.compile_net and self._fwd is None:
            self._fwd = torch.compile(self.net)
        if stage == "fit" and self.loss_fn is not None and getattr(self.loss_fn, "needs_class_weights", False):
            dm = self.trainer.datamodule
            counts = dm.class_pixel_counts()
            w = self.loss_fn.set_class_weights(counts)
            log.info("class weights w_i = N / N_i from training masks: %s", np.round(np.asarray(w), 3).tolist())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # `self._fwd or ...` would call len() on the compiled module, which smp models do not support
        return (self._fwd if self._fwd is not None else self.net)(x)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.mode == "binary" else torch.softmax(logits, dim=1)

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard class map from logits (threshold 0.5 / argmax)."""
        if self.mode == "binary":
            return (logits[:, 0] > 0).long()
        return logits.argmax(1)

    def predict_logits(self, image: torch.Tensor, **overrides) -> torch.Tensor:
        """Whole-image logits ``(K, H, W)`` on CPU by Gaussian-blended tiles (with optional TTA)."""
        cfg = {**self.inference, **overrides}
        was_training = self.training
        self.eval()
        try:
            autocast = cfg.get("autocast")
            if autocast is None and self._trainer is not None and "bf16" in str(self._trainer.precision):
                autocast = "bf16"
            image = self.normalize_stain(image, cfg.get("stain_norm"))
            scale = check_scale(cfg.get("scale"))
            full = tuple(image.shape[-2:])
            if scale != 1.0:  # the working resolution the network was trained at (histoseg.data.scale)
                image = resize_chw(to_float(image), scaled_size(*full, scale))
            logits = tiled_predict(
                image,
                with_tta(self, cfg.get("tta")),
                tile_shape=cfg["tile_shape"],
                overlap=cfg["overlap"],
                blend=cfg.get("blend", "gaussian"),
                batch_size=cfg["batch_size"],
                device=self.device,
                autocast=autocast,
            )
            return logits if scale == 1.0 else resize_chw(logits, full)
        finally:
            self.train(was_training)

    def normalize_stain(self, image: torch.Tensor, method: str | None) -> torch.Tensor:
        """``image`` (3xHxW in [0, 1]) moved to the training images' colour statistics (``inference.stain_norm``,
        :mod:`histoseg.data.stain`); unchanged when ``method`` is null."""
        if not method:
            return image
        from histoseg.data.stain import check_method, reinhard_normalize

        check_method(method)
        ref = self.data_info.get("stain_ref")
        if ref is None:
            raise ValueError(
                f"inference.stain_norm={method} but this model stores no stain reference (the training images' colour "
                "statistics, kept in checkpoints trained since stain normalisation landed): histoseg-eval computes it "
                "from the checkpoint's training split and writes it to summary.json; pass that file as "
                "stain_ref_from=<summary.json>")
        arr = image.detach().float().cpu().permute(1, 2, 0).numpy()
        out = torch.from_numpy(np.ascontiguousarray(reinhard_normalize(arr, ref).transpose(2, 0, 1)))
        return out.to(device=image.device, dtype=image.dtype)

    @torch.no_grad()
    def predict_image(self, image, **overrides) -> dict:
        """The one whole-image prediction API (eval, predict CLI, SR pipeline and slides use it).

        ``image``: ``3xHxW`` float tensor in [0,1] or ``HxWx3`` uint8 array. Returns ``probs`` (K,H,W) float32
        numpy (K = 1 for binary: foreground probability), ``labels`` (H,W) class map and ``instances``
        (H,W) or ``None``, after this task's post-processing.
        """
        maps = self.predict_maps(image, **overrides)
        return {**maps, **self.postprocess(maps if self.heads else maps["probs"])}

    @torch.no_grad()
    def predict_maps(self, image, **overrides) -> dict:
        """Whole-image activated outputs as numpy: ``probs`` (K,H,W); with heads also ``fg`` (nucleus
        probability), ``interior`` (three-class head), ``dist`` (H,W) and ``hv`` (2,H,W)."""
        if isinstance(image, np.ndarray):
            from histoseg.data.datasets import to_tensor_image

            image = to_tensor_image(image)
        raw = self.predict_logits(image, **overrides).unsqueeze(0)
        return self.maps_from_raw(raw)

    def maps_from_raw(self, raw: torch.Tensor) -> dict:
        if not self.heads:
            return {"probs": self.activate(raw)[0].numpy()}
        parts = self.split(raw)
        seg = parts["seg"]
        out = {}
        if seg.shape[1] == 1:
            p = torch.sigmoid(seg)[0]
            out["probs"], out["fg"] = p.numpy(), p[0].numpy()
        else:
            p = torch.softmax(seg, 1)[0]
            out["probs"], out["fg"], out["interior"] = p.numpy(), (1 - p[0]).numpy(), p[1].numpy()
        if "dist" in parts:
            out["dist"] = parts["dist"][0, 0].numpy()
        if "hv" in parts:
            out["hv"] = parts["hv"][0].numpy()
        return out

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.gpu_aug is not None:  # on the device, seeded by (rank, epoch, batch index): resumable
            batch = self.gpu_aug(batch, self.global_rank, self.current_epoch, batch_idx)
        logits = self(batch["image"])
        if self.heads:
            loss = self.loss_fn(self.split(logits), batch)
            for k, v in self.loss_fn.last.items():
                self.log(f"train/loss_{k}", v, on_step=False, on_epoch=True, batch_size=batch["image"].shape[0])
        else:
            loss = self.loss_fn(logits, batch["mask"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}")
        self.metrics["train_metrics"].update(self.foreground_logit_hard(logits.detach()), batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        for k, v in self.metrics["train_metrics"].compute().items():
            self.log(f"train/{k}", v, sync_dist=True)
        self.metrics["train_metrics"].reset()

    def _whole_image_step(self, batch: dict, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        overrides = dict(self.inference.get("val") or {}) if stage == "val" else {}
        logits = self.predict_logits(batch["image"][0], **overrides).unsqueeze(0)
        target = batch["mask"].cpu()
        if self.loss_fn is not None and stage == "val" and not self.heads:
            self.val_loss.update(self.loss_fn(logits, target).to(self.device))
        preds = self.foreground_logit_hard(logits)
        self.metrics[f"{stage}_metrics"].update(preds.to(self.device), target.to(self.device))
        return logits, preds

    def on_validation_epoch_start(self) -> None:
        self.metrics["val_metrics"].reset()
        self.val_loss.reset()
        self.val_examples = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "padding" in batch:  # DDP filler so that ranks run equal step counts; every image is scored once
            return
        _, preds = self._whole_image_step(batch, "val")
        if len(self.val_examples) < self.val_keep:
            self.val_examples.append({
                "case_id": batch["case_id"][0], "image": batch["image"][0].detach().cpu(),
                "mask": batch["mask"][0].detach().cpu(), "pred": preds[0].detach().cpu(),
            })

    def on_validation_epoch_end(self) -> None:
        scores = self.metrics["val_metrics"].compute()
        for k, v in scores.items():
            self.log(f"val/{k}", v, sync_dist=True, prog_bar=k == "dice")
        if self.loss_fn is not None and self.val_loss.update_count:
            self.log("val/loss", self.val_loss.compute(), sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_dice_best.update(scores["dice"])
            self.log("val/dice_best", self.val_dice_best.compute(), sync_dist=True)
        self.metrics["val_metrics"].reset()

    def on_test_epoch_start(self) -> None:
        self.metrics["test_metrics"].reset()
        self.test_rows = []

    def test_step(self, batch: dict, batch_idx: int) -> dict | None:
        if "padding" in batch:  # DDP filler (see ShardSampler): every image is scored once
            return None
        logits, preds = self._whole_image_step(batch, "test")
        maps = self.maps_from_raw(logits)
        post = self.postprocess(maps if self.heads else maps["probs"])
        row = {"case_id": batch["case_id"][0]}
        row.update(image_scores(post["labels"], batch["mask"][0].numpy(), self.num_classes))
        row.update({f"raw_{k}": v for k, v in image_scores(preds[0].numpy(), batch["mask"][0].numpy(), self.num_classes).items()
                    if k in ("dice", "iou", "acc")})
        if "instances" in batch and post["instances"] is not None:
            row.update(instance_scores(batch["instances"][0].numpy(), post["instances"]))
        if "points" in batch and post["instances"] is not None:  # centre-point annotations (BreCaHAD)
            row.update(point_scores(batch["points"][0].numpy(), post["instances"], float(batch["point_radius"][0])))
        self.test_rows.append(row)
        if self.maps_dir:
            save_maps(Path(self.maps_dir) / f"{row['case_id']}.npz", maps, post, batch)
        return {"labels": post["labels"], "instances": post["instances"], "scores": row}  # for figure callbacks

    def on_test_epoch_end(self) -> None:
        extra = {"postprocess": self.postprocess.config(), "inference": self.inference, **self.report_meta}
        if self.inference.get("stain_norm"):  # the reference used (stain_ref_from=<summary.json> reuses it)
            extra["stain_ref"] = self.data_info.get("stain_ref")
        finish_test(self, self.test_rows, extra)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured")
        opt = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["histoseg"] = {
            "model_config": self.model_config,
            "num_classes": self.num_classes,
            "inference": dict(self.inference),
            "postprocess": self.postprocess.config(),
            "dataset": dict(self.data_info),
        }
        checkpoint["histoseg_rng"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("histoseg_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        pp = checkpoint.get("histoseg", {}).get("postprocess")
        if pp:
            self.postprocess = PostProcessor(**pp)
        stored = checkpoint.get("histoseg", {}).get("dataset")
        if stored:
            self.data_info = dict(stored)


def save_maps(path: Path, maps: dict, post: dict, batch: dict) -> None:
    """One test image's outputs for analysis outside histoseg (e.g. other post-processing): the activated maps
    as float16 (``probs``, ``fg``, ``interior``, ``dist``, ``hv``, whichever the model has), the post-processed
    ``pred_labels`` / ``pred_instances`` and the ground truth ``true_mask`` / ``true_instances``, in one
    compressed ``.npz`` written atomically (no half-written file on an interruption)."""
    import io

    from histoseg.data.io import atomic_write_bytes

    arrays = {k: np.asarray(v, np.float16) for k, v in maps.items()}
    arrays["pred_labels"] = np.asarray(post["labels"], np.uint8)
    if post.get("instances") is not None:
        arrays["pred_instances"] = np.asarray(post["instances"], np.int32)
    arrays["true_mask"] = batch["mask"][0].numpy().astype(np.uint8)
    if "instances" in batch:
        arrays["true_instances"] = batch["instances"][0].numpy().astype(np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def finish_test(module: L.LightningModule, rows: list[dict], extra: dict) -> None:
    """End of a whole-image test: gather per-image rows from all ranks, log the means as ``test/*`` and
    write ``per_image.csv`` + ``summary.json`` (rank 0) into the module's ``report_dir``."""
    trainer = module.trainer
    if trainer.world_size > 1:
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    summary = summarize(rows)
    for k, v in summary["mean"].items():
        module.log(f"test/{k}", float(v), rank_zero_only=True, sync_dist=False)
    if trainer.is_global_zero and rows:
        out = Path(module.report_dir or (trainer.log_dir or trainer.default_root_dir))
        write_report(rows, summary, out, extra=extra)
        log.info("whole-image test report written to %s", out)


def summarize(rows: list[dict]) -> dict:
    """Mean / std / median over images of every numeric column."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float, np.floating, np.integer))})
    out = {"n_images": len(rows), "mean": {}, "std": {}, "median": {}}
    for k in keys:
        vals = np.array([float(r[k]) for r in rows if k in r])
        out["mean"][k], out["std"][k], out["median"][k] = float(vals.mean()), float(vals.std()), float(np.median(vals))
    return out


def write_report(rows: list[dict], summary: dict, out_dir: str | Path, extra: dict | None = None) -> None:
    """``per_image.csv`` (one row per image) and ``summary.json`` (mean/std/median), written atomically."""
    import csv
    import io

    from histoseg.data.io import atomic_write_text

    out = Path(out_dir)
    cols = ["case_id"] + sorted({k for r in rows for k in r if k != "case_id"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(out / "per_image.csv", buf.getvalue())
    atomic_write_text(out / "summary.json", json.dumps({**summary, **(extra or {})}, indent=1, default=str))
