"""Subprocess probe for tests/test_tiled_memory.py: peak anonymous-memory growth of one tiled_predict call.

Run as ``python -m tests.tiled_memory_probe <img.npy> <out.npy> <rows> <tile> <batch>``; prints one JSON line.
RssAnon (``/proc/self/status``) counts heap memory only, not the pages of the memory-mapped input and
output files; a sampling thread records its maximum during the call. The parent sets
``MALLOC_MMAP_THRESHOLD_`` so freed large blocks go back to the OS and the number tracks live memory.
"""
import json
import sys
import threading
import time

import numpy as np
import torch

from histoseg.inference import tiled_predict


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def two_class_pointwise(x: torch.Tensor) -> torch.Tensor:
    """A tiny pointwise "model": 2 logits per pixel from the red and blue channels."""
    return torch.cat([x[:, :1], x[:, 2:3]], 1) * 4 - 2


def main(img_path: str, out_path: str, rows: int, tile: int, batch: int) -> None:
    torch.set_num_threads(1)
    img = np.load(img_path, mmap_mode="r")[:rows]
    out = np.load(out_path, mmap_mode="r+")[:, :rows]
    tiled_predict(np.zeros((300, 300, 3), np.uint8), two_class_pointwise, (tile, tile), 0.25, batch_size=batch,
                  device="cpu")  # warm-up: thread pools and allocator state exist before the baseline
    base = rss_anon()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        res = tiled_predict(img, two_class_pointwise, (tile, tile), 0.25, batch_size=batch, device="cpu", out=out)
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], rss_anon())
    out.flush()
    print(json.dumps({"growth": peak[0] - base, "same_array": res is out}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:6]))
