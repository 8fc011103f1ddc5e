"""Tune post-processing thresholds on the validation split only, and store them in checkpoints.

The test split is never looked at: ``tune_postprocess`` receives validation samples, predicts their maps
once, and grid-searches the instance post-processing settings for the best mean objective (AJI by
default). ``store_postprocess`` writes the result into checkpoint files, so ``histoseg-eval`` and
``histoseg-predict`` reproduce it.
"""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from histoseg.data.io import publish
from histoseg.metrics.instance import aji, aji_plus, panoptic_quality
from histoseg.metrics.pixel import image_scores

log = logging.getLogger(__name__)

# each objective scores one validation sample against the post-processed output ``{"labels", "instances"}``
OBJECTIVES = {
    "aji": lambda s, out, k: aji(s.instances, out["instances"]),
    "aji_plus": lambda s, out, k: aji_plus(s.instances, out["instances"]),
    "pq": lambda s, out, k: panoptic_quality(s.instances, out["instances"])["pq"],
    # both instance targets at once: AJI rewards the pixel overlap of matched nuclei, PQ also counts every
    # unmatched (e.g. small spurious) object, so AJI alone leaves ``min_size`` free to keep noise
    "aji_pq": lambda s, out, k: 0.5 * (aji(s.instances, out["instances"])
                                       + panoptic_quality(s.instances, out["instances"])["pq"]),
    # whole-image pixel Dice of the post-processed class map, exactly as the test step scores it: for datasets
    # whose reported metric is Dice (e.g. BreCaHAD's point discs), where the threshold and min_size trade
    # spurious blobs against missed nuclei
    "dice": lambda s, out, k: image_scores(out["labels"], s.mask, k)["dice"],
}
NEEDS_INSTANCES = {"aji", "aji_plus", "pq", "aji_pq"}

DEFAULT_GRIDS = {
    "watershed": {"h": [0.5, 1.0, 2.0, 3.0], "smooth": [0.5, 1.0, 2.0], "threshold": [0.4, 0.5, 0.6],
                  "min_size": [10, 30, 60, 100]},
    "markers": {"marker_threshold": [0.3, 0.4, 0.5, 0.6, 0.7], "threshold": [0.4, 0.5, 0.6],
                "min_marker_size": [3, 10], "min_size": [10, 30, 60, 100]},
}


def tune_postprocess(task, samples, objective: str = "aji", grid: dict | None = None) -> tuple[dict, list[dict]]:
    """Grid search over post-processing settings on ``samples`` (validation images; instance maps for the
    instance objectives).

    Returns ``(best_params, table)`` where ``table`` lists every combination with its mean score.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if objective in NEEDS_INSTANCES:
        samples = [s for s in samples if s.instances is not None]
    if not samples:
        raise ValueError(f"no validation image to score {objective!r} on (it needs instance maps): cannot tune")
    pp = task.postprocess
    grid = dict(grid or DEFAULT_GRIDS.get(pp.instances, {}))
    if not grid:
        return {}, []
    score_fn = OBJECTIVES[objective]
    maps = [task.predict_maps(s.image) for s in samples]
    maps = [m if task.heads else m["probs"] for m in maps]
    keys = sorted(grid)
    table = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        cand = pp.with_params(**params)
        scores = [score_fn(s, cand(m), task.num_classes) for s, m in zip(samples, maps)]
        table.append({**params, objective: float(np.mean(scores))})
    best = max(table, key=lambda r: r[objective])
    log.info("tuned post-processing on %d validation images: %s", len(samples), best)
    return {k: best[k] for k in keys}, table


def store_postprocess(ckpt_path: str | Path, config: dict) -> None:
    """Replace the post-processing settings stored in a checkpoint (atomic rewrite)."""
    p = Path(ckpt_path)
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    ckpt.setdefault("histoseg", {})["postprocess"] = dict(config)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        publish(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
