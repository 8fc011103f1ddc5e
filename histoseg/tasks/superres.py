"""SR -> segmentation pipeline and its evaluation (``histoseg-sr-eval``, ``python -m histoseg.tasks.superres``).

:func:`super_resolve` (from :mod:`histoseg.inference.superres`) super-resolves an LR image of any size tile
by tile. :func:`evaluate_sr_pipeline` answers "does SR help the nuclei segmenter?": for every HR image of
the chosen split it makes the LR image (the dataset's degradation, deterministic per case), then reports

* PSNR / SSIM of the SR image and of bicubic upsampling against HR;
* segmentation Dice (and AJI / PQ where the data has instance maps) of one segmentation checkpoint on
  (a) the HR image, (b) the bicubic-upsampled LR, (c) the SR-upsampled LR;
* nuclei count, density, area and shape from the segmentation of the SR image (and of HR for reference,
  and the ground truth where instance maps exist);

and writes ``per_image.csv`` (one row per image) and ``summary.json`` (mean / std / median and the
SR-vs-HR Dice ratio).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from histoseg.analysis.morphometry import nuclei_stats
from histoseg.inference.superres import bicubic_upsample, super_resolve
from histoseg.utils.logging import get_logger

__all__ = ["super_resolve", "bicubic_upsample", "evaluate_sr_pipeline", "nuclei_stats", "run"]

log = get_logger(__name__)




def _instances_of(pred: dict) -> np.ndarray:
    """Predicted instances, or connected components of the foreground when the seg post-processing has none."""
    if pred.get("instances") is not None:
        return np.asarray(pred["instances"])
    from scipy import ndimage

    return ndimage.label(np.asarray(pred["labels"]) > 0)[0]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_sr_pipeline(cfg: DictConfig) -> dict:
    """Run the three-way SR -> segmentation evaluation described in the module docstring.

    Returns the summary dict (also written to ``<output_dir>/summary.json`` beside ``per_image.csv``).
    """
    from histoseg.data.superres import SRDataModule
    from histoseg.metrics.instance import instance_scores
    from histoseg.metrics.pixel import image_scores
    from histoseg.models.loading import load_task
    from histoseg.models.modules.segmentation import SegmentationTask, summarize, write_report
    from histoseg.models.modules.superres import SuperResolutionTask, image_quality
    from histoseg.tasks.utils import ConfigError, build

    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be 'test' or 'val', got {cfg.split!r}")
    device = _device(cfg.device)
    sr_task = load_task(cfg.sr_ckpt, device=device)
    seg_task = load_task(cfg.seg_ckpt, device=device)
    if not isinstance(sr_task, SuperResolutionTask):
        raise ConfigError(
            f"sr_ckpt={cfg.sr_ckpt} holds a {type(sr_task).__name__}, not a super-resolution model"
        )
    if not isinstance(seg_task, SegmentationTask):
        raise ConfigError(
            f"seg_ckpt={cfg.seg_ckpt} holds a {type(seg_task).__name__}, not a segmentation model"
        )

    dm = build(cfg.dataset, "dataset")
    if not isinstance(dm, SRDataModule):
        raise ConfigError(f"dataset {cfg.dataset.get('name')!r} is not an SR dataset; use dataset=sr_<name>")
    if dm.sr_scale != sr_task.scale:
        raise ConfigError(
            f"the SR checkpoint upscales x{sr_task.scale} but sr_scale={dm.sr_scale}; set sr_scale={sr_task.scale}"
        )
    if sr_task.train_degradation and sr_task.train_degradation != dm.degradation.config():
        log.warning(
            "LR degradation %s differs from the SR model's training degradation %s",
            dm.degradation.config(),
            sr_task.train_degradation,
        )
    if seg_task.num_classes != dm.num_classes:
        raise ConfigError(
            f"seg_ckpt predicts {seg_task.num_classes} classes but dataset {dm.name!r} has {dm.num_classes}"
        )
    dm.setup(cfg.split if cfg.split == "test" else "validate")
    ds = dm.test_set if cfg.split == "test" else dm.val_set
    n = len(ds) if cfg.limit is None else min(len(ds), int(cfg.limit))
    mpp = cfg.mpp if cfg.mpp is not None else dm.mpp
    sr_inf = dict(sr_task.inference)
    if cfg.get("sr_inference"):
        sr_inf.update(OmegaConf.to_container(cfg.sr_inference, resolve=True))
    border = int(cfg.metric_border)
    seg_over = {k: v for k, v in (cfg.get("seg_inference") or {}).items() if v is not None}

    rows: list[dict] = []
    for i in tqdm(range(n), desc="sr-eval", disable=n < 2):
        item = ds[i]
        hr, lr, mask = item["hr"], item["lr"], item["mask"].numpy()
        true_inst = item["instances"].numpy() if "instances" in item else None
        sr = super_resolve(
            lr,
            sr_task,
            tile_shape=sr_inf["tile_shape"],
            overlap=sr_inf["overlap"],
            batch_size=sr_inf["batch_size"],
            blend=sr_inf["blend"],
            device=device,
            autocast=sr_inf.get("autocast"),
        )
        bic = bicubic_upsample(lr, dm.sr_scale)
        row: dict = {"case_id": item["case_id"], "hr_shape": f"{hr.shape[1]}x{hr.shape[2]}"}
        for name, img in (("sr", sr), ("bicubic", bic)):
            q = image_quality(img, hr, border, sr_task.max_psnr)
            row[f"psnr_{name}"], row[f"ssim_{name}"] = q["psnr"], q["ssim"]
        for name, img in (("hr", hr), ("bicubic", bic), ("sr", sr)):
            pred = seg_task.predict_image(img, **seg_over)
            scores = image_scores(pred["labels"], mask, dm.num_classes)
            row[f"dice_{name}"], row[f"iou_{name}"] = scores["dice"], scores["iou"]
            inst = _instances_of(pred)
            if true_inst is not None:
                inst_scores = instance_scores(true_inst, inst)
                row[f"aji_{name}"], row[f"pq_{name}"] = inst_scores["aji"], inst_scores["pq"]
            if name in ("hr", "sr"):
                row.update({f"{name}_{k}": v for k, v in nuclei_stats(inst, mpp).items()})
        if true_inst is not None:
            row.update({f"gt_{k}": v for k, v in nuclei_stats(true_inst.astype(np.int32), mpp).items()})
        rows.append(row)
        log.info(
            "%s: psnr sr %.2f / bicubic %.2f dB, dice hr %.3f / bicubic %.3f / sr %.3f",
            row["case_id"],
            row["psnr_sr"],
            row["psnr_bicubic"],
            row["dice_hr"],
            row["dice_bicubic"],
            row["dice_sr"],
        )
    if not rows:
        raise ConfigError(f"dataset {dm.name!r} has no {cfg.split} images to evaluate")

    summary = summarize(rows)
    mean = summary["mean"]
    summary["dice_ratio_sr_to_hr"] = mean["dice_sr"] / mean["dice_hr"] if mean["dice_hr"] > 0 else math.nan
    summary["dice_ratio_bicubic_to_hr"] = (
        mean["dice_bicubic"] / mean["dice_hr"] if mean["dice_hr"] > 0 else math.nan
    )
    summary["psnr_gain_over_bicubic_db"] = mean["psnr_sr"] - mean["psnr_bicubic"]
    out = Path(cfg.paths.output_dir)
    extra = {
        "sr_ckpt": str(cfg.sr_ckpt),
        "seg_ckpt": str(cfg.seg_ckpt),
        "dataset": dm.name,
        "split": cfg.split,
        "scale": dm.sr_scale,
        "degradation": dm.degradation.config(),
        "sr_inference": sr_inf,
        "seg_inference": {**seg_task.inference, **seg_over},
        "mpp": mpp,
        "metric_border": border,
        "seed": int(cfg.seed),
    }
    write_report(rows, summary, out, extra=extra)
    log.info("SR pipeline report written to %s", out)
    return {**summary, **extra}


def run(cfg: DictConfig) -> dict:
    """Hydra entry: evaluate and print the headline numbers."""
    summary = evaluate_sr_pipeline(cfg)
    m = summary["mean"]
    keys = ["psnr_sr", "psnr_bicubic", "ssim_sr", "ssim_bicubic", "dice_hr", "dice_bicubic", "dice_sr"]
    keys += [
        k for k in ("aji_hr", "aji_bicubic", "aji_sr", "sr_nuclei_count", "sr_density_per_mm2") if k in m
    ]
    print("histoseg sr-eval: " + json.dumps({k: round(float(m[k]), 4) for k in keys}), flush=True)
    return summary


if __name__ == "__main__":
    from histoseg.cli import sr_eval_main

    sr_eval_main()
