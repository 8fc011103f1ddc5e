#!/usr/bin/env python
"""A detector with no learning, for scale: BreCaHAD nuclei as haematoxylin blobs, scored like the models.

Each image: haematoxylin blobs (``histoseg.data.readers.brecahad.haematoxylin_blobs``: colour deconvolution,
Otsu, opening), split by a distance-transform watershed (``distance_watershed``), blobs under ``--min-size`` px
dropped. Scores against the annotation, per image and pooled over the images of each case and of all cases:

* detection (``histoseg.metrics.points``): centroids matched to the annotated nucleus points within the disc
  radius -> precision / recall / F1 and the mean matched distance;
* pixel Dice of the blobs, and of discs of the annotation radius redrawn at the blob centroids (``render_discs``,
  the postprocess option ``render=disc``), against the annotation discs;
* ``oracle_disc_dice``: the pixel Dice a perfect detector would score (exactly the annotated nuclei, nothing else)
  if its discs sat at the matched blob centroids instead of the clicked points: what localisation alone costs.

    python experiments/brecahad_detection/hema_baseline.py [--cases Case_12] [--out hema.json]

Reads the kit in place (``$HISTOSEG_DATA`` or ../shared/data). No parameter is tuned on the test images: the
watershed h (1 px) and --min-size (100 px, about a disc of radius 5.6 px) are fixed beforehand.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from histoseg.data.io import atomic_write_text
from histoseg.data.readers.brecahad import BreCaHADReader, haematoxylin_blobs
from histoseg.data.readers.common import draw_discs
from histoseg.inference.postprocess import distance_watershed, render_discs
from histoseg.metrics.pixel import image_scores
from histoseg.metrics.points import instance_centroids, match_points, point_scores
from histoseg.utils.config import data_root


def score_image(reader: BreCaHADReader, case_id: str, min_size: int) -> dict:
    s = reader.read(case_id)
    inst = distance_watershed(haematoxylin_blobs(s.image) > 0, h=1.0, min_size=min_size)
    labels = (inst > 0).astype(np.uint8)
    discs, disc_inst = render_discs(labels, inst, reader.radius)
    row = {"case_id": case_id, "blob_dice": image_scores(labels, s.mask, 2)["dice"],
           "disc_dice": image_scores(discs, s.mask, 2)["dice"]}
    row.update(point_scores(s.meta["nucleus_points"], inst, s.meta["point_radius"]))
    # localisation alone: a perfect detector (every annotated nucleus, nothing else) whose discs sit at the
    # haematoxylin-blob centroid matched to each point (at the point itself where no blob matched)
    pts = np.asarray(s.meta["nucleus_points"], np.float64)
    cent = instance_centroids(inst)
    m = match_points(pts, cent, s.meta["point_radius"], pairs=True)
    moved = pts.copy()
    moved[m["pairs"][:, 0]] = cent[m["pairs"][:, 1]]
    oracle, _ = draw_discs(s.mask.shape, [(1, moved)], reader.radius, reader.method)
    row["oracle_disc_dice"] = image_scores(oracle, s.mask, 2)["dice"]
    return row


def mean_rows(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "case_id"]
    return {k: statistics.fmean(r[k] for r in rows if k in r) for k in keys} | {"n_images": len(rows)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="data kit root (default: $HISTOSEG_DATA or ../shared/data)")
    ap.add_argument("--cases", nargs="*", default=None, help="cases to score (default: all in the kit)")
    ap.add_argument("--min-size", type=int, default=100)
    ap.add_argument("--radius", type=float, default=16.0, help="annotation disc radius (the dataset config's)")
    ap.add_argument("--out", type=Path, default=None, help="write per-image rows and means as JSON")
    a = ap.parse_args(argv)
    reader = BreCaHADReader(Path(a.data or data_root()) / "brecahad", radius=a.radius)
    ids = [c for c in reader.case_ids() if a.cases is None or reader.group_of(c) in a.cases]
    if not ids:
        raise SystemExit(f"no images of cases {a.cases} in {reader.root}")
    rows = [score_image(reader, c, a.min_size) for c in ids]
    by_case = {g: mean_rows([r for r in rows if reader.group_of(r["case_id"]) == g])
               for g in sorted({reader.group_of(c) for c in ids})}
    result = {"per_case": by_case, "all": mean_rows(rows), "rows": rows,
              "settings": {"min_size": a.min_size, "radius": a.radius, "watershed_h": 1.0}}
    for g, m in [*by_case.items(), ("all", result["all"])]:
        print(f"{g:8s} n={m['n_images']:2d}  det P/R/F1 {m['det_precision']:.3f} / {m['det_recall']:.3f} / "
              f"{m['det_f1']:.3f}  dist {m['det_dist']:.1f} px  blob Dice {m['blob_dice']:.3f}  disc Dice {m['disc_dice']:.3f}  "
              f"oracle disc Dice {m['oracle_disc_dice']:.3f}")
    if a.out:
        atomic_write_text(a.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
