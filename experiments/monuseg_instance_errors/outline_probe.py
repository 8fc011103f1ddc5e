#!/usr/bin/env python
"""Does smoothing the predicted outlines raise AJI? A probe on the maps saved by ``histoseg-eval save_maps=true``.

Each variant is applied to the saved instances, or to the foreground map before the checkpoint's own
post-processing runs again, and scored (mean AJI, PQ, SQ) on the validation and the test images:

* ``base``: the saved instances;
* ``hull``: each nucleus replaced by its convex hull, only over background and its own pixels;
* ``open1`` / ``open2``: a binary opening of each nucleus with a disc of radius 1 / 2 px;
* ``fgsmooth1`` / ``fgsmooth2``: the foreground probability blurred (Gaussian sigma 1 / 2 px) before thresholding.

    python experiments/monuseg_instance_errors/outline_probe.py --val logs/exp/maps/prog0_val --test logs/exp/maps/prog0_test
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import measure, morphology

sys.path.insert(0, str(Path(__file__).resolve().parent))
import analyse as an  # noqa: E402

from histoseg.inference.postprocess import PostProcessor  # noqa: E402
from histoseg.metrics.instance import aji, panoptic_quality  # noqa: E402


def hull(inst: np.ndarray) -> np.ndarray:
    out = np.zeros_like(inst)
    for r in measure.regionprops(inst):
        y0, x0, y1, x1 = r.bbox
        own = inst[y0:y1, x0:x1]
        sub = out[y0:y1, x0:x1]
        sub[r.image_convex & (sub == 0) & ((own == 0) | (own == r.label))] = r.label
    return out


def open_each(inst: np.ndarray, radius: int) -> np.ndarray:
    se, pad = morphology.disk(radius), radius + 1
    out = np.zeros_like(inst)
    for r in measure.regionprops(inst):
        y0, x0, y1, x1 = r.bbox
        opened = ndi.binary_opening(np.pad(r.image, pad), se)[pad:-pad, pad:-pad]
        out[y0:y1, x0:x1][opened] = r.label
    return out


def variants(z: dict, pp: PostProcessor):
    pred = z["pred_instances"]
    yield "base", pred
    yield "hull", hull(pred)
    for r in (1, 2):
        yield f"open{r}", open_each(pred, r)
    for sigma in (1, 2):
        maps = an.maps_of(z)
        maps["fg"] = ndi.gaussian_filter(maps["fg"], sigma)
        yield f"fgsmooth{sigma}", pp(maps)["instances"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True)
    args = ap.parse_args(argv)
    summary, test = an.load_run(args.test)
    _, val = an.load_run(args.val)
    pp = PostProcessor(**summary["postprocess"])
    report = {}
    for split, images in (("val", val), ("test", test)):
        scores: dict[str, list] = {}
        for _, z in images:
            true = z["true_instances"]
            for name, inst in variants(z, pp):
                pq = panoptic_quality(true, inst)
                scores.setdefault(name, []).append((aji(true, inst), pq["pq"], pq["sq"]))
        report[split] = {k: dict(zip(("aji", "pq", "sq"), (round(float(x), 4) for x in np.mean(v, 0))))
                         for k, v in scores.items()}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
