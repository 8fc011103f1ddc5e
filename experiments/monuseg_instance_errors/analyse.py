#!/usr/bin/env python
"""Where a nucleus instance model loses AJI: pixels or splitting, size bias, and post-processing re-tuned.

Reads the maps that ``histoseg-eval ... save_maps=true`` wrote for the validation and the test images of one
checkpoint (``<run>/maps/<case>.npz`` and ``<run>/summary.json``) and reports, on the test images:

* ``as_evaluated``: the saved instances scored again (must equal the run's ``per_image.csv``);
* ``oracle_split``: the model's own nucleus pixels, split into nuclei by the ground truth (each predicted pixel
  takes the label of the true nucleus under it; predicted pixels outside every true nucleus are flooded from the
  nearest such label through the prediction, or become objects of their own when they touch none): what perfect
  splitting would give with the model's pixels;
* ``oracle_no_false``: without the predicted objects that lie mostly (over half their area) off the true nuclei;
* ``oracle_add_missed``: plus the true nuclei that the prediction misses (under half their area predicted);
* ``oracle_outlines``: each predicted nucleus matched to a true one (IoU > 0.5) redrawn with the true outline;
* ``oracle_pixels``: the model's own markers and watershed run inside the true nucleus mask: what a perfect pixel
  mask would give with the model's splitting;
* ``reference``: the ground truth with every outline moved in (out) by one or two pixels, scored against itself:
  the scale of a one- or two-pixel outline error;
* ``grow``: every predicted nucleus grown (k > 0, into background only) or shrunk (k < 0) by k pixels, with k chosen
  on the validation images only, and the matched pairs' area ratio (predicted / true) that motivates it;
* ``retuned``: the post-processing grid searched again on the validation maps saved here (the same inference as
  the test), against the thresholds stored in the checkpoint.

    python experiments/monuseg_instance_errors/analyse.py --val logs/exp/maps/prog0_val --test logs/exp/maps/prog0_test \
        --out experiments/monuseg_instance_errors/prog0.json

The validation maps choose every setting; the test images are only scored.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import segmentation

from histoseg.inference.postprocess import PostProcessor, marker_watershed, remove_small_instances
from histoseg.inference.tuning import DEFAULT_GRIDS, aji_pq
from histoseg.metrics.instance import aji, instance_scores, pairwise_overlap, remap_label

MAP_KEYS = ("probs", "fg", "interior", "dist", "hv")
GROW = (-2, -1, 0, 1, 2)


def load_run(run: Path) -> tuple[dict, list[tuple[str, dict]]]:
    summary = json.loads((run / "summary.json").read_text())
    files = sorted((run / "maps").glob("*.npz"))
    if not files:
        raise SystemExit(f"{run}/maps: no .npz files (run histoseg-eval with save_maps=true)")
    images = []
    for f in files:
        z = np.load(f)
        images.append((f.stem, {k: (z[k].astype(np.float32) if k in MAP_KEYS else z[k]) for k in z.files}))
    missing = [c for c, z in images if "true_instances" not in z or "pred_instances" not in z]
    if missing:
        raise SystemExit(f"{run}: no true / predicted instances for {missing[:3]} (an instance dataset and model?)")
    return summary, images


def maps_of(z: dict) -> dict:
    return {k: z[k] for k in MAP_KEYS if k in z}


def matched_pairs(true: np.ndarray, pred: np.ndarray):
    """Pairs matched at IoU > 0.5 (one to one) as 0-based indices into ``remap_label`` order, with both areas:
    ``(true_idx, pred_idx, area_true, area_pred)``."""
    inter, at, ap = pairwise_overlap(true, pred)
    if not len(at) or not len(ap):
        return np.zeros(0, int), np.zeros(0, int), at, ap
    iou = inter / np.maximum(at[:, None] + ap[None, :] - inter, 1e-12)
    ti, pj = np.nonzero(iou > 0.5)
    return ti, pj, at, ap


def oracle_split(true: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """The predicted foreground ``fg`` labelled by the true nuclei (see the module docstring)."""
    seeds = np.where(fg, true, 0)
    out = segmentation.watershed(np.zeros(fg.shape, np.float32), seeds, mask=fg)  # flood each label through fg
    rest, n = ndi.label(fg & (out == 0))
    if n:
        out = np.where(rest > 0, rest + out.max(), out)
    return remap_label(out.astype(np.int32))


def oracle_no_false(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The prediction without its false objects: those with less than half of their area on true nuclei."""
    inter, _, ap = pairwise_overlap(true, pred)
    p = remap_label(pred)
    false = np.nonzero(inter.sum(0) < 0.5 * ap)[0] + 1  # inter.sum(0): each object's area on true nuclei
    return remap_label(np.where(np.isin(p, false), 0, p))


