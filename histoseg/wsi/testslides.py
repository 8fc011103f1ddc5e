"""Slides with known masks, for tests, benchmarks and the whole-slide vs per-image check (no slide ships with
the data kit).

* :func:`synthetic_slide`: tiles of the embedded generator (:func:`~histoseg.data.readers.synthetic.generate_tile`)
  on a blank glass-like background; the exact instance map is returned with it.
* :class:`Mosaic` / :func:`monuseg_mosaic`: real tissue, MoNuSeg images laid out in a grid with blank gaps and
  margins, rendered tile by tile at any pyramid level, so a 32k x 32k slide is written without holding it in
  memory; its mask is known from the MoNuSeg masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from histoseg.wsi.tiff import array_tile_fn, downsample_levels, level_shapes, write_pyramid

BACKGROUND = (242, 242, 240)  # glass: bright, almost no saturation


@dataclass
class SyntheticSlide:
    path: Path
    image: np.ndarray           # level-0 RGB
    instances: np.ndarray       # level-0 exact instance ids (0 = background or blank margin)
    tissue_boxes: list[tuple[int, int, int, int]]  # (y0, y1, x0, x1) level-0 boxes holding the generated tiles
    mpp: float | None


def synthetic_slide(
    path: str | Path,
    grid: tuple[int, int] = (2, 3),
    tile_shape: tuple[int, int] = (384, 384),
    margin: int = 320,
    gap: int = 0,
    seed: int = 0,
    mpp: float | None = 0.5,
    kind: str = "tif",
    compression: str = "zlib",
    tile: int = 256,
) -> SyntheticSlide:
    """A pyramidal TIFF of ``grid`` generator tiles (``gap`` px apart) inside blank ``margin`` px borders."""
    from histoseg.data.readers.synthetic import generate_tile

    th, tw = tile_shape
    H = 2 * margin + grid[0] * th + (grid[0] - 1) * gap
    W = 2 * margin + grid[1] * tw + (grid[1] - 1) * gap
    rng = np.random.default_rng(seed)
    image = np.clip(np.array(BACKGROUND, np.float32) + rng.normal(0, 2.0, (H, W, 3)), 0, 255).astype(np.uint8)
    inst = np.zeros((H, W), np.int32)
    boxes, next_id = [], 0
    for i in range(grid[0]):
        for j in range(grid[1]):
            y, x = margin + i * (th + gap), margin + j * (tw + gap)
            img, ins = generate_tile(seed, i * grid[1] + j, (th, tw))
            image[y : y + th, x : x + tw] = img
            ins = ins.astype(np.int32)
            inst[y : y + th, x : x + tw] = np.where(ins > 0, ins + next_id, 0)
            next_id += int(ins.max())
            boxes.append((y, y + th, x, x + tw))
    shapes = level_shapes((H, W), tile)
    write_pyramid(path, (H, W), array_tile_fn(downsample_levels(image, shapes)), 3, mpp, kind, tile, compression,
                  levels=shapes)
    return SyntheticSlide(Path(path), image, inst, boxes, mpp)


@dataclass
class Mosaic:
    """Images (``HxWx3`` uint8, all the same size) in a ``rows x cols`` grid, ``gap`` px apart, inside
    ``margin`` px borders, on a blank background; cell ``k`` holds image ``k % len(images)``.

    ``render(d, y, x, h, w)`` gives the pixels of the level with downsample ``d`` (level coordinates), each
    image downsampled once per level; ``render_mask`` gives the level-0 masks of the cells.
    """

    images: list[np.ndarray]
    masks: list[np.ndarray] | None
    rows: int
    cols: int
    gap: int = 64
    margin: int = 256
    shape: tuple[int, int] | None = None  # level-0 (H, W); default: just large enough
    names: list[str] = field(default_factory=list)
    count: int | None = None  # cells filled, row by row (default: all rows x cols; the rest stay blank)

    def __post_init__(self):
        self.cell = tuple(int(v) for v in self.images[0].shape[:2])
        if any(im.shape[:2] != self.cell for im in self.images):
            raise ValueError("mosaic images must all have the same size")
        ch, cw = self.cell
        need = (2 * self.margin + self.rows * ch + (self.rows - 1) * self.gap,
                2 * self.margin + self.cols * cw + (self.cols - 1) * self.gap)
        self.shape = tuple(self.shape) if self.shape is not None else need
        if self.shape[0] < need[0] or self.shape[1] < need[1]:
            raise ValueError(f"mosaic of {self.rows}x{self.cols} cells needs {need}, got shape {self.shape}")
        self.count = self.rows * self.cols if self.count is None else int(self.count)
        self._levels: dict[float, list[np.ndarray]] = {}

    @classmethod
    def fill(cls, images, masks, shape: tuple[int, int], gap: int = 64, margin: int = 256, names=None) -> Mosaic:
        """As many cells as fit in ``shape`` (images repeated)."""
        ch, cw = images[0].shape[:2]
        rows = max((shape[0] - 2 * margin + gap) // (ch + gap), 1)
        cols = max((shape[1] - 2 * margin + gap) // (cw + gap), 1)
        return cls(list(images), None if masks is None else list(masks), int(rows), int(cols), gap, margin,
                   tuple(shape), list(names or []))

    def boxes(self) -> list[tuple[int, int, int, int, int]]:
        """``(y0, y1, x0, x1, image_index)`` of every cell, level 0."""
        ch, cw = self.cell
        out = []
        for k in range(self.count):
            i, j = divmod(k, self.cols)
            y, x = self.margin + i * (ch + self.gap), self.margin + j * (cw + self.gap)
            out.append((y, y + ch, x, x + cw, k % len(self.images)))
        return out

    def _images_at(self, d: float) -> list[np.ndarray]:
        if d not in self._levels:
            ch, cw = self.cell
            size = (max(int(round(cw / d)), 1), max(int(round(ch / d)), 1))
            self._levels[d] = [im if d == 1 else cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in self.images]
        return self._levels[d]

    def render(self, d: float, y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        out[:] = BACKGROUND
        ims = self._images_at(d)
        for y0, _, x0, _, k in self.boxes():
            im = ims[k]
            cy, cx = int(math.floor(y0 / d)), int(math.floor(x0 / d))
            a0, a1 = max(cy, y), min(cy + im.shape[0], y + h)
            b0, b1 = max(cx, x), min(cx + im.shape[1], x + w)
            if a1 > a0 and b1 > b0:
                out[a0 - y : a1 - y, b0 - x : b1 - x] = im[a0 - cy : a1 - cy, b0 - cx : b1 - cx]
        return out

    def render_mask(self, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None) -> np.ndarray:
        if self.masks is None:
            raise ValueError("this mosaic has no masks")
        h = self.shape[0] - y if h is None else h
        w = self.shape[1] - x if w is None else w
        out = np.zeros((h, w), np.uint8)
        for y0, y1, x0, x1, k in self.boxes():
            a0, a1, b0, b1 = max(y0, y), min(y1, y + h), max(x0, x), min(x1, x + w)
            if a1 > a0 and b1 > b0:
                out[a0 - y : a1 - y, b0 - x : b1 - x] = self.masks[k][a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
        return out

    def write(self, path: str | Path, mpp: float | None, kind: str = "tif", compression: str = "zlib",
              tile: int = 256) -> Path:
        shapes = level_shapes(self.shape, tile)  # level l: ceil(H / 2**l) x ceil(W / 2**l)

        def fn(level, y, x, h, w):
            return self.render(float(2**level), y, x, h, w)

        return write_pyramid(path, self.shape, fn, 3, mpp, kind, tile, compression, levels=shapes)


def monuseg_mosaic(
    root: str | Path,
    split: str = "test",
    ids: list[str] | None = None,
    cols: int | None = None,
    shape: tuple[int, int] | None = None,
    gap: int = 64,
    margin: int = 256,
) -> Mosaic:
    """A :class:`Mosaic` of MoNuSeg ``split`` images (with their masks) read from the data kit at ``root``
    (``<data>/monuseg``): all of them (or ``ids``) once in ``cols`` columns, or repeated to fill ``shape``."""
    from histoseg.data.readers.monuseg import MoNuSegReader

    reader = MoNuSegReader(root)
    ids = list(ids or reader.official_split()[split])
    samples = [reader.read(i) for i in ids]
    images, masks = [s.image for s in samples], [(s.mask > 0).astype(np.uint8) for s in samples]
    if shape is not None:
        return Mosaic.fill(images, masks, shape, gap, margin, ids)
    cols = cols or int(math.ceil(math.sqrt(len(ids))))
    rows = int(math.ceil(len(ids) / cols))
    return Mosaic(images, masks, rows, cols, gap, margin, names=ids, count=len(ids))  # each image once
