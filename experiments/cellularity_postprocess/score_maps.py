#!/usr/bin/env python
"""Score post-processing settings of a 4-class cellularity model on saved whole-image test maps.

    python experiments/cellularity_postprocess/score_maps.py --runs logs/exp/cpp/full_seed_0 ... \
        --out experiments/cellularity_postprocess/settings.json

Each run is a ``histoseg-eval ... save_maps=true`` folder: ``maps/<case>.npz`` holds the model's test-image
probabilities (float16, after the run's inference settings, e.g. d4 TTA) and the ground truth. Every setting below
is applied to the same probabilities with ``histoseg.inference.postprocess.PostProcessor`` and scored with
``histoseg.metrics.pixel.image_scores`` (the test step's whole-image scores), so the settings differ in
post-processing only. ``tuned`` is the run's ``postprocess_tuning.json`` best (tuned on the validation images).

Also per setting: the per-image cellularity % (tumour / (tumour + non-tumour) pixels) against the same ratio of the
ground-truth mask: mean absolute error and bias, in percentage points.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

# the cellularity post-processing before and after clean_classes (conf/postprocess/cellularity.yaml), none at all,
# and nuclei_only with the boundary class redrawn
SETTINGS = {
    "all_classes": {"opening_radius": 2, "fill_holes": True, "min_size": 10, "clean_classes": None},
    "nuclei_only": {"opening_radius": 2, "fill_holes": True, "min_size": 10, "clean_classes": [1, 2]},
    "none": {"opening_radius": 0, "fill_holes": False, "min_size": 0, "clean_classes": None},
    # the boundary class redrawn as the 3 px ring the masks draw around every nucleus (draw_rings)
    "nuclei_rings": {"opening_radius": 2, "fill_holes": True, "min_size": 10, "clean_classes": [1, 2],
                     "ring_class": 3, "ring_width": 3},
}
METRICS = ("dice", "dice_1", "dice_2", "dice_3", "acc")


def cellularity_pct(labels: np.ndarray) -> float:
    """Tumour / (tumour + non-tumour) pixels in percent, as ``histoseg-predict`` reports it (NaN without nuclei)."""
    from histoseg.analysis.morphometry import cellularity

    return cellularity(labels, tumour_classes=[1], nucleus_classes=[1, 2])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, type=Path, help="histoseg-eval folders with maps/")
    ap.add_argument("--out", required=True, type=Path, help="JSON summary (a per-image CSV is written beside it)")
    a = ap.parse_args(argv)

    from histoseg.data.io import atomic_write_text
    from histoseg.inference.postprocess import PostProcessor
    from histoseg.metrics.pixel import image_scores

    summary, rows = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "runs": {}}, []
    for run in a.runs:
        maps = sorted((run / "maps").glob("*.npz"))
        if not maps:
            sys.exit(f"{run}/maps: no .npz maps (run histoseg-eval with save_maps=true)")
        settings = dict(SETTINGS)
        tuning = run / "postprocess_tuning.json"
        if tuning.is_file():
            settings["tuned"] = json.loads(tuning.read_text())["best"]
        base = PostProcessor(instances="none", nuclei_classes=[1, 2])
        per = {name: [] for name in settings}
        for path in maps:
            with np.load(path) as z:
                probs, truth = z["probs"].astype(np.float32), z["true_mask"]
            true_pct = cellularity_pct(truth)
            for name, params in settings.items():
                labels = base.with_params(**params)(probs)["labels"]
                s = image_scores(labels, truth, 4)
                row = {"run": run.name, "case_id": path.stem, "setting": name, **{m: s[m] for m in METRICS},
                       "cellularity_pred": cellularity_pct(labels), "cellularity_true": true_pct}
                per[name].append(row)
                rows.append(row)
        out = {}
        for name, rs in per.items():
            err = np.array([r["cellularity_pred"] - r["cellularity_true"] for r in rs])
            out[name] = {"params": settings[name], "n_images": len(rs),
                         **{m: round(float(np.mean([r[m] for r in rs])), 4) for m in METRICS},
                         "cellularity_mae": round(float(np.nanmean(np.abs(err))), 2),
                         "cellularity_bias": round(float(np.nanmean(err)), 2)}
        summary["runs"][run.name] = out
        print(run.name, {k: (v["dice"], v["dice_3"]) for k, v in out.items()})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(summary, indent=1) + "\n")
    atomic_write_text(a.out.with_suffix(".md"), markdown(summary))
    with a.out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    return summary


def markdown(summary: dict) -> str:
    """The summary as a Markdown table (one row per run and setting), for the experiment's README."""
    cols = [*METRICS, "cellularity_mae", "cellularity_bias"]
    lines = ["| run | setting | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for run, settings in summary["runs"].items():
        for name, r in settings.items():
            lines.append(f"| {run} | {name} | " + " | ".join(f"{r[c]:.3f}" if c in METRICS else f"{r[c]:.2f}"
                                                            for c in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
