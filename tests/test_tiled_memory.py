"""Flat memory: tiled inference of an 8k x 8k image (memmap in, memmap out) holds a band, not the image.

A bounded check, not a timing: the peak heap growth of ``tiled_predict`` must stay far below one
image-sized float32 accumulator and must not grow with the image height.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiled_memory_probe import two_class_pointwise

ROOT = Path(__file__).resolve().parents[1]
H = W = 8192
K, TILE, BATCH = 2, 256, 8

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc RssAnon")


def probe(img: Path, out: Path, rows: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.tiled_memory_probe", str(img), str(out), str(rows), str(TILE),
                        str(BATCH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tiled_predict_memory_is_flat_on_an_8k_memmap(tmp_path):
    img = np.lib.format.open_memmap(tmp_path / "img.npy", mode="w+", dtype=np.uint8, shape=(H, W, 3))
    ramp = (np.arange(W, dtype=np.uint32)[None, :, None] * 7 + np.arange(3)[None, None, :] * 50)
    for r in range(0, H, 1024):
        img[r : r + 1024] = ((ramp + np.arange(r, r + 1024, dtype=np.uint32)[:, None, None]) % 251).astype(np.uint8)
    img.flush()
    del img
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(K, H, W))
    del out

    short = probe(tmp_path / "img.npy", tmp_path / "out.npy", 1024)
    full = probe(tmp_path / "img.npy", tmp_path / "out.npy", H)
    print(f"peak heap growth: {short['growth'] / 2**20:.0f} MiB at 1024 rows, {full['growth'] / 2**20:.0f} MiB at {H} rows")
    accumulator = K * H * W * 4  # one float32 (K, H, W) buffer: 512 MiB; a naive stitcher needs ~1.5x this
    assert full["same_array"]
    assert full["growth"] < 0.3 * accumulator, f"peak growth {full['growth'] / 2**20:.0f} MiB"
    # 8x the rows, no more memory: the band only depends on the width and the tile
    assert full["growth"] < short["growth"] + 0.05 * accumulator

    # the memmap holds the right values (a pointwise model: tiles change nothing)
    res = np.load(tmp_path / "out.npy", mmap_mode="r")
    src = np.load(tmp_path / "img.npy", mmap_mode="r")
    for y, x in [(0, 0), (4000, 5000), (H - 64, W - 64)]:
        patch = torch.from_numpy(np.ascontiguousarray(src[y : y + 64, x : x + 64].transpose(2, 0, 1))).float()[None] / 255
        np.testing.assert_allclose(res[:, y : y + 64, x : x + 64], two_class_pointwise(patch)[0].numpy(), atol=1e-5)
