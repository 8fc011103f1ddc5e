"""Whole-slide inference: slide throughput vs in-memory tiled inference, and peak memory vs slide size.

    python -m benchmarks.run --only wsi            # via the suite: results/<device>.json (entry "wsi")
    python -m benchmarks.run --only wsi --quick    # ratio on a 4k mosaic, peak RSS for 2k / 4k
    python -m benchmarks.wsi_bench --json out.json --threads 1 --extra '{"workers": 2}'

Slides are mosaics of the MoNuSeg test images (real tissue, 0.25 um/px; ``$HISTOSEG_DATA/monuseg``) with
blank gaps and margins, written as pyramidal JPEG-compressed tiled TIFFs (as scanners do); with
``"tissue": "synthetic"`` (or without the data kit) tiles of the synthetic generator stand in (recorded as
``tissue_source``).

* **ratio**: the tissue megapixels per second of the streaming inference stage (``predict_blocks``: tiles read
  by DataLoader workers from the slide, Gaussian blending, written to the zarr store) divided by the rate of
  ``tiled_predict`` on the same pixels held in memory (same model, tiles, tissue filter, batch size, threads),
  for a 1x1-conv model (I/O-bound: the worst case) and a small UNet (depth 3, width 16). Goal >= 0.8.
* **memory**: peak RSS of ``histoseg-predict`` on one slide (a fresh process per size: tissue detection,
  streaming inference, streaming post-processing, all outputs) and of its DataLoader workers, with the 1x1
  model and connected-component nuclei. Goal: flat in the slide size.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ROOT, Options, module_main, progress, rate, ratio

TILE, OVERLAP, BATCH = 256, 0.25, 8
INFERENCE = {"tile_shape": [TILE, TILE], "overlap": OVERLAP, "batch_size": BATCH, "tta": "none", "blend": "gaussian"}
UNET = {"_target_": "histoseg.models.backbones.unet.UNet", "_partial_": True, "depth": 3, "width": 16,
        "batch_norm": False}
MODELS = ("pointwise", "unet")
TISSUE = ("monuseg", "synthetic")


def _sig(v: float) -> float:
    """``v`` to 4 significant digits."""
    return float(f"{v:.4g}")


def make_mosaic(side: int, tissue: str = "monuseg"):
    """A ``side x side`` mosaic of MoNuSeg test images (synthetic generator tiles with ``tissue="synthetic"`` or
    without the data kit) and what its tissue is."""
    from histoseg.utils.config import data_root
    from histoseg.wsi.testslides import Mosaic, monuseg_mosaic

    if tissue not in TISSUE:
        raise ValueError(f"unknown tissue {tissue!r}; choose one of {TISSUE}")
    root = Path(data_root()) / "monuseg"
    if tissue == "monuseg" and (root / "test").is_dir():
        return monuseg_mosaic(root, shape=(side, side)), "monuseg test images"
    from histoseg.data.readers.synthetic import generate_tile

    cell = min(1000, max(side // 5, 128))  # MoNuSeg-sized cells on large slides; blank margins on small ones
    tiles = [generate_tile(0, i, (cell, cell)) for i in range(4)]
    source = "synthetic generator" + (" (no data kit)" if tissue == "monuseg" else "")
    return Mosaic.fill([t[0] for t in tiles], [(t[1] > 0).astype(np.uint8) for t in tiles], (side, side),
                       gap=cell // 16, margin=cell // 2), source


def write_ckpt(path: Path, kind: str) -> Path:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.helpers_ckpt import dark_is_nucleus, write_checkpoint

    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    if kind == "pointwise":
        return write_checkpoint(path, 2, dark_is_nucleus, {"instances": "connected", "min_size": 20}, mpp=0.25,
                                dataset="monuseg", inference=INFERENCE)
    return write_checkpoint(path, 2, None, {"instances": "connected", "min_size": 20}, mpp=0.25, dataset="monuseg",
                            net_config=UNET, inference=INFERENCE)


def compose(out: Path, ckpt: Path, slide: Path, workers: int, device: str):
    """``conf/predict.yaml`` for one slide (what ``histoseg-predict ckpt_path=... input=<slide>`` runs)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from histoseg.utils.config import conf_dir

    GlobalHydra.instance().clear()
    overrides = [f"ckpt_path={ckpt}", f"input={slide}", f"wsi.num_workers={workers}", "progress=false",
                 f"device={device}"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hcompose("predict", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)  # (outside a Hydra run there is no hydra.runtime.output_dir)
        cfg.output_dir = str(out)
        cfg.wsi.output_dir = str(out / "slides")
    return cfg


# ---------------------------------------------------------------------- throughput ratio
def throughput(side: int, work: Path, threads: int, workers: int, device: torch.device, models: list[str],
               tissue_kind: str) -> dict:
    from histoseg.inference import tiled_predict
    from histoseg.tasks.restore import restore_task
    from histoseg.wsi import Slide, predict_slide
    from histoseg.wsi.pipeline import _tissue
    from histoseg.wsi.stream import tissue_tile_count
    from histoseg.wsi.tiles import model_grid

    torch.set_num_threads(threads)
    mosaic, source = make_mosaic(side, tissue_kind)
    slide_path = mosaic.write(work / f"ratio_{side}.tif", mpp=0.25, compression="jpeg")
    with Slide(slide_path) as s:
        image = s.read_region(0, 0, s.shape)
    out = {"side": side, "tissue_source": source, "threads": threads, "workers": workers, "models": {}}
    for kind in models:
        ckpt = write_ckpt(work / f"{kind}.ckpt", kind)
        cfg = compose(work / f"ratio_{kind}", ckpt, slide_path, workers, str(device))
        task = restore_task(ckpt)[0].eval().to(device)
        t = time.perf_counter()
        row = predict_slide(slide_path, "ratio", task, cfg.wsi, cfg.wsi.output_dir, device, ckpt, cfg.report,
                            progress=False)
        total_s = time.perf_counter() - t
        with Slide(slide_path) as s:
            tissue = _tissue(s, cfg.wsi.tissue)
            grid = model_grid(s, 0.25)
        keep = tissue.tile_filter(grid.scale, cfg.wsi.tissue.min_tile_fraction)
        kept, total = tissue_tile_count(grid.shape, INFERENCE, keep)
        t = time.perf_counter()
        tiled_predict(image, task, (TILE, TILE), OVERLAP, batch_size=BATCH, device=device, tile_filter=keep,
                      empty_value=float("nan"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        mem_s = time.perf_counter() - t
        tissue_mpix = float(row["tissue_area_mm2"]) / (0.25e-3) ** 2 / 1e6
        slide_s = float(row["infer_seconds"])
        out["models"][kind] = {
            "tissue_mpix": _sig(tissue_mpix), "tiles": kept, "grid_tiles": total,
            "slide_infer_s": _sig(slide_s), "slide_total_s": _sig(total_s), "in_memory_s": _sig(mem_s),
            "slide_mpix_per_s": rate(tissue_mpix, slide_s), "in_memory_mpix_per_s": rate(tissue_mpix, mem_s),
            "ratio": ratio(mem_s, slide_s), "post_s": _sig(float(row["post_seconds"])),
        }
        progress(f"wsi: {kind}: slide {out['models'][kind]['slide_mpix_per_s']} MPix/s, in memory "
                 f"{out['models'][kind]['in_memory_mpix_per_s']} MPix/s, ratio {out['models'][kind]['ratio']}")
    return out


# ---------------------------------------------------------------------- memory vs size
def _status_kib(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # the process has ended
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                out.append(int(p.name))
    return out


class RssSampler:
    """Peak resident memory of this process and of its child processes (the DataLoader workers), sampled every
    ``interval`` s from ``/proc`` (``ru_maxrss`` is no use here: Linux carries it over ``fork`` + ``exec``, so a
    process started by a large one reports the parent's size)."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.pid = interval, os.getpid()
        self.worker_kib = self.total_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            own = _status_kib(self.pid, "VmRSS")
            kids = [_status_kib(c, "VmRSS") for c in _children(self.pid)]
            self.worker_kib = max([self.worker_kib, *kids])
            self.total_kib = max(self.total_kib, own + sum(kids))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child(slide: str, ckpt: str, out: str, threads: int, workers: int, device: str) -> None:
    """One ``histoseg-predict`` run in this process; prints its peak memory (own, workers, sum) as JSON."""
    torch.set_num_threads(threads)
    from histoseg.tasks.predict import predict

    base = _status_kib("self", "VmRSS")
    cfg = compose(Path(out), Path(ckpt), Path(slide), workers, device)
    t = time.perf_counter()
    with RssSampler() as rss:
        summary, obj = predict(cfg)
    wall = time.perf_counter() - t
    row = obj["rows"][0]
    res = {
        "status": row["status"], "error": row.get("error", ""), "wall_s": round(wall, 1),
        "peak_rss_mb": round(_status_kib("self", "VmHWM") / 1024, 1),
        "rss_before_mb": round(base / 1024, 1),
        "workers_peak_rss_mb": round(rss.worker_kib / 1024, 1),
        "total_peak_rss_mb": round(rss.total_kib / 1024, 1),
        "nuclei": row.get("nuclei_count"), "tissue_area_mm2": row.get("tissue_area_mm2"),
    }
    s = Path(out) / "slides" / Path(slide).stem / "summary.csv"
    if s.is_file():
        with open(s) as f:
            r = next(csv.DictReader(f))
        res.update(infer_s=float(r["infer_seconds"]), post_s=float(r["post_seconds"]))
    print(json.dumps(res), flush=True)


def memory(sides: list[int], work: Path, threads: int, workers: int, device: torch.device, tissue: str) -> list[dict]:
    ckpt = write_ckpt(work / "pointwise.ckpt", "pointwise")
    rows = []
    for side in sides:
        mosaic, source = make_mosaic(side, tissue)
        t = time.perf_counter()
        slide = mosaic.write(work / f"mosaic_{side}.tif", mpp=0.25, compression="jpeg")
        write_s = time.perf_counter() - t
        del mosaic
        progress(f"wsi: {side} x {side}: histoseg-predict in a subprocess")
        cmd = [sys.executable, "-m", "benchmarks.wsi_bench", "--child", str(slide), str(ckpt),
               str(work / f"run_{side}"), str(threads), str(workers), str(device)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            rows.append({"side": side, "status": f"error (exit {r.returncode})", "stderr": r.stderr[-2000:]})
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"side": side, "mpix": round(side * side / 1e6, 1), "slide_mb": round(slide.stat().st_size / 2**20, 1),
                     "write_slide_s": round(write_s, 1), "tissue_source": source, **res})
        progress(f"wsi: {side} x {side}: peak RSS {res['peak_rss_mb']} MB, workers {res['workers_peak_rss_mb']} MB")
        slide.unlink()
        shutil.rmtree(work / f"run_{side}", ignore_errors=True)
    return rows


FULL = dict(ratio_side=8192, sizes=[4096, 8192, 16384, 32768], models=["pointwise", "unet"], workers=1,
            tissue="monuseg")
QUICK = dict(ratio_side=4096, sizes=[2048, 4096], models=["pointwise", "unet"], workers=1, tissue="monuseg")


def settings(opts: Options) -> dict:
    s = dict(QUICK if opts.quick else FULL)
    unknown = set(opts.extra) - set(s)
    if unknown:
        raise ValueError(f"unknown wsi benchmark setting(s) {sorted(unknown)}; choose from {sorted(s)}")
    s.update(opts.extra)
    return s


def run(opts: Options) -> dict:
    """Both measurements (``benchmarks.run`` calls it in a subprocess through :func:`module_main`)."""
    s = settings(opts)
    device = opts.torch_device
    threads = opts.threads or torch.get_num_threads()
    Path(opts.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=opts.work_dir) as tmp:
        work = Path(tmp)
        progress(f"wsi: throughput on a {s['ratio_side']} px mosaic ({', '.join(s['models'])})")
        speed = throughput(s["ratio_side"], work, threads, s["workers"], device, s["models"], s["tissue"])
        progress(f"wsi: peak memory for {s['sizes']}")
        mem = memory(s["sizes"], work, threads, s["workers"], device, s["tissue"])
    return {
        "settings": {**s, "tile": TILE, "overlap": OVERLAP, "batch": BATCH, "threads": threads, "device": str(device),
                     "block_shape": [8192, 8192], "compression": "jpeg", "mpp": 0.25},
        "ratio": speed,
        "memory": mem,
        "notes": "ratio = in-memory tiled_predict seconds / streaming inference seconds on the same tissue tiles "
                 "(= slide MPix/s / in-memory MPix/s); slide_total_s adds tissue detection, post-processing and "
                 "outputs. peak_rss_mb = VmHWM of the histoseg-predict process (a fresh one per size); "
                 "workers_peak_rss_mb = the largest DataLoader worker's VmRSS and total_peak_rss_mb = the process "
                 "plus its workers (shared library pages counted in each), both sampled every 50 ms",
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        child(a[0], a[1], a[2], int(a[3]), int(a[4]), a[5])
    else:
        module_main(run)