def oracle_add_missed(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The prediction plus the true nuclei it misses (less than half of their area predicted as nucleus),
    pasted into its background pixels as objects of their own."""
    t, p = remap_label(true), remap_label(pred)
    if not t.max():
        return p
    covered = np.bincount(t[p > 0], minlength=t.max() + 1)[1:]
    area = np.bincount(t.ravel(), minlength=t.max() + 1)[1:]
    missed = np.nonzero(covered < 0.5 * area)[0] + 1
    add = np.isin(t, missed) & (p == 0)
    return remap_label(np.where(add, t + p.max(), p))


def oracle_outlines(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Every predicted nucleus matched to a true one (IoU > 0.5) redrawn with the true outline; the unmatched
    objects, false and merged, stay as predicted: what perfect outlines of the found nuclei would give."""
    t, p = remap_label(true), remap_label(pred)
    ti, pj, _, _ = matched_pairs(t, p)
    out = np.where(np.isin(p, pj + 1), 0, p)  # matched objects removed ...
    lut = np.zeros(t.max() + 1, np.int64)
    lut[ti + 1] = pj + 1
    drawn = lut[t]
    out = np.where(drawn > 0, drawn, out)  # ... and drawn again as their true nucleus (over anything else)
    return remap_label(out)


def oracle_pixels(z: dict, pp: PostProcessor) -> np.ndarray:
    fg = z["true_instances"] > 0
    inst = marker_watershed(fg, maps_of(z), pp.marker_source, pp.marker_threshold, pp.min_marker_size, pp.smooth)
    return remove_small_instances(inst, pp.min_size) if pp.min_size > 0 else inst


def grow(inst: np.ndarray, k: int) -> np.ndarray:
    """Each nucleus grown by ``k`` px into the background (never into another nucleus), or shrunk by ``-k`` px."""
    if k > 0:
        return segmentation.expand_labels(inst, k)
    out = inst.copy()
    for _ in range(-k):
        out[segmentation.find_boundaries(out, mode="inner")] = 0
    return out


def area_ratio(true: np.ndarray, pred: np.ndarray) -> list[float]:
    """Predicted / true area of every pair matched at IoU > 0.5 (such a match is one to one)."""
    ti, pj, at, ap = matched_pairs(true, pred)
    return [float(ap[j] / at[i]) for i, j in zip(ti, pj)]


def score(true: np.ndarray, pred: np.ndarray) -> dict:
    s = instance_scores(true, pred)
    return {k: float(s[k]) for k in ("aji", "pq", "dq", "sq", "obj_f1") if k in s} | {"n_pred": int(pred.max())}


def mean_rows(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "case_id"]
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val", type=Path, required=True, help="histoseg-eval split=val save_maps=true output folder")
    ap.add_argument("--test", type=Path, required=True, help="histoseg-eval save_maps=true output folder (test)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    summary, test = load_run(args.test)
    vsummary, val = load_run(args.val)
    if summary["postprocess"] != vsummary["postprocess"] or summary["checkpoint"] != vsummary["checkpoint"]:
        raise SystemExit(f"{args.val} and {args.test} were not made with the same checkpoint and post-processing")
    pp = PostProcessor(**summary["postprocess"])
    csv_rows = {r["case_id"]: r for r in csv.DictReader(open(args.test / "per_image.csv"))}

    # 1. the saved instances scored again, and the oracles
    oracles = {"oracle_split": lambda z: oracle_split(z["true_instances"], z["pred_instances"] > 0),
               "oracle_no_false": lambda z: oracle_no_false(z["true_instances"], z["pred_instances"]),
               "oracle_add_missed": lambda z: oracle_add_missed(z["true_instances"], z["pred_instances"]),
               "oracle_outlines": lambda z: oracle_outlines(z["true_instances"], z["pred_instances"]),
               "oracle_pixels": lambda z: oracle_pixels(z, pp)}
    rows = {"as_evaluated": [], **{k: [] for k in oracles}}
    ratios = []
    for case, z in test:
        true, pred = z["true_instances"], z["pred_instances"]
        r = score(true, pred)
        if abs(r["aji"] - float(csv_rows[case]["aji"])) > 1e-5:
            raise SystemExit(f"{case}: AJI {r['aji']:.6f} from the saved maps, {csv_rows[case]['aji']} in per_image.csv")
        rows["as_evaluated"].append({"case_id": case, **r})
        for name, fix in oracles.items():
            rows[name].append({"case_id": case, **score(true, fix(z))})
        ratios += area_ratio(true, pred)
    # the scale of outline errors: the ground truth itself with every outline moved by one or two pixels
    outline_shift = {f"true_{'grown' if k > 0 else 'shrunk'}_{abs(k)}px":
                     mean_rows([score(z["true_instances"], grow(z["true_instances"], k)) for _, z in test])
                     for k in (-2, -1, 1, 2)}
    ckpt = Path(summary["checkpoint"])
    if ckpt.is_absolute() and ckpt.is_relative_to(Path.cwd()):
        ckpt = ckpt.relative_to(Path.cwd())
    report = {"checkpoint": str(ckpt), "postprocess": summary["postprocess"],
              "inference": summary.get("inference"), "n_val": len(val), "n_test": len(test),
              "test": {k: mean_rows(v) for k, v in rows.items()}, "reference": outline_shift,
              "matched_area_ratio": {"pairs": len(ratios), "median": round(float(np.median(ratios)), 4),
                                     "mean": round(float(np.mean(ratios)), 4),
                                     "q25_q75": [round(float(q), 4) for q in np.percentile(ratios, [25, 75])]}}

    # 2. grow / shrink every nucleus by k px: k chosen on the validation images (mean AJI)
    val_grow = {k: float(np.mean([aji(z["true_instances"], grow(z["pred_instances"], k)) for _, z in val])) for k in GROW}
    k_best = max(GROW, key=lambda k: (val_grow[k], -abs(k)))
    grown = [{"case_id": c, **score(z["true_instances"], grow(z["pred_instances"], k_best))} for c, z in test]
    report["grow"] = {"val_aji_by_k": {str(k): round(v, 4) for k, v in val_grow.items()}, "k_chosen_on_val": k_best,
                      "test": mean_rows(grown)}
    rows["grow"] = grown

    # 3. the post-processing grid searched again on these validation maps (objective aji_pq, as the recipe)
    grid = DEFAULT_GRIDS["markers"]
    keys = sorted(grid)
    table = []
    for values in itertools.product(*(grid[k] for k in keys)):
        cand = pp.with_params(**dict(zip(keys, values)))
        table.append((float(np.mean([aji_pq(z["true_instances"], cand(maps_of(z))["instances"]) for _, z in val])),
                      dict(zip(keys, values))))
    stored = {k: summary["postprocess"][k] for k in keys}
    best_val, best = max(table, key=lambda t: t[0])
    stored_val = next((s for s, p in table if p == stored), None)
    pb = pp.with_params(**best)
    retuned = [{"case_id": c, **score(z["true_instances"], pb(maps_of(z))["instances"])} for c, z in test]
    report["retuned"] = {"grid": grid, "stored": stored, "stored_val_aji_pq": stored_val, "best": best,
                         "best_val_aji_pq": round(best_val, 4), "test": mean_rows(retuned)}
    rows["retuned"] = retuned
    report["per_image"] = rows
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}, indent=1))
    return report


if __name__ == "__main__":
    main()
