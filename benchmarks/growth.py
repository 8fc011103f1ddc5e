"""Cost growth: time and peak memory of ``tiled_predict`` on 2k, 4k, 8k and 16k square images.

Input: a uint8 ``(S, S, 3)`` ``.npy`` memmap; output: a float32 ``(K, S, S)`` ``.npy`` memmap (``out=``). Each size
runs in a fresh subprocess (``python -m benchmarks.growth --probe ...``) that reports:

* ``seconds``: the ``tiled_predict`` call alone (no interpreter start, no file creation);
* ``peak_heap_growth_mib``: the peak of ``RssAnon`` (``/proc/self/status``, sampled every 2 ms) minus its value
  before the call: heap memory only. Pages of the memory-mapped input and output files are not heap: the
  kernel writes them back and evicts them as needed, so they are reported apart (``vm_hwm_mib``, the peak
  resident set *including* file pages, which grows with the output written);
* on CUDA also ``cuda_peak_mib`` (``torch.cuda.max_memory_allocated``).

The model is a small fully convolutional network (conv 3x3 3->4, ReLU, conv 1x1 4->2), not a UNet: the
benchmark measures how the tiling, blending and memmap I/O scale, and a real UNet at 16k px on a CPU would
take hours. Time should grow in proportion to the pixels (``s_per_mp`` flat) and heap memory stay flat.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ROOT, Options, module_main, progress

FULL = dict(sizes=[2048, 4096, 8192, 16384], tile=256, overlap=0.25, batch_size=8, timeout_s=900)
QUICK = dict(sizes=[256, 512], tile=64, overlap=0.25, batch_size=4, timeout_s=300)
K = 2


def small_fcn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, K, 1)).eval()


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_input(path: Path, size: int) -> None:
    """A deterministic uint8 ``(size, size, 3)`` ``.npy`` memmap, written in row blocks (never whole in RAM)."""
    img = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    ramp = np.arange(size, dtype=np.uint32)[None, :, None] * 7 + np.arange(3, dtype=np.uint32)[None, None, :] * 50
    for r in range(0, size, 512):
        rows = np.arange(r, min(r + 512, size), dtype=np.uint32)[:, None, None]
        img[r : r + len(rows)] = ((ramp + rows * 3) % 251).astype(np.uint8)
    img.flush()
    del img


def probe(img_path: str, out_path: str, tile: int, overlap: float, batch: int, device: str, threads: int) -> dict:
    """One ``tiled_predict`` call on the memmaps, with heap sampling (runs in the probe subprocess)."""
    from histoseg.inference import tiled_predict

    if threads > 0:
        torch.set_num_threads(threads)

    dev = torch.device(device)
    net = small_fcn().to(dev)
    img = np.load(img_path, mmap_mode="r")
    out = np.load(out_path, mmap_mode="r+")
    with torch.inference_mode():  # warm-up: thread pools and allocator exist before the baseline
        tiled_predict(np.zeros((tile + 40, tile + 40, 3), np.uint8), net, (tile, tile), overlap, batch_size=batch,
                      device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = status_kib("RssAnon")
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], status_kib("RssAnon"))
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            res = tiled_predict(img, net, (tile, tile), overlap, batch_size=batch, device=dev, out=out)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
    peak[0] = max(peak[0], status_kib("RssAnon"))
    out.flush()
    # spot check: finite values were written where the last tile row ends
    tail = np.asarray(out[:, -4:, -4:])
    return {
        "seconds": round(seconds, 3),
        "peak_heap_growth_mib": round((peak[0] - base) / 1024, 1),
        "vm_hwm_mib": round(status_kib("VmHWM") / 1024, 1),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None,
        "wrote_into_out": res is out,
        "tail_finite": bool(np.isfinite(tail).all()),
    }


def settings(opts: Options) -> dict:
    s = dict(QUICK if opts.quick else FULL)
    s.update({k: v for k, v in opts.extra.items() if k in s})
    return s


def run(opts: Options) -> dict:
    s = settings(opts)
    device = opts.torch_device
    work = Path(opts.work_dir) / "growth"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in s["sizes"]:
        img, out = work / f"img_{size}.npy", work / f"out_{size}.npy"
        try:
            progress(f"growth: {size} x {size}: writing the input memmap")
            make_input(img, size)
            np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(K, size, size)).flush()
            progress(f"growth: {size} x {size}: tiled_predict in a subprocess")
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed large blocks go back to the OS
            cmd = [sys.executable, "-m", "benchmarks.growth", "--probe", str(img), str(out), str(s["tile"]),
                   str(s["overlap"]), str(s["batch_size"]), str(device), str(torch.get_num_threads())]
            try:
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=s["timeout_s"])
            except subprocess.TimeoutExpired:
                rows.append({"size": size, "status": "timeout", "limit_s": s["timeout_s"]})
                break  # larger sizes would time out too
            if r.returncode != 0:
                rows.append({"size": size, "status": "error", "stderr_tail": r.stderr[-2000:]})
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            mp = size * size / 1e6
            rows.append({"size": size, "status": "ok", "megapixels": round(mp, 6), **res,
                         "s_per_mp": round(res["seconds"] / mp, 6)})
        finally:
            img.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        ref = ok[0]
        for r in ok:
            r["time_vs_smallest_per_pixel"] = round(r["s_per_mp"] / ref["s_per_mp"], 3)
            r["heap_vs_smallest"] = round(r["peak_heap_growth_mib"] / max(ref["peak_heap_growth_mib"], 1e-3), 3)
    return {
        "settings": {**s, "device": str(device), "model": "small FCN: conv3x3 3->4, ReLU, conv1x1 4->2 (not a UNet)",
                     "torch_threads": torch.get_num_threads(),
                     "input": "uint8 HxWx3 .npy memmap", "output": f"float32 ({K},H,W) .npy memmap via out="},
        "rows": rows,
        "notes": "time_vs_smallest_per_pixel = (seconds per megapixel) / (that of the smallest size): ~1 means time "
                 "grows linearly with pixels; peak_heap_growth_mib = peak RssAnon growth during the call (heap, "
                 "excludes memmapped file pages); vm_hwm_mib includes resident file pages of the memmaps",
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        a = sys.argv[2:]
        print(json.dumps(probe(a[0], a[1], int(a[2]), float(a[3]), int(a[4]), a[5], int(a[6]))), flush=True)
    else:
        module_main(run)
