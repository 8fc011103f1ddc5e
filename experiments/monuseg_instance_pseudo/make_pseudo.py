#!/usr/bin/env python
"""Pseudo instance maps for the MoNuSeg training images annotated only by a binary mask.

The data kit has instance maps for 13 of the 30 training images; in the other 17 touching nuclei are merged in
the mask, so the instance targets leave their interiors unsupervised. This splits each of those annotated masks
into nuclei with a trained (teacher) model's markers and watershed energy (``histoseg.inference.postprocess.
split_mask``): the mask's pixels stay exactly as annotated, only the splitting comes from the model. The maps go
to ``--out/<id>.png`` (16-bit ids), to be read with ``dataset.reader.instances_dir=<out>``.

Inputs are the maps that ``histoseg-eval ... save_maps=true`` wrote for the teacher (``<run>/maps/<case>.npz``),
with the teacher's stored post-processing (``<run>/summary.json``). Images that do have a true instance map are
split the same way and scored against it (AJI / PQ), per folder, so the pseudo-labels' quality is measured: on
held-out validation images (an honest estimate) and on the teacher's own training images.

    C=logs/exp/rec0/monuseg_instance/seed_0/checkpoints/epoch_013.ckpt
    histoseg-eval ckpt_path=$C dataset=monuseg split=train save_maps=true hydra.run.dir=logs/exp/pseudo/teacher_train
    histoseg-eval ckpt_path=$C dataset=monuseg split=val save_maps=true hydra.run.dir=logs/exp/pseudo/teacher_val
    python experiments/monuseg_instance_pseudo/make_pseudo.py --maps logs/exp/pseudo/teacher_train \\
        logs/exp/pseudo/teacher_val --data-root ../shared/data/monuseg --out logs/exp/pseudo/instances \\
        --report experiments/monuseg_instance_pseudo/pseudo_quality.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from histoseg.data.io import atomic_write_bytes
from histoseg.data.readers.monuseg import MoNuSegReader
from histoseg.inference.postprocess import PostProcessor, split_mask
from histoseg.metrics.instance import instance_scores
from histoseg.tasks.predict import write_instances

MAP_KEYS = ("probs", "fg", "interior", "dist", "hv")
KEYS = ("aji", "pq", "dq", "sq")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", type=Path, nargs="+", required=True,
                    help="histoseg-eval save_maps=true output folders of one teacher checkpoint")
    ap.add_argument("--data-root", type=Path, required=True, help="the MoNuSeg data root (which images have instances)")
    ap.add_argument("--out", type=Path, required=True, help="folder for <id>.png pseudo instance maps")
    ap.add_argument("--report", type=Path, help="also write the quality JSON here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    reader = MoNuSegReader(args.data_root)
    true_maps = {c for c in reader.case_ids() if any(f.parent.name == "instances" for f in reader.source_files(c))}
    pp, ckpt = None, None
    report: dict = {"quality": {}, "written": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.maps:
        summary = json.loads((run / "summary.json").read_text())
        if pp is not None and (summary["postprocess"] != pp or summary["checkpoint"] != ckpt):
            raise SystemExit(f"{run}: made with another checkpoint or post-processing than {args.maps[0]}")
        pp, ckpt = summary["postprocess"], summary["checkpoint"]
        post = PostProcessor(**pp)
        files = sorted((run / "maps").glob("*.npz"))
        if not files:
            raise SystemExit(f"{run}/maps: no .npz files (run histoseg-eval with save_maps=true)")
        rows = []
        for f in files:
            z = np.load(f)
            maps = {k: z[k].astype(np.float32) for k in MAP_KEYS if k in z.files}
            fg = z["true_mask"] > 0
            inst = split_mask(fg, maps, post)
            if not np.array_equal(inst > 0, fg):  # the annotated mask must be kept pixel for pixel
                raise SystemExit(f"{f}: the split changed {int(((inst > 0) != fg).sum())} mask pixels")
            if f.stem in true_maps:
                s = instance_scores(z["true_instances"], inst)
                cc = instance_scores(z["true_instances"], ndi.label(fg)[0])  # the mask alone: touching nuclei merged
                rows.append({"case_id": f.stem, **{k: s[k] for k in KEYS},
                             **{f"components_{k}": cc[k] for k in KEYS},
                             "n_true": s["n_true"], "n_pseudo": s["n_pred"], "n_components": cc["n_pred"]})
            else:
                write_instances(args.out, f.stem, inst)  # 16-bit PNG (32-bit TIFF past 65535 nuclei), atomic
                report["written"][f.stem] = {"nuclei": int(inst.max()), "mask_components": int(ndi.label(fg)[1])}
        if rows:
            report["quality"][str(run)] = {
                "images": len(rows),
                "mean": {k: round(float(np.mean([r[k] for r in rows])), 4) for k in KEYS},
                "mask_components_mean": {k: round(float(np.mean([r[f"components_{k}"] for r in rows])), 4) for k in KEYS},
                "per_image": rows,
            }
        print(f"{run}: {len(files)} images, {len(rows)} scored against true instance maps", flush=True)
    report.update({"checkpoint": ckpt, "postprocess": pp, "out": str(args.out), "n_written": len(report["written"]),
                   "seconds": round(time.perf_counter() - t0, 1)})
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.report, (json.dumps(report, indent=1) + "\n").encode())
    print(json.dumps({k: {"pseudo": v["mean"], "mask_components": v["mask_components_mean"]}
                      for k, v in report["quality"].items()}, indent=1))
    print(f"{report['n_written']} pseudo instance maps -> {args.out}")
    return report


if __name__ == "__main__":
    main()
