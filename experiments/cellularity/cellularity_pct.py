#!/usr/bin/env python
"""Per-image tumour cellularity of a trained 4-class model against the ground truth (issue 6).

    python experiments/cellularity/cellularity_pct.py \
        --ckpt logs/exp/cellularity_strong/seed_0/checkpoints/epoch_006.ckpt --out logs/exp/cellularity_pct/seed_0

1. runs ``histoseg-predict`` on the derived set's held-out ``test/input`` folder (the images the model never saw;
   the same images as the run's whole-image test) -> ``report.csv`` with ``cellularity_pct`` per image
   (tumour-nucleus area / all-nucleus area after the checkpoint's post-processing);
2. joins it with the builder's ``cellularity.csv`` (the true tumour-nucleus area / all-nucleus area of each image,
   drawn from the BreCaHAD points);
3. writes ``<out>/cellularity_pct.json``: per image predicted vs true (percent), mean absolute error, bias,
   Pearson r, the MAE of the trivial predictor (the training images' mean cellularity for every image), and the command.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def pearson(a, b) -> float | None:
    """Pearson r to 3 decimals; None (JSON null) when undefined: under 3 values or either side constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return round(float(np.corrcoef(a, b)[0, 1]), 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--root", default=None, type=Path,
                    help="the derived cellularity set (default: the dataset config's reader.root)")
    ap.add_argument("--split", default="test", help="folder of the set to predict (default test)")
    ap.add_argument("--mpp", default="0.25", help="microns per pixel of the images (densities only)")
    ap.add_argument("--tta", default="none")
    a = ap.parse_args(argv)

    from histoseg.data.io import atomic_write_text
    from histoseg.tasks.predict import predict
    from histoseg.utils.config import compose_config

    root = a.root
    if root is None:
        cfg = compose_config(["dataset=cellularity"], output_dir=a.out / "cfg")
        root = Path(cfg.dataset.reader.root)
    truth_csv, images = root / "cellularity.csv", root / a.split / "input"
    for p in (truth_csv, images):
        if not p.exists():
            sys.exit(f"{p}: not found; build the derived set first (histoseg-data build-cellularity dataset=cellularity)")
    with truth_csv.open() as f:
        truth_rows = [r for r in csv.DictReader(f) if r["cellularity"] != ""]
    truth = {r["id"]: 100.0 * float(r["cellularity"]) for r in truth_rows}
    # the trivial reference: predict the training images' mean cellularity for every image
    train_pct = [100.0 * float(r["cellularity"]) for r in truth_rows if r.get("split") == "train"]
    const = float(np.mean(train_pct)) if train_pct else None

    cfg = compose_config([f"ckpt_path={a.ckpt}", f"input={images}", "progress=false", f"mpp={a.mpp}",
                          f"inference.tta={a.tta}"], output_dir=a.out / "predict", config_name="predict")
    summary, _ = predict(cfg)
    if summary["n_errors"]:
        sys.exit(f"histoseg-predict failed on {summary['errors']}")
    with (Path(cfg.output_dir) / "report.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    per_image = []
    for r in rows:
        cid = r["image"]
        if cid not in truth:
            sys.exit(f"{truth_csv}: no ground-truth cellularity for image {cid!r}")
        pred = float(r["cellularity_pct"]) if r["cellularity_pct"] not in ("", "nan") else float("nan")
        per_image.append({"image": cid, "true_pct": round(truth[cid], 2), "pred_pct": round(pred, 2)})
    t = np.array([p["true_pct"] for p in per_image])
    p = np.array([p["pred_pct"] for p in per_image])
    ok = np.isfinite(p)
    err = p[ok] - t[ok]
    res = {
        "command": "python experiments/cellularity/cellularity_pct.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ckpt": str(a.ckpt), "images": str(images), "n_images": len(per_image), "n_without_nuclei": int((~ok).sum()),
        "mae_pct_points": round(float(np.abs(err).mean()), 2) if ok.any() else None,
        "bias_pct_points": round(float(err.mean()), 2) if ok.any() else None,
        "pearson_r": pearson(t[ok], p[ok]),
        "const_train_mean_pct": round(const, 2) if const is not None else None,
        "const_mae_pct_points": round(float(np.abs(t - const).mean()), 2) if const is not None else None,
        "true_mean_pct": round(float(t.mean()), 2), "pred_mean_pct": round(float(np.nanmean(p)), 2) if ok.any() else None,
        "per_image": per_image,
    }
    atomic_write_text(a.out / "cellularity_pct.json", json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("n_images", "mae_pct_points", "bias_pct_points", "pearson_r",
                                          "const_mae_pct_points", "true_mean_pct", "pred_mean_pct")}))
    return res


if __name__ == "__main__":
    main()
