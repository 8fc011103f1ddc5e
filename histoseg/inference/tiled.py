"""One tiled (sliding-window) inference function for every consumer.

``tiled_predict`` is pure: it takes an image and a ``predictor`` callable and returns the blended
prediction. Test steps, ``histoseg-predict``, the SR -> segmentation pipeline and whole-slide inference all
call it. Tile positions and the Gaussian importance map follow MONAI's ``sliding_window_inference``
(``mode="gaussian"``, ``sigma_scale=0.125``, i.e. sigma = tile/8 as nnU-Net), so both give the same
output for the same model and settings.

Memory: tiles are accumulated into a horizontal *band* buffer (tile height plus the rows one batch can
span) that is normalised and flushed to ``out`` as soon as no later tile can touch it. Peak memory is
therefore the tile batch plus ``O(width x tile height)``, independent of the image height; pass an
``np.memmap``/``zarr``/``h5py`` array as ``out`` (and a memmap as the image) to keep huge images off RAM.

Whole-slide images (``histoseg.wsi``) use three hooks of the same function: ``image`` may be any
:class:`TileSource` (an object that reads tiles on demand, e.g. from a pyramidal slide), ``region`` restricts
the work to a window of the full image's tile grid (so a slide is processed block by block with the output
of each block identical to a whole-image run), and ``read_batches`` lets a ``DataLoader`` read the tiles in
worker processes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Predictor = Callable[[torch.Tensor], torch.Tensor]
TTA_MODES = ("none", "flip", "d4")
TilePosition = tuple[int, int]
BatchReader = Callable[[list[list[TilePosition]]], Iterable[torch.Tensor]]


@runtime_checkable
class TileSource(Protocol):
    """An image read tile by tile: ``h``, ``w``, ``c`` (pixels, channels) and ``tile(y, x, th, tw)`` returning
    a ``(c, th, tw)`` float tensor in [0, 1] (uint8 tensors are scaled by ``tiled_predict``)."""

    h: int
    w: int
    c: int

    def tile(self, y: int, x: int, th: int, tw: int) -> torch.Tensor: ...


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis, MONAI-compatible: stride ``int(tile*(1-overlap))``, last tile flush."""
    if tile >= size:
        return [0]
    stride = max(int(tile * (1 - overlap)), 1)
    n = next(d for d in range(math.ceil(size / stride)) if d * stride + tile >= size) + 1
    return [min(i * stride, size - tile) for i in range(n)]


@lru_cache(maxsize=16)
def _gaussian_cached(shape: tuple[int, int], sigma_scale: float) -> torch.Tensor:
    axes = []
    for n in shape:
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float32)
        axes.append(torch.exp(x**2 / (-2 * (sigma_scale * n) ** 2)))
    g = axes[0][:, None] * axes[1][None, :]
    # no zero weights (division by the weight sum): same floor as MONAI
    return torch.clamp(g, min=max(float(g.min()), 1e-3))


