"""Tune post-processing thresholds on the validation split only, and store them in checkpoints.

The test split is never looked at: ``tune_postprocess`` receives validation samples, predicts their maps
once, and grid-searches the instance post-processing settings for the best mean objective (AJI by
default). ``store_postprocess`` writes the result into checkpoint files, so ``histoseg-eval`` and
``histoseg-predict`` reproduce it.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from histoseg.data.io import publish
from histoseg.inference.postprocess import StageCache
from histoseg.metrics.instance import aji, aji_plus, pairwise_overlap, panoptic_quality
from histoseg.metrics.pixel import image_scores
from histoseg.utils.machine import available_cores

log = logging.getLogger(__name__)

# each objective scores one validation sample against the post-processed output ``{"labels", "instances"}``
OBJECTIVES = {
    "aji": lambda s, out, k: aji(s.instances, out["instances"]),
    "aji_plus": lambda s, out, k: aji_plus(s.instances, out["instances"]),
    "pq": lambda s, out, k: panoptic_quality(s.instances, out["instances"])["pq"],
    # both instance targets at once: AJI rewards the pixel overlap of matched nuclei, PQ also counts every
    # unmatched (e.g. small spurious) object, so AJI alone leaves ``min_size`` free to keep noise
    "aji_pq": lambda s, out, k: aji_pq(s.instances, out["instances"]),
    # whole-image pixel Dice of the post-processed class map, exactly as the test step scores it: for datasets
    # whose reported metric is Dice (e.g. BreCaHAD's point discs), where the threshold and min_size trade
    # spurious blobs against missed nuclei
    "dice": lambda s, out, k: image_scores(out["labels"], s.mask, k)["dice"],
}
NEEDS_INSTANCES = {"aji", "aji_plus", "pq", "aji_pq"}


def aji_pq(true, pred) -> float:
    """The ``aji_pq`` objective: the mean of AJI and PQ, from one overlap table."""
    ov = pairwise_overlap(true, pred)  # one overlap table for both metrics
    return 0.5 * (aji(true, pred, overlap=ov) + panoptic_quality(true, pred, overlap=ov)["pq"])


# settings of the early post-processing stages (class map, clean-up, distance / energy): the grid is computed
# with these varying slowest, so each image's StageCache recomputes a stage only when its settings change
STAGE_ORDER = (
    "threshold", "clean_classes", "opening_radius", "fill_holes", "min_size", "ring_class", "ring_width",
    "nuclei_classes", "marker_source", "smooth", "hv_ksize", "hv_signed",
)

DEFAULT_GRIDS = {
    "watershed": {"h": [0.5, 1.0, 2.0, 3.0], "smooth": [0.5, 1.0, 2.0], "threshold": [0.4, 0.5, 0.6],
                  "min_size": [10, 30, 60, 100]},
    "markers": {"marker_threshold": [0.3, 0.4, 0.5, 0.6, 0.7], "threshold": [0.4, 0.5, 0.6],
                "min_marker_size": [3, 10], "min_size": [10, 30, 60, 100]},
}

# the dice objective's default grid in every mode but markers (whose instances redraw the class map, so its own
# grid applies): without markers only the class map's settings can change the Dice
DEFAULT_DICE_GRID = {"threshold": [0.3, 0.4, 0.5, 0.6, 0.7], "min_size": [0, 10, 30, 100]}


def tune_postprocess(task, samples, objective: str = "aji", grid: dict | None = None,
                     workers: int | str | None = "auto") -> tuple[dict, list[dict]]:
    """Grid search over post-processing settings on ``samples`` (validation images; instance maps for the
    instance objectives).

    The maps are predicted once; each image then runs the whole grid, reusing its early stages (see
    ``STAGE_ORDER``). ``workers``: processes scoring images (or, with more processes than images, pieces of an
    image's grid) side by side (Linux ``fork``: the maps are inherited, not copied); ``"auto"`` uses the
    available cores (at most 16) when the grid is large enough to repay the start-up; 1 or None runs in this
    process. The result does not depend on it.

    Returns ``(best_params, table)`` where ``table`` lists every combination with its mean score.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    if objective in NEEDS_INSTANCES:
        samples = [s for s in samples if s.instances is not None]
    if not samples:
        raise ValueError(f"no validation image to score {objective!r} on (it needs instance maps): cannot tune")
    pp = task.postprocess
    if grid is None and objective == "dice" and pp.instances != "markers":
        grid = DEFAULT_DICE_GRID
    grid = dict(grid or DEFAULT_GRIDS.get(pp.instances, {}))
    if not grid:
        return {}, []
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):  # a bad setting fails here, before any prediction
        try:
            pp.with_params(**dict(zip(keys, values)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"post-processing tuning grid: setting {dict(zip(keys, values))} on top of "
                             f"{pp.config()} is invalid: {e}") from e
    t0 = time.perf_counter()
    maps = [task.predict_maps(s.image) for s in samples]
    maps = [m if task.heads else m["probs"] for m in maps]
    order = sorted(keys, key=lambda k: (STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER), k))
    combos = list(itertools.product(*(grid[k] for k in order)))
    # what the objectives read of a sample (not its image): cheap to hand to worker processes
    truths = [SimpleNamespace(instances=s.instances, mask=getattr(s, "mask", None)) for s in samples]
    pixels = sum(int(np.prod(np.shape(m if isinstance(m, np.ndarray) else next(iter(m.values())))[-2:])) for m in maps)
    n_proc = _n_workers(workers, len(combos) * pixels)
    # tasks: (image, first, last setting); with more processes than images each image's grid is cut into
    # contiguous pieces (a piece recomputes at most the stages it starts in)
    pieces = min(len(combos), -(-n_proc // len(samples))) if n_proc > 1 else 1
    bounds = np.linspace(0, len(combos), pieces + 1).astype(int)
    tasks = [(i, int(a), int(b)) for i in range(len(samples)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    job = (pp, order, combos, objective, task.num_classes, truths, maps)
    if n_proc > 1:
        global _JOB
        _JOB = job
        try:
            with multiprocessing.get_context("fork").Pool(min(n_proc, len(tasks))) as pool:
                parts = _logged(pool.imap(_score_task, tasks, chunksize=1), len(tasks), t0)
        finally:
            _JOB = None
    else:
        parts = _logged((_grid_scores(job, *t) for t in tasks), len(tasks), t0)
    per_image = [[] for _ in samples]
    for (i, _, _), part in zip(tasks, parts):
        per_image[i].extend(part)
    # mean over images in sample order, as one loop over candidates would give; keyed in sorted-key order
    perm = [order.index(k) for k in keys]
    # keyed by repr: a setting may be a list (e.g. clean_classes), which cannot key a dict
    scored = {repr(tuple(values[p] for p in perm)): float(np.mean([img[j] for img in per_image]))
              for j, values in enumerate(combos)}
    # the table (and so the first best on ties) in the grid's sorted-key order, whatever the computing order
    table = [{**dict(zip(keys, values)), objective: scored[repr(tuple(values))]}
             for values in itertools.product(*(grid[k] for k in keys))]
    best = max(table, key=lambda r: r[objective])
    log.info("tuned post-processing on %d validation images (%d settings, %d process%s, %.0f s): %s", len(samples),
             len(combos), n_proc, "es" if n_proc > 1 else "", time.perf_counter() - t0, best)
    return {k: best[k] for k in keys}, table


# a grid smaller than this (settings x validation pixels) is scored in-process: forking would cost more
PARALLEL_MIN_WORK = 2e7
_JOB = None  # the grid job handed to forked workers (set only while a pool runs)


def _n_workers(workers, work: float) -> int:
    if workers in (None, 0, 1) or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if workers == "auto":
        if work < PARALLEL_MIN_WORK:
            return 1
        return max(1, min(available_cores(), 16))
    return max(1, int(workers))


def _logged(results, n: int, t0: float) -> list:
    """Collect ``results`` in order, logging progress (a grid on large validation images takes minutes)."""
    out, last = [], time.perf_counter()
    for k, r in enumerate(results, start=1):
        out.append(r)
        if time.perf_counter() - last > 10 or k == n:
            last = time.perf_counter()
            log.info("tuning post-processing: %d/%d images (or grid pieces) scored, %.0f s", k, n, last - t0)
    return out


def _grid_scores(job, i: int, first: int, last: int) -> list[float]:
    """Image ``i``'s objective for grid settings ``combos[first:last]`` (one StageCache for them)."""
    pp, order, combos, objective, num_classes, truths, maps = job
    score_fn, cache = OBJECTIVES[objective], StageCache()
    return [float(score_fn(truths[i], _skip_unused_stages(pp.with_params(**dict(zip(order, v))), objective)(
        maps[i], cache=cache), num_classes)) for v in combos[first:last]]


def _skip_unused_stages(pp, objective: str):
    """The same scores, less work: an objective on the class map (dice) needs no watershed when the class map
    is final before the instance stage (not in ``markers`` mode, which redraws it from the instances, nor with
    ``render=disc``, which redraws it from them too)."""
    if objective not in NEEDS_INSTANCES and pp.instances != "markers" and pp.render == "mask":
        return pp.with_params(instances="none")
    return pp


def _score_task(task: tuple[int, int, int]) -> list[float]:
    torch.set_num_threads(1)  # one core per worker (the Dice objective's stat scores use torch)
    return _grid_scores(_JOB, *task)


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
