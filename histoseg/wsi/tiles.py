"""The slide at the model's resolution as a tile source, and the tile batches DataLoader workers read.

Kept free of heavy imports (no Lightning): DataLoader workers are started with ``spawn`` and import this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histoseg.wsi.slide import Slide


@dataclass(frozen=True)
class ModelGrid:
    """The pixel grid the model sees: ``shape`` model pixels of ``scale`` level-0 pixels each (``mpp`` microns),
    read from pyramid ``level``; ``exact`` when that level *is* the grid (no resampling)."""

    shape: tuple[int, int]
    scale: float
    mpp: float
    level: int
    exact: bool


def model_grid(slide: Slide, model_mpp: float, tolerance: float = 0.05) -> ModelGrid:
    """The slide at the model's resolution. A level whose mpp is within ``tolerance`` (relative) of
    ``model_mpp`` is used as is; otherwise tiles are resampled from the finest level not coarser than it."""
    if not model_mpp > 0:
        raise ValueError(f"model mpp must be positive, got {model_mpp}")
    target = float(model_mpp) / slide.mpp  # level-0 pixels per model pixel
    for lv, d in enumerate(slide.level_downsamples):
        if abs(d - target) <= tolerance * target:
            return ModelGrid(slide.level_shapes[lv], d, slide.mpp * d, lv, True)
    h0, w0 = slide.shape
    shape = (max(int(round(h0 / target)), 1), max(int(round(w0 / target)), 1))
    return ModelGrid(shape, target, float(model_mpp), slide.best_level(target), False)


class SlideTileSource:
    """A :class:`~histoseg.inference.tiled.TileSource` over a slide at a :class:`ModelGrid`.

    Picklable: the slide handle is opened lazily in each process (DataLoader workers get their own)."""

    def __init__(self, path: str | Path, grid: ModelGrid, backend: str = "auto", mpp: float | None = None):
        self.path, self.grid, self.backend, self.mpp = str(path), grid, backend, mpp
        self.h, self.w = grid.shape
        self.c = 3
        self._slide: Slide | None = None
        self._pid: int | None = None
        self.reads = 0  # tiles read by this process (tests count background reads with it)

    def __getstate__(self):
        return {**self.__dict__, "_slide": None, "_pid": None}

    @property
    def slide(self) -> Slide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = Slide(self.path, self.backend, self.mpp)
            self._pid = os.getpid()
        return self._slide

    def read(self, y: int, x: int, th: int, tw: int) -> np.ndarray:
        """``(th, tw, 3)`` uint8 model pixels with top-left model pixel ``(y, x)``."""
        self.reads += 1
        g = self.grid
        if g.exact:
            return self.slide.read_level(g.level, y, x, (th, tw))
        return self.slide.read_scaled(y * g.scale, x * g.scale, (th, tw), g.scale, g.level)

    def tile(self, y: int, x: int, th: int, tw: int) -> torch.Tensor:
        """``(3, th, tw)`` uint8 (``tiled_predict`` scales it to [0, 1] on the device)."""
        return torch.from_numpy(self.read(y, x, th, tw).transpose(2, 0, 1).copy())


class _Batches(torch.utils.data.Dataset):
    """Item ``i``: ``(positions (B, 2), tiles (B, 3, th, tw) uint8)`` of batch ``i`` (uint8: a quarter of the
    float traffic between processes; ``tiled_predict`` scales it)."""

    def __init__(self, source: SlideTileSource, batches: list[list[tuple[int, int]]], tile_shape: tuple[int, int]):
        self.source, self.batches, self.tile_shape = source, batches, tile_shape

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        th, tw = self.tile_shape
        arr = np.stack([self.source.read(y, x, th, tw) for (y, x) in self.batches[i]])
        return torch.tensor(self.batches[i], dtype=torch.int64), torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


