#!/usr/bin/env python
"""Whole-slide check with a real model (issue 10): the 14 MoNuSeg test images as one pyramidal mosaic slide.

    python experiments/wsi_mosaic/run.py --ckpt logs/exp/monuseg_instance/seed_0/checkpoints/epoch_013.ckpt \
        --out logs/exp/wsi_mosaic [--tta none] [--autocast bf16]

1. builds the mosaic slide (``histoseg.wsi.testslides.monuseg_mosaic``: each test image once, 0.25 um/px tag,
   blank glass between them) and its exact mask;
2. runs ``histoseg-predict`` on the slide (tissue detection, streamed tiles, streamed post-processing) -> the
   four outputs (mask OME-TIFF, QuPath GeoJSON, summary CSV, overlay thumbnail);
3. scores the slide's mask against the mosaic mask (pooled Dice over all pixels) and, beside it, the same model
   on each image through ``SegmentationTask.predict_image`` (the per-image evaluation path), pooled the same way;
4. writes ``<out>/wsi_mosaic.json`` (both Dice values, their difference, nuclei counts, timings, the command).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np


def pooled(stats: np.ndarray) -> float:
    tp, fp, fn = stats
    return float(2 * tp / max(2 * tp + fp + fn, 1))


def counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([(pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()], np.int64)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", default=None, help="data kit root (default: the config's paths.data_dir)")
    ap.add_argument("--tta", default="none")
    ap.add_argument("--autocast", default="bf16")
    a = ap.parse_args(argv)

    from histoseg.data.io import atomic_write_text
    from histoseg.models.loading import load_task
    from histoseg.tasks.predict import predict
    from histoseg.utils.config import compose_config, data_root
    from histoseg.wsi.slide import Slide
    from histoseg.wsi.testslides import monuseg_mosaic

    root = Path(a.data or data_root()) / "monuseg"
    a.out.mkdir(parents=True, exist_ok=True)
    mosaic = monuseg_mosaic(root, "test")
    slide = mosaic.write(a.out / "mosaic.tif", mpp=0.25)
    truth = mosaic.render_mask() > 0

    over = [f"inference.tta={a.tta}", f"inference.autocast={a.autocast}"]
    cfg = compose_config([f"ckpt_path={a.ckpt}", f"input={slide}", "progress=false", *over],
                         output_dir=a.out / "predict", config_name="predict")
    t0 = time.perf_counter()
    summary, _ = predict(cfg)
    t_slide = time.perf_counter() - t0
    if summary["n_ok"] != 1:
        sys.exit(f"histoseg-predict failed on {slide}: {summary}")
    outdir = Path(cfg.wsi.output_dir) / "mosaic"
    with Slide(outdir / "mosaic_mask.ome.tif") as s:
        pred = s.read_region(0, 0, s.shape)[..., 0] > 0
    slide_stats = counts(pred, truth)

    task = load_task(a.ckpt)
    image_stats, differ = np.zeros(3, np.int64), []
    t0 = time.perf_counter()
    for y0, y1, x0, x1, k in mosaic.boxes():
        labels = task.predict_image(mosaic.images[k], tta=a.tta, autocast=a.autocast)["labels"] > 0
        image_stats += counts(labels, mosaic.masks[k] > 0)
        differ.append(float((labels != pred[y0:y1, x0:x1]).mean()))
    t_images = time.perf_counter() - t0
    blank = ~np.zeros_like(truth)
    for y0, y1, x0, x1, _ in mosaic.boxes():
        blank[y0:y1, x0:x1] = False
    res = {
        "command": "python experiments/wsi_mosaic/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ckpt": str(a.ckpt), "slide_shape": list(truth.shape), "n_images": len(mosaic.names),
        "inference": {"tta": a.tta, "autocast": a.autocast},
        "slide_dice": pooled(slide_stats), "per_image_dice": pooled(image_stats),
        "dice_difference": abs(pooled(slide_stats) - pooled(image_stats)),
        "max_pixel_disagreement_per_image": max(differ),
        "foreground_on_blank_glass_px": int((pred & blank).sum()),
        "outputs": sorted(p.name for p in outdir.iterdir() if p.is_file()),
        "slide_summary": next(csv.DictReader((outdir / "summary.csv").open()), {})
        if (outdir / "summary.csv").is_file() else None,
        "seconds": {"slide_predict": round(t_slide, 1), "per_image_predict": round(t_images, 1)},
    }
    atomic_write_text(a.out / "wsi_mosaic.json", json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res[k] for k in ("slide_dice", "per_image_dice", "dice_difference", "seconds")}))
    return res


if __name__ == "__main__":
    main()
