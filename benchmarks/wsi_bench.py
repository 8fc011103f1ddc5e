"""Whole-slide inference benchmark: slide throughput vs in-memory tiled inference, and peak memory vs slide size.

    python -m benchmarks.wsi_bench                 # ratio on an 8k mosaic, peak RSS for 4k / 8k / 16k / 32k
    python -m benchmarks.wsi_bench --quick         # ratio on a 4k mosaic, peak RSS for 2k / 4k (seconds)
    python -m benchmarks.wsi_bench --json out.json --threads 1 --workers 1

Slides are mosaics of the MoNuSeg test images (real tissue, 0.25 um/px; ``$HISTOSEG_DATA/monuseg``) with
blank gaps and margins, written as pyramidal JPEG-compressed tiled TIFFs (as scanners do); without the data
kit, tiles of the synthetic generator stand in (recorded as ``tissue_source``).

* **ratio**: the tissue megapixels per second of ``predict_blocks`` (tiles read by DataLoader workers from the
  slide, Gaussian blending, written to the zarr store) divided by the rate of ``tiled_predict`` on the same
  pixels held in memory (same model, tiles, tissue filter, batch size, threads), for a 1x1-conv model
  (I/O-bound: the worst case) and a small UNet (depth 3, width 16). Goal >= 0.8.
* **memory**: peak RSS of ``histoseg-predict`` on one slide (a fresh process per size: tissue detection,
  streaming inference, streaming post-processing, all outputs) and of its DataLoader workers, with the 1x1
  model and connected-component nuclei. Goal: flat in the slide size.

``run(quick) -> dict`` is the entry for ``benchmarks/run.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TILE, OVERLAP, BATCH = 256, 0.25, 8
INFERENCE = {"tile_shape": [TILE, TILE], "overlap": OVERLAP, "batch_size": BATCH, "tta": "none", "blend": "gaussian"}
UNET = {"_target_": "histoseg.models.backbones.unet.UNet", "_partial_": True, "depth": 3, "width": 16,
        "batch_norm": False}


def _data_root() -> Path:
    from histoseg.utils.config import data_root

    return Path(data_root())


def make_mosaic(side: int):
    """A ``side x side`` mosaic of MoNuSeg test images (or synthetic tiles without the data kit)."""
    from histoseg.wsi.testslides import Mosaic, monuseg_mosaic

    root = _data_root() / "monuseg"
    if (root / "test").is_dir() or (root / "MoNuSegTestData").is_dir():
        return monuseg_mosaic(root, shape=(side, side)), "monuseg test images"
    from histoseg.data.readers.synthetic import generate_tile

    tiles = [generate_tile(0, i, (1000, 1000)) for i in range(4)]
    return Mosaic.fill([t[0] for t in tiles], [(t[1] > 0).astype(np.uint8) for t in tiles], (side, side)), \
        "synthetic generator (no data kit)"


def write_ckpt(path: Path, kind: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.helpers_ckpt import dark_is_nucleus, write_checkpoint

    if kind == "pointwise":
        return write_checkpoint(path, 2, dark_is_nucleus, {"instances": "connected", "min_size": 20}, mpp=0.25,
                                dataset="monuseg", inference=INFERENCE)
    return write_checkpoint(path, 2, None, {"instances": "connected", "min_size": 20}, mpp=0.25, dataset="monuseg",
                            net_config=UNET, inference=INFERENCE)


def wsi_overrides(workers: int) -> list[str]:
    return [f"wsi.num_workers={workers}", "progress=false", "device=cpu"]


def compose(out: Path, ckpt: Path, slide: Path, workers: int):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from histoseg.utils.config import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hcompose("predict", overrides=[f"ckpt_path={ckpt}", f"input={slide}", *wsi_overrides(workers)])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)  # (outside a Hydra run there is no hydra.runtime.output_dir)
        cfg.wsi.output_dir = str(out / "slides")
    return cfg


# ---------------------------------------------------------------------- throughput ratio
def throughput(side: int, work: Path, threads: int, workers: int) -> dict:
    from histoseg.inference import tiled_predict
    from histoseg.tasks.restore import restore_task
    from histoseg.wsi import Slide, predict_slide
    from histoseg.wsi.stream import tissue_tile_count
    from histoseg.wsi.tiles import model_grid

    torch.set_num_threads(threads)
    mosaic, source = make_mosaic(side)
    slide_path = mosaic.write(work / f"ratio_{side}.tif", mpp=0.25, compression="jpeg")
    with Slide(slide_path) as s:
        image = s.read_region(0, 0, s.shape)
    out = {"side": side, "tissue_source": source, "threads": threads, "workers": workers, "models": {}}
    for kind in ("pointwise", "unet"):
        ckpt = write_ckpt(work / f"{kind}.ckpt", kind)
        cfg = compose(work / f"ratio_{kind}", ckpt, slide_path, workers)
        task = restore_task(ckpt)[0].eval()
        t = time.perf_counter()
        row = predict_slide(slide_path, "ratio", task, cfg.wsi, cfg.wsi.output_dir, "cpu", ckpt, cfg.report,
                            progress=False)
        total_s = time.perf_counter() - t
        with Slide(slide_path) as s:
            from histoseg.wsi.pipeline import _tissue

            tissue = _tissue(s, cfg.wsi.tissue)
            grid = model_grid(s, 0.25)
        keep = tissue.tile_filter(grid.scale, cfg.wsi.tissue.min_tile_fraction)
        kept, total = tissue_tile_count(grid.shape, INFERENCE, keep)
        t = time.perf_counter()
        tiled_predict(image, task, (TILE, TILE), OVERLAP, batch_size=BATCH, device="cpu", tile_filter=keep,
                      empty_value=float("nan"))
        mem_s = time.perf_counter() - t
        tissue_mpix = float(row["tissue_area_mm2"]) / (0.25e-3) ** 2 / 1e6
        slide_s = float(row["infer_seconds"])
        out["models"][kind] = {
            "tissue_mpix": round(tissue_mpix, 2), "tiles": kept, "grid_tiles": total,
            "slide_infer_s": round(slide_s, 2), "slide_total_s": round(total_s, 2), "in_memory_s": round(mem_s, 2),
            "slide_mpix_per_s": round(tissue_mpix / slide_s, 3), "in_memory_mpix_per_s": round(tissue_mpix / mem_s, 3),
            "ratio": round(mem_s / slide_s, 3), "post_s": round(float(row["post_seconds"]), 2),
        }
    return out


# ---------------------------------------------------------------------- memory vs size
def child(slide: str, ckpt: str, out: str, threads: int, workers: int) -> None:
    """One ``histoseg-predict`` run in this process; prints peak RSS (self and DataLoader workers) as JSON."""
    torch.set_num_threads(threads)
    from histoseg.tasks.predict import predict

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = compose(Path(out), Path(ckpt), Path(slide), workers)
    t = time.perf_counter()
    summary, obj = predict(cfg)
    wall = time.perf_counter() - t
    row = obj["rows"][0]
    res = {
        "status": row["status"], "error": row.get("error", ""), "wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mb": round(base / 2**20, 1),
        "workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "nuclei": row.get("nuclei_count"), "tissue_area_mm2": row.get("tissue_area_mm2"),
    }
    s = Path(out) / "slides" / Path(slide).stem / "summary.csv"
    if s.is_file():
        import csv

        with open(s) as f:
            r = next(csv.DictReader(f))
        res.update(infer_s=float(r["infer_seconds"]), post_s=float(r["post_seconds"]))
    print(json.dumps(res), flush=True)


def memory(sides: list[int], work: Path, threads: int, workers: int) -> list[dict]:
    ckpt = write_ckpt(work / "pointwise.ckpt", "pointwise")
    rows = []
    for side in sides:
        mosaic, source = make_mosaic(side)
        t = time.perf_counter()
        slide = mosaic.write(work / f"mosaic_{side}.tif", mpp=0.25, compression="jpeg")
        write_s = time.perf_counter() - t
        del mosaic
        cmd = [sys.executable, "-m", "benchmarks.wsi_bench", "--child", str(slide), str(ckpt), str(work / f"run_{side}"),
               "--threads", str(threads), "--workers", str(workers)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            rows.append({"side": side, "status": f"error (exit {r.returncode})", "stderr": r.stderr[-2000:]})
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"side": side, "mpix": round(side * side / 1e6, 1), "slide_mb": round(slide.stat().st_size / 2**20, 1),
                     "write_slide_s": round(write_s, 1), "tissue_source": source, **res})
        slide.unlink()
        import shutil

        shutil.rmtree(work / f"run_{side}", ignore_errors=True)
    return rows


def run(quick: bool = False, threads: int = 1, workers: int = 1, work_dir: str | None = None) -> dict:
    """Both measurements; ``quick``: ratio on 4k, memory for 2k / 4k."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        res = {
            "benchmark": "wsi", "quick": quick, "host_cpus": os.cpu_count(), "torch": torch.__version__,
            "loadavg_before": os.getloadavg(),
            "settings": {"tile": TILE, "overlap": OVERLAP, "batch": BATCH, "threads": threads, "workers": workers,
                         "block_shape": [8192, 8192], "compression": "jpeg", "mpp": 0.25},
            "ratio": throughput(4096 if quick else 8192, work, threads, workers),
            "memory": memory([2048, 4096] if quick else [4096, 8192, 16384, 32768], work, threads, workers),
        }
        res["wall_s"] = round(time.perf_counter() - t, 1)
        res["loadavg_after"] = os.getloadavg()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wsi_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write the result here (default: print it)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides of the ratio)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers reading slide tiles")
    p.add_argument("--work-dir", default=None, help="scratch folder for the slides (the 32k one is ~1 GB)")
    p.add_argument("--child", nargs=3, metavar=("SLIDE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(*a.child, a.threads, a.workers)
        return
    res = run(a.quick, a.threads, a.workers, a.work_dir)
    text = json.dumps(res, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
