"""Post-processing tuning: seconds to score the default grid on validation-size images, plain loop vs the tuner.

Images: MoNuSeg training images' ground-truth instance maps (the data kit; ``HISTOSEG_DATA``), cropped, with
predicted maps simulated from them (blurred foreground plus smooth noise; distance and interior maps with noise),
so no model is needed and every run sees the same maps. For each post-processing mode (``watershed`` for binary
models, ``markers`` for the instance heads) and its default grid (``histoseg.inference.tuning.DEFAULT_GRIDS``),
with the ``aji_pq`` objective:

* ``plain_s``: a fresh post-processor per setting and image, AJI and PQ each from their own overlap table: what
  ``tune_postprocess`` did before it reused stages;
* ``tuner_1_s``: ``tune_postprocess(workers=1)`` (stages reused, one overlap table, relabelling by look-up table);
* ``tuner_auto_s``: ``tune_postprocess(workers="auto")`` (images scored in forked processes, one per core);
* ``tables_equal``: whether all three gave the identical table (the shortcuts must not change a score).
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.common import Options, cpu_count, module_main, progress

FULL = dict(n_images=4, crop=512, modes=["watershed", "markers"])
QUICK = dict(n_images=2, crop=64, modes=["watershed", "markers"])


def settings(opts: Options) -> dict:
    return {**(QUICK if opts.quick else FULL), **opts.extra}


def simulated_maps(inst: np.ndarray, seed: int) -> dict:
    """What an imperfect model might predict for ``inst``: every map the post-processing modes read."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    fg = ndi.gaussian_filter((inst > 0).astype(float), 1.5) + ndi.gaussian_filter(rng.normal(0, 0.6, inst.shape), 1)
    fg = np.clip(fg, 0, 1).astype(np.float32)
    dist = np.zeros(inst.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        d = ndi.distance_transform_edt(inst[sl] == i)
        dist[sl] = np.maximum(dist[sl], d / max(d.max(), 1))
    dist = np.clip(dist + rng.normal(0, 0.1, inst.shape), 0, 1).astype(np.float32)
    return {"fg": fg, "dist": dist, "interior": np.clip(dist * 1.5, 0, 1).astype(np.float32),
            "probs": np.stack([1 - fg, fg]), "binary": fg[None]}


def load_instances(n: int, crop: int) -> list[np.ndarray]:
    from histoseg.data.readers.monuseg import MoNuSegReader
    from histoseg.metrics.instance import remap_label
    from histoseg.utils.config import data_root

    reader = MoNuSegReader(Path(data_root()) / "monuseg")
    out = []
    for cid in reader.official_split()["train"]:  # the kit's images with instance maps, in sorted order
        inst = reader.read(cid).instances
        if inst is not None and len(out) < n:
            out.append(remap_label(inst[:crop, :crop]))
    return out


def plain_grid(pp, grid: dict, images: list[tuple[np.ndarray, dict]], heads: bool) -> list[dict]:
    """The grid scored the straightforward way, in sorted-key order (the reference the tuner must equal)."""
    from histoseg.metrics.instance import aji, panoptic_quality

    keys, table = sorted(grid), []
    for values in itertools.product(*(grid[k] for k in keys)):
        cand = pp.with_params(**dict(zip(keys, values)))
        scores = []
        for inst, maps in images:
            pred = cand(maps if heads else maps["binary"])["instances"]
            scores.append(0.5 * (aji(inst, pred) + panoptic_quality(inst, pred)["pq"]))
        table.append({**dict(zip(keys, values)), "aji_pq": float(np.mean(scores))})
    return table


def tuner_task(pp, images: list[tuple[np.ndarray, dict]], heads: bool):
    """A stand-in for a trained task whose ``predict_maps`` returns the simulated maps of each sample."""
    by_id = {id(maps): maps for _, maps in images}
    samples = [SimpleNamespace(image=maps, instances=inst, mask=(inst > 0).astype(np.uint8)) for inst, maps in images]
    task = SimpleNamespace(postprocess=pp, heads={"seg": 3, "dist": 1} if heads else None, num_classes=2,
                           predict_maps=lambda im: by_id[id(im)] if heads else {"probs": by_id[id(im)]["binary"]})
    return task, samples


def run(opts: Options) -> dict:
    from histoseg.inference.postprocess import PostProcessor
    from histoseg.inference.tuning import DEFAULT_GRIDS, tune_postprocess

    s = settings(opts)
    insts = load_instances(s["n_images"], s["crop"])
    images = [(inst, simulated_maps(inst, seed)) for seed, inst in enumerate(insts)]
    rows = []
    for mode in s["modes"]:
        heads = mode == "markers"
        pp = PostProcessor(instances=mode, marker_source="interior_distance")
        grid = DEFAULT_GRIDS[mode]
        task, samples = tuner_task(pp, images, heads)
        progress(f"tuning: {mode} plain loop ({len(list(itertools.product(*grid.values())))} settings)")
        t = time.perf_counter()
        plain = plain_grid(pp, grid, images, heads)
        plain_s = time.perf_counter() - t
        times, tables = {}, {}
        for workers in (1, "auto"):
            progress(f"tuning: {mode} tune_postprocess(workers={workers})")
            t = time.perf_counter()
            _, tables[workers] = tune_postprocess(task, samples, "aji_pq", dict(grid), workers=workers)
            times[workers] = time.perf_counter() - t
        rows.append({
            "mode": mode, "settings": len(plain), "plain_s": round(plain_s, 2), "tuner_1_s": round(times[1], 2),
            "tuner_auto_s": round(times["auto"], 2), "speedup_1": round(plain_s / times[1], 2),
            "speedup_auto": round(plain_s / times["auto"], 2),
            "tables_equal": plain == tables[1] == tables["auto"],
        })
    return {
        "settings": {**s, "images": "MoNuSeg official train images with instance maps (first n, sorted), top-left crop", "cores": cpu_count()},
        "rows": rows,
        "notes": "seconds to score the default grid (aji_pq objective) on the images; speedup = plain / tuner; "
                 "tables_equal: identical scores for every setting",
    }


if __name__ == "__main__":
    module_main(run)