def gaussian_weights(shape: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map for one tile (max 1, min floored at 1e-3)."""
    return _gaussian_cached((int(shape[0]), int(shape[1])), float(sigma_scale)).clone()


def _tta_transforms(mode: str) -> list[tuple[Callable, Callable]]:
    ident = (lambda t: t, lambda t: t)
    if mode in (None, "none"):
        return [ident]
    if mode == "flip":
        return [ident, (lambda t: t.flip(-1), lambda t: t.flip(-1)), (lambda t: t.flip(-2), lambda t: t.flip(-2))]
    if mode == "d4":
        out = []
        for k in range(4):
            out.append((lambda t, k=k: torch.rot90(t, k, (-2, -1)), lambda t, k=k: torch.rot90(t, -k, (-2, -1))))
            out.append(
                (
                    lambda t, k=k: torch.rot90(t.flip(-1), k, (-2, -1)),
                    lambda t, k=k: torch.rot90(t, -k, (-2, -1)).flip(-1),
                )
            )
        return out
    raise ValueError(f"unknown tta mode {mode!r}; choose one of {TTA_MODES}")


def with_tta(predictor: Predictor, mode: str | None) -> Predictor:
    """Wrap a predictor so it averages over flip (3) or dihedral (8) views of each batch."""
    tfs = _tta_transforms(mode or "none")
    if len(tfs) == 1:
        return predictor

    def run(x: torch.Tensor) -> torch.Tensor:
        acc = None
        for fwd, inv in tfs:
            y = inv(predictor(fwd(x))).float()
            acc = y if acc is None else acc + y
        return acc / len(tfs)

    return run


class _ImageSource:
    """Uniform tile access for CHW tensors and HWC numpy arrays (uint8 -> [0,1] float per tile)."""

    def __init__(self, image: np.ndarray | torch.Tensor, channels_last: bool | None):
        if isinstance(image, torch.Tensor):
            if image.ndim == 4:
                if image.shape[0] != 1:
                    raise ValueError(f"tiled_predict takes one image, got a batch of {image.shape[0]}")
                image = image[0]
            if image.ndim != 3:
                raise ValueError(f"expected a CxHxW tensor, got shape {tuple(image.shape)}")
            self.kind, self.arr = "torch", image
            self.c, self.h, self.w = image.shape
        else:
            arr = image
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3:
                raise ValueError(f"expected an HxWxC array, got shape {arr.shape}")
            hwc = channels_last if channels_last is not None else arr.shape[-1] <= 4
            self.kind, self.arr, self.hwc = "numpy", arr, hwc
            if hwc:
                self.h, self.w, self.c = arr.shape
            else:
                self.c, self.h, self.w = arr.shape

    def tile(self, y: int, x: int, th: int, tw: int) -> torch.Tensor:
        if self.kind == "torch":
            return self.arr[:, y : y + th, x : x + tw]
        a = self.arr[y : y + th, x : x + tw] if self.hwc else self.arr[:, y : y + th, x : x + tw]
        a = np.asarray(a)
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1) if self.hwc else a))
        if t.dtype == torch.uint8:
            return t.float().div_(255.0)
        return t.float()


def _pad_small(src: _ImageSource, th: int, tw: int, border: int, mode: str):
    """Pad (MONAI-style, symmetric) so the image is at least one tile, plus an optional border."""
    ph, pw = max(th - src.h, 0), max(tw - src.w, 0)
    pads = (border + pw // 2, border + pw - pw // 2, border + ph // 2, border + ph - ph // 2)  # l r t b
    if not any(pads):
        return src, (0, 0)
    full = src.tile(0, 0, src.h, src.w)[None]
    # reflect needs pad < size; fall back to replicate for tiny inputs
    m = mode
    if m == "reflect" and (max(pads[0], pads[1]) >= src.w or max(pads[2], pads[3]) >= src.h):
        m = "replicate"
    padded = F.pad(full, pads, mode=m) if m != "constant" else F.pad(full, pads, value=0.0)
    return _ImageSource(padded[0], None), (pads[2], pads[0])


def _as_source(image, channels_last: bool | None):
    if isinstance(image, (np.ndarray, torch.Tensor)) or not isinstance(image, TileSource):
        return _ImageSource(image, channels_last)
    return image


def _group_tiles(tiles: list[TilePosition], batch_size: int, row_index: dict[int, int], max_rows: int):
    """Consecutive batches of at most ``batch_size`` tiles spanning at most ``max_rows`` tile rows (so a batch
    always fits the band buffer, also when ``tile_filter`` leaves gaps between the tiles it keeps)."""
    groups: list[list[TilePosition]] = []
    for t in tiles:
        g = groups[-1] if groups else None
        if g is None or len(g) >= batch_size or row_index[t[0]] - row_index[g[0][0]] >= max_rows:
            groups.append([t])
        else:
            g.append(t)
    return groups


def _plan(h: int, w: int, th: int, tw: int, overlap: float, batch_size: int, region: tuple[int, int, int, int],
          tile_filter, offset: tuple[int, int]):
    """Tile grid of an ``h x w`` (padded) image, the rows / columns overlapping ``region``, the kept tiles in
    batches, and the tile rows one batch may span. ``tile_filter`` sees unpadded coordinates (``offset``)."""
    ry0, ry1, rx0, rx1 = region
    ys_all, xs_all = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    ys = [y for y in ys_all if y < ry1 and y + th > ry0]
    xs = [x for x in xs_all if x < rx1 and x + tw > rx0]
    tiles = [(y, x) for y in ys for x in xs]
    if tile_filter is not None:
        tiles = [(y, x) for (y, x) in tiles if tile_filter(y - offset[0], x - offset[1], th, tw)]
    rows_per_batch = math.ceil(batch_size / max(len(xs), 1)) + 1
    groups = _group_tiles(tiles, batch_size, {y: i for i, y in enumerate(ys)}, rows_per_batch)
    return ys_all, ys, xs, groups, rows_per_batch


def tile_batches(
    shape: Sequence[int],
    tile_shape: Sequence[int],
    overlap: float,
    batch_size: int,
    region: Sequence[int] | None = None,
    tile_filter: Callable[[int, int, int, int], bool] | None = None,
) -> list[list[TilePosition]]:
    """The batches of tile positions ``(y, x)`` that :func:`tiled_predict` visits, in order, for an image of
    ``shape`` (at least one tile; no ``border_pad``) with the same arguments: what a ``read_batches`` reader
    will be asked for, so a loader can be planned over many calls."""
    th, tw = int(tile_shape[0]), int(tile_shape[1])
    h, w = int(shape[0]), int(shape[1])
    if h < th or w < tw:
        raise ValueError(f"image {h}x{w} is smaller than one tile {th}x{tw}")
    y0, y1, x0, x1 = (0, h, 0, w) if region is None else (int(v) for v in region)
    return _plan(h, w, th, tw, overlap, batch_size, (y0, y1, x0, x1), tile_filter, (0, 0))[3]


@torch.no_grad()
def tiled_predict(
    image: np.ndarray | torch.Tensor,
    predictor: Predictor,
    tile_shape: Sequence[int] = (512, 512),
    overlap: float = 0.25,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    out_scale: int = 1,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    out: np.ndarray | None = None,
    out_dtype: np.dtype | None = None,
    tta: str | None = None,
    pad_mode: str = "reflect",
    border_pad: int = 0,
    autocast: str | None = None,
    channels_last: bool | None = None,
    progress: bool = False,
    tile_filter: Callable[[int, int, int, int], bool] | None = None,
    region: Sequence[int] | None = None,
    read_batches: BatchReader | None = None,
    empty_value: float = 0.0,
) -> torch.Tensor | np.ndarray:
    """Sliding-window prediction of one image of any size.

    Args:
        image: ``CxHxW`` (or ``1xCxHxW``) float tensor, ``HxWxC`` numpy array (uint8 is scaled to
            [0,1] per tile, so a uint8 memmap never becomes one big float array), or any :class:`TileSource`.
        predictor: maps a ``(B,C,th,tw)`` float tensor on ``device`` to ``(B,K,s*th,s*tw)``.
        tile_shape: ``(th, tw)`` input pixels per tile.
        overlap: fraction of a tile shared with its neighbour (stride = ``int(tile*(1-overlap))``).
        blend: ``gaussian`` (sigma = ``sigma_scale`` x tile) or ``constant``.
        out_scale: output/input size ratio (4 for an x4 SR generator).
        batch_size: tiles per forward pass.
        device: where tiles go (default: CUDA if available, else CPU). Accumulation stays on CPU.
        out: optional ``(K, s*H, s*W)`` array-like (numpy, memmap, zarr, h5py) to write into (only the
            ``region`` part is written); the return value is then ``out``. Default: a new float32 CPU tensor
            of the region's size.
        tta: ``none``, ``flip`` (3 views) or ``d4`` (8 views).
        pad_mode: how to pad images smaller than a tile (and ``border_pad``): reflect, replicate, constant.
        border_pad: extra context pixels padded on every side (0 = MONAI behaviour).
        autocast: ``bf16`` / ``fp16`` to run the predictor under autocast (outputs are accumulated in fp32).
        tile_filter: ``f(y, x, th, tw) -> bool`` to skip tiles (pixels no kept tile covers get ``empty_value``).
        region: ``(y0, y1, x0, x1)`` input pixels: predict only the tiles of the *whole image's* grid that
            overlap this window and write only the window (its values equal those of a whole-image run).
        read_batches: ``f(batches) -> iterable of (B, C, th, tw) tensors``, one per batch of tile positions
            ``[(y, x), ...]`` (image pixels) in the order given, e.g. a ``DataLoader`` whose workers read the
            tiles; default: ``image.tile`` in this process. Not combined with padding (images smaller than a
            tile, ``border_pad``).
        empty_value: value written where no tile contributed (filtered tiles).
    """
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    th, tw = (int(tile_shape[0]), int(tile_shape[1])) if isinstance(tile_shape, Sequence) else (int(tile_shape),) * 2
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src0 = _as_source(image, channels_last)
    src, (off_y, off_x) = _pad_small(src0, th, tw, border_pad, pad_mode)
    if read_batches is not None and src is not src0:
        raise ValueError(
            f"read_batches needs an image of at least one tile ({th}x{tw}) and border_pad=0; got "
            f"{src0.h}x{src0.w}, border_pad={border_pad}"
        )
    H0, W0, s = src0.h, src0.w, int(out_scale)
    y0, y1, x0, x1 = (0, H0, 0, W0) if region is None else (int(v) for v in region)
    if not (0 <= y0 < y1 <= H0 and 0 <= x0 < x1 <= W0):
        raise ValueError(f"region {tuple(region)} is not a non-empty window of the {H0}x{W0} image")
    ry0, ry1, rx0, rx1 = y0 + off_y, y1 + off_y, x0 + off_x, x1 + off_x  # the region, padded coordinates
    ys_all, ys, xs, groups, rows_per_batch = _plan(src.h, src.w, th, tw, overlap, batch_size, (ry0, ry1, rx0, rx1),
                                                   tile_filter, (off_y, off_x))
    tiles = [t for g in groups for t in g]

    oth, otw = th * s, tw * s
    bx0, BW = rx0 * s, (rx1 - rx0) * s  # band columns: the region's, in padded output coordinates
    weight = gaussian_weights((oth, otw), sigma_scale) if blend == "gaussian" else torch.ones(oth, otw)
    stride_h = (ys_all[1] - ys_all[0]) if len(ys_all) > 1 else th
    band_h = min(src.h, th + rows_per_batch * stride_h) * s
    acc: torch.Tensor | None = None  # (K, band_h, BW), allocated on first output (K unknown before)
    wsum = torch.zeros(band_h, BW)
    top = ys[0] * s  # padded-output row where the band starts

    result = out
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "", None)
    # output rows / columns of the region inside `result`: `out` is image-sized, a new tensor region-sized
    res_y, res_x = (y0 * s, x0 * s) if out is not None else (0, 0)

    def store(rows: slice, vals: torch.Tensor) -> None:
        """Write ``vals`` (K, n, BW) at output rows ``rows`` (image coordinates, region columns)."""
        nonlocal result
        r = slice(rows.start - y0 * s + res_y, rows.stop - y0 * s + res_y)
        if isinstance(result, torch.Tensor):
            result[:, r, res_x : res_x + BW] = vals
        else:
            v = vals.numpy()
            result[:, r, res_x : res_x + BW] = v.astype(out_dtype) if out_dtype is not None else v

    def allocate(k: int) -> None:
        nonlocal result
        if result is None:
            result = torch.full((k, (y1 - y0) * s, (x1 - x0) * s), float(empty_value), dtype=torch.float32)

    def row_chunks(lo: int, hi: int):
        step = max(1, (1 << 20) // max(BW, 1))  # row chunks: temporaries stay ~1M values, not band-sized
        for a in range(lo, hi, step):
            yield a, min(a + step, hi)

    def write(r0: int, r1: int) -> None:
        """Normalise band rows [r0, r1) (padded output coords) and store the region's part."""
        lo, hi = max(r0, ry0 * s), min(r1, ry1 * s)
        if hi <= lo:
            return
        allocate(acc.shape[0])
        for a, b in row_chunks(lo - top, hi - top):
            w = wsum[a:b]
            vals = acc[:, a:b] / w.clamp_min(1e-12)
            vals[:, w == 0] = empty_value
            store(slice(a + top - off_y * s, b + top - off_y * s), vals)

    def write_empty(r0: int, r1: int, k: int) -> None:
        """Rows [r0, r1) (padded output coords) that no tile touches."""
        lo, hi = max(r0, ry0 * s), min(r1, ry1 * s)
        if hi <= lo or (result is not out and result is not None):  # a new tensor starts as empty_value
            return
        allocate(k)
        for a, b in row_chunks(lo, hi):
            store(slice(a - off_y * s, b - off_y * s), torch.full((k, b - a, BW), float(empty_value)))

    def shift_up(buf: torch.Tensor, k: int) -> None:
        """``buf[..., :n-k, :] = buf[..., k:, :]``, zero the last ``k`` rows: copied in disjoint blocks of
        ``k`` rows, so no band-sized temporary is allocated."""
        n = buf.shape[-2]
        for r in range(0, n - k, k):
            m = min(k, n - k - r)
            buf[..., r : r + m, :] = buf[..., r + k : r + k + m, :]
        buf[..., max(n - k, 0) :, :] = 0

    def flush_until(row: int) -> None:
        """Rows above ``row`` (padded output coords) are final: write them and slide the band."""
        nonlocal top
        if row <= top:
            return
        if acc is None:  # nothing predicted yet: these rows are empty
            if out is not None:
                write_empty(top, row, out.shape[0])
            top = row
            return
        write(top, min(row, top + band_h))
        if row > top + band_h:
            write_empty(top + band_h, row, acc.shape[0])
        k = min(row - top, band_h)
        shift_up(acc, k)
        shift_up(wsum, k)
        top = row

    if read_batches is None:
        batch_iter: Iterable[torch.Tensor] = (torch.stack([src.tile(y, x, th, tw) for (y, x) in g]) for g in groups)
    else:
        batch_iter = read_batches([[(y - off_y, x - off_x) for (y, x) in g] for g in groups])
    bar = tqdm(total=len(tiles), desc="tiles", disable=not progress, leave=False)
    n_batches = 0
    for group, x in zip(groups, batch_iter):
        n_batches += 1
        if x.shape[0] != len(group):
            raise ValueError(f"read_batches gave a batch of {x.shape[0]} tiles for {len(group)} positions")
        flush_until(group[0][0] * s)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = x.to(device, non_blocking=True)
        if amp is not None:
            with torch.autocast(device_type=device.type, dtype=amp):
                pred = predictor(x)
        else:
            pred = predictor(x)
        pred = pred.float().cpu()
        if pred.shape[-2:] != (oth, otw):
            raise ValueError(
                f"predictor returned tiles of {tuple(pred.shape[-2:])}, expected {(oth, otw)} "
                f"(tile {th}x{tw}, out_scale {s})"
            )
        if acc is None:
            acc = torch.zeros((pred.shape[1], band_h, BW))
        for (y, x0_), p in zip(group, pred):
            r = y * s - top
            c_lo, c_hi = max(x0_ * s, bx0), min(x0_ * s + otw, bx0 + BW)  # the tile's columns inside the region
            tc = slice(c_lo - x0_ * s, c_hi - x0_ * s)
            acc[:, r : r + oth, c_lo - bx0 : c_hi - bx0].addcmul_(p[:, :, tc], weight[:, tc])
            wsum[r : r + oth, c_lo - bx0 : c_hi - bx0] += weight[:, tc]
        bar.update(len(group))
    bar.close()
    if n_batches != len(groups):
        raise ValueError(f"read_batches gave {n_batches} batches for {len(groups)} batches of tile positions")
    if acc is None:  # every tile filtered out
        if out is None:
            raise ValueError("tile_filter rejected every tile and no `out` array was given")
        write_empty(top, ry1 * s, out.shape[0])
        return out
    flush_until(ry1 * s)
    return result
