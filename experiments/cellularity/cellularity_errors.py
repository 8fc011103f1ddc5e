#!/usr/bin/env python
"""Where per-image cellularity % goes wrong: class areas and per-class confusion of predicted vs true masks (issue 6).

    python experiments/cellularity/cellularity_errors.py logs/exp/cellularity_pct/full_seed_1 \
        logs/exp/cellularity_pct/full_seed_2 --out experiments/cellularity_full/cellularity_errors.json

Each argument is an ``--out`` folder of ``cellularity_pct.py`` (its ``predict/report.csv`` and colour-coded
``predict/masks/``). The true masks and counts come from the derived set (``--root``, default the dataset config's
``reader.root``): ``<split>/gt/<id>_gt.png`` and ``cellularity.csv``. Per run and image it reports the true and
predicted cellularity %, the annotated tumour / non-tumour point counts, the true and predicted tumour and
non-tumour areas (pixels), and where the true tumour and non-tumour disc pixels went (predicted background /
tumour / non-tumour / boundary); per run, the Pearson correlations of the true cellularity and the annotated
non-tumour count with the predicted areas.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cellularity_pct import pearson  # noqa: E402

from histoseg.data.readers.cellularity import CLASS_NAMES  # noqa: E402


def analyse_run(run: Path, root: Path, split: str) -> dict:
    from histoseg.data.io import DataError, read_image
    from histoseg.data.readers.cellularity import decode_cellularity_mask

    report = run / "predict" / "report.csv"
    if not report.is_file():
        raise DataError(f"{report}: not found; run experiments/cellularity/cellularity_pct.py --out {run} first")
    with open(root / "cellularity.csv", newline="") as f:
        truth = {r["id"]: r for r in csv.DictReader(f)}
    with open(report, newline="") as f:
        predicted = list(csv.DictReader(f))
    images = []
    for r in predicted:
        if r["status"] != "ok":
            continue
        cid = r["image"]
        if cid not in truth:
            raise DataError(f"{report}: image {cid!r} is not in {root / 'cellularity.csv'}")
        pred = decode_cellularity_mask(read_image(run / "predict" / r["mask"]), source=run / "predict" / r["mask"])
        gt_path = root / split / "gt" / f"{cid}_gt.png"
        gt = decode_cellularity_mask(read_image(gt_path), source=gt_path)
        if pred.shape != gt.shape:
            raise DataError(f"{run / 'predict' / r['mask']}: shape {pred.shape} differs from {gt_path} {gt.shape}")
        row = {
            "image": cid,
            "true_pct": round(100 * float(truth[cid]["cellularity"]), 2),
            "pred_pct": round(float(r["cellularity_pct"]), 2),
            "n_tumour": int(truth[cid]["n_tumour"]),
            "n_non_tumour": int(truth[cid]["n_non_tumour"]),
            "true_tumour_px": int((gt == 1).sum()), "true_non_tumour_px": int((gt == 2).sum()),
            "pred_tumour_px": int((pred == 1).sum()), "pred_non_tumour_px": int((pred == 2).sum()),
        }
        for k, name in ((1, "tumour"), (2, "non_tumour")):
            sel = gt == k
            n = max(int(sel.sum()), 1)
            row[f"true_{name}_as"] = {c: round(float((pred[sel] == j).sum()) / n, 3) for j, c in enumerate(CLASS_NAMES)}
        images.append(row)
    if not images:
        raise DataError(f"{report}: no image predicted")

    def col(key):
        return [x[key] for x in images]

    return {
        "run": str(run),
        "n_images": len(images),
        "pearson_r": {
            "true_pct_vs_pred_pct": pearson(col("true_pct"), col("pred_pct")),
            "true_pct_vs_pred_tumour_px": pearson(col("true_pct"), col("pred_tumour_px")),
            "true_pct_vs_pred_non_tumour_px": pearson(col("true_pct"), col("pred_non_tumour_px")),
            "n_non_tumour_vs_pred_non_tumour_px": pearson(col("n_non_tumour"), col("pred_non_tumour_px")),
            "true_tumour_px_vs_pred_tumour_px": pearson(col("true_tumour_px"), col("pred_tumour_px")),
        },
        **{f"mean_true_{name}_as": {c: round(float(np.mean([x[f"true_{name}_as"][c] for x in images])), 3)
                                    for c in CLASS_NAMES} for name in ("non_tumour", "tumour")},
        "per_image": images,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="cellularity_pct.py --out folders")
    ap.add_argument("--root", type=Path, default=None, help="the derived set (default: the dataset config's)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    from histoseg.data.io import atomic_write_text

    root = a.root
    if root is None:
        from histoseg.utils.config import compose_config

        root = Path(compose_config(["dataset=cellularity"], output_dir=a.runs[0] / "cfg").dataset.reader.root)
    res = {"command": "python experiments/cellularity/cellularity_errors.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "root": str(root), "split": a.split, "runs": [analyse_run(r, root, a.split) for r in a.runs]}
    text = json.dumps(res, indent=1) + "\n"
    if a.out:
        atomic_write_text(a.out, text)
    print(json.dumps([{k: v for k, v in r.items() if k != "per_image"} for r in res["runs"]], indent=1))
    return res


if __name__ == "__main__":
    main()
