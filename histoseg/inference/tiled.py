"""One tiled (sliding-window) inference function for every consumer.

``tiled_predict`` is pure: it takes an image and a ``predictor`` callable and returns the blended
prediction. Test steps, ``histoseg-predict``, the SR -> segmentation pipeline and whole-slide inference all
call it. Tile positions and the Gaussian importance map follow MONAI's ``sliding_window_inference``
(``mode="gaussian"``, ``sigma_scale=0.125``, i.e. sigma = tile/8 as nnU-Net), so both give the same
output for the same model and settings.

Speed: on CUDA the band is accumulated on the device (``accum_device``), so only finished rows cross to the
host, and ``batch_size="auto"`` sizes tile batches from the free device memory (:func:`auto_batch_size`).

Memory: tiles are accumulated into a horizontal *band* buffer (tile height plus the rows one batch can
span) that is normalised and flushed to ``out`` as soon as no later tile can touch it; images wider than
``stripe_width`` are processed in vertical stripes, each with its own band. Peak memory is therefore the tile
batch plus ``O(min(width, stripe_width) x tile height)``, independent of the image size; pass an
``np.memmap``/``zarr``/``h5py`` array as ``out`` (and a memmap as the image) to keep huge images off RAM.

Whole-slide images (``histoseg.wsi``) use three hooks of the same function: ``image`` may be any
:class:`TileSource` (an object that reads tiles on demand, e.g. from a pyramidal slide), ``region`` restricts
the work to a window of the full image's tile grid (so a slide is processed block by block with the output
of each block identical to a whole-image run), and ``read_batches`` lets a ``DataLoader`` read the tiles in
worker processes; :func:`tile_batches` tells such a loader in advance which tiles will be asked for.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from histoseg.utils.vectors import turn_offsets

Predictor = Callable[[torch.Tensor], torch.Tensor]
TTA_MODES = ("none", "flip", "d4")
TilePosition = tuple[int, int]
BatchReader = Callable[[list[list[TilePosition]]], Iterable[torch.Tensor]]
STRIPE_WIDTH = 8192  # default ``stripe_width``: wider images are processed in vertical stripes


@runtime_checkable
class TileSource(Protocol):
    """An image read tile by tile: ``h``, ``w``, ``c`` (pixels, channels) and ``tile(y, x, th, tw)`` returning
    a ``(c, th, tw)`` tensor: uint8 (scaled to [0, 1] by ``tiled_predict`` after the device transfer) or float."""

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


def _tta_views(mode: str | None) -> list[tuple[bool, bool, int]]:
    """The test-time views of ``mode`` as ``(hflip, vflip, quarter turns)``: flips first, then ``torch.rot90``
    on ``(H, W)`` (the order of :func:`histoseg.aug.gpu.dihedral`)."""
    if mode in (None, "none"):
        return [(False, False, 0)]
    if mode == "flip":
        return [(False, False, 0), (True, False, 0), (False, True, 0)]
    if mode == "d4":
        return [(hflip, False, k) for k in range(4) for hflip in (False, True)]
    raise ValueError(f"unknown tta mode {mode!r}; choose one of {TTA_MODES}")


def _view(t: torch.Tensor, hflip: bool, vflip: bool, k: int) -> torch.Tensor:
    t = t.flip(-1) if hflip else t
    t = t.flip(-2) if vflip else t
    return torch.rot90(t, k, (-2, -1)) if k % 4 else t


def _unview(y: torch.Tensor, hflip: bool, vflip: bool, k: int, vector: tuple[int, int] | None) -> torch.Tensor:
    """Undo :func:`_view` on a ``(B, K, H, W)`` output: move the pixels back and, for the ``vector`` channel pair
    (HoVer-Net ``(h, v)`` offsets), turn the vectors back too. On the viewed image a model that is right predicts
    the transformed field: ``h`` negated by a horizontal flip, ``v`` by a vertical one, and each quarter turn maps
    ``(h, v)`` to ``(v, -h)`` (:func:`histoseg.utils.vectors.turn_offsets`); the inverse is ``4 - k`` quarter turns, then
    the same negations. Without this, averaging the views cancels the offsets instead of agreeing on them."""
    y = torch.rot90(y, -k, (-2, -1)) if k % 4 else y
    y = y.flip(-2) if vflip else y
    y = y.flip(-1) if hflip else y
    if vector is None:
        return y
    hi, vi = vector
    h, v = turn_offsets(y[:, hi], y[:, vi], 4 - k)
    h = -h if hflip else h
    v = -v if vflip else v
    y = y.clone()
    y[:, hi], y[:, vi] = h, v
    return y


def with_tta(predictor: Predictor, mode: str | None, vector_channels: tuple[int, int] | None = None) -> Predictor:
    """Wrap a predictor so it averages over flip (3) or dihedral (8) views of each batch.

    ``vector_channels``: the output channels ``(h, v)`` of a 2-D offset field (a HoVer-Net ``hv`` head), whose
    components turn with the view; default: the predictor's own ``vector_channels`` attribute
    (:class:`~histoseg.models.modules.segmentation.SegmentationTask` sets it from ``model.heads``)."""
    views = _tta_views(mode or "none")
    if len(views) == 1:
        return predictor
    if vector_channels is None:
        vector_channels = getattr(predictor, "vector_channels", None)

    def run(x: torch.Tensor) -> torch.Tensor:
        acc = None
        for view in views:
            y = _unview(predictor(_view(x, *view)).float(), *view, vector_channels)
            acc = y if acc is None else acc + y
        return acc / len(views)

    return run


def to_float(t: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; other dtypes -> float32 unchanged in value."""
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


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
        """CHW tile in the source dtype (uint8 stays uint8: batches are converted after the device transfer)."""
        if self.kind == "torch":
            return self.arr[:, y : y + th, x : x + tw]
        a = self.arr[y : y + th, x : x + tw] if self.hwc else self.arr[:, y : y + th, x : x + tw]
        a = np.asarray(a)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1) if self.hwc else a))


def _pad_small(src: _ImageSource, th: int, tw: int, border: int, mode: str):
    """Pad (MONAI-style, symmetric) so the image is at least one tile, plus an optional border."""
    ph, pw = max(th - src.h, 0), max(tw - src.w, 0)
    pads = (border + pw // 2, border + pw - pw // 2, border + ph // 2, border + ph - ph // 2)  # l r t b
    if not any(pads):
        return src, (0, 0)
    full = to_float(src.tile(0, 0, src.h, src.w))[None]
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


def stripe_plan(
    xs: list[int], width: int, tile: int, stripe_width: int | None, start: int = 0
) -> list[tuple[list[int], int, int]]:
    """Vertical stripes ``(tile columns, own0, own1)`` over the columns ``[start, width)``: each stripe predicts
    every tile that overlaps its own columns ``[own0, own1)`` (so those are complete, exactly as in one pass)
    and writes only them. Tiles on a stripe border are predicted by both stripes (about ``tile / stripe_width``
    extra work)."""
    if stripe_width is None or width - start <= stripe_width or len(xs) == 1:
        return [(list(xs), start, width)]
    if stripe_width < tile:
        raise ValueError(f"stripe_width ({stripe_width}) must be at least the tile width ({tile})")
    plan = []
    for a in range(start, width, int(stripe_width)):
        b = min(a + int(stripe_width), width)
        plan.append(([x for x in xs if x + tile > a and x < b], a, b))
    return plan


@dataclass
class _Stripe:
    """One band pass: tile columns ``xs``, written columns ``[own0, own1)``, the kept tiles in batches and the
    band height (input pixels), all in padded input coordinates."""

    xs: list[int]
    own0: int
    own1: int
    groups: list[list[TilePosition]]
    band_h: int


def _plan(h: int, w: int, th: int, tw: int, overlap: float, batch_size: int, region: Sequence[int],
          tile_filter, offset: tuple[int, int], stripe_width: int | None) -> tuple[list[int], list[_Stripe]]:
    """The tile rows overlapping ``region`` (of the whole ``h x w`` (padded) image's tile grid) and the stripes
    with their batches: up to ``batch_size`` tiles in row-major order, cut early where a batch would reach
    below the band (possible when a ``tile_filter`` leaves rows nearly empty). ``tile_filter`` sees unpadded
    coordinates (``offset``)."""
    ry0, ry1, rx0, rx1 = region
    ys_all, xs_all = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    ys = [y for y in ys_all if y < ry1 and y + th > ry0]
    xs = [x for x in xs_all if x < rx1 and x + tw > rx0]
    stride_h = (ys_all[1] - ys_all[0]) if len(ys_all) > 1 else th
    stripes = []
    for sx, own0, own1 in stripe_plan(xs, rx1, tw, stripe_width, rx0):
        rows_per_batch = math.ceil((batch_size - 1) / max(len(sx), 1)) + 1  # tile rows one batch can touch
        band_h = min(h, th + (rows_per_batch - 1) * stride_h)
        groups: list[list[TilePosition]] = []
        for y in ys:
            for x in sx:
                if tile_filter is not None and not tile_filter(y - offset[0], x - offset[1], th, tw):
                    continue
                g = groups[-1] if groups else None
                if g is None or len(g) == batch_size or y - g[0][0] + th > band_h:
                    groups.append([(y, x)])
                else:
                    g.append((y, x))
        stripes.append(_Stripe(sx, own0, own1, groups, band_h))
    return ys, stripes


def _check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of tiles or 'auto', got {batch_size!r}")
    return int(batch_size)


def tile_batches(
    shape: Sequence[int],
    tile_shape: Sequence[int],
    overlap: float,
    batch_size: int,
    region: Sequence[int] | None = None,
    tile_filter: Callable[[int, int, int, int], bool] | None = None,
    stripe_width: int | None = STRIPE_WIDTH,
) -> list[list[TilePosition]]:
    """The batches of tile positions ``(y, x)`` that :func:`tiled_predict` visits, in order, for an image of
    ``shape`` (at least one tile; no ``border_pad``) with the same arguments (``batch_size`` an integer): what a
    ``read_batches`` reader will be asked for, so a loader can be planned over many calls."""
    th, tw = int(tile_shape[0]), int(tile_shape[1])
    h, w = int(shape[0]), int(shape[1])
    if h < th or w < tw:
        raise ValueError(f"image {h}x{w} is smaller than one tile {th}x{tw}")
    region = (0, h, 0, w) if region is None else tuple(int(v) for v in region)
    _, stripes = _plan(h, w, th, tw, overlap, _check_batch_size(batch_size), region, tile_filter, (0, 0),
                       stripe_width)
    return [g for st in stripes for g in st.groups]


AUTO_CPU_BATCH = 8  # batch_size="auto" on CPU: larger tile batches do not raise CPU throughput, only memory


def batch_from_memory(free_bytes: int, peak_1: int, peak_2: int, memory_fraction: float = 0.5, max_batch: int = 64) -> int:
    """Tile batch size that fits ``memory_fraction`` of ``free_bytes``, from the peak memory of a forward pass
    of 1 and of 2 tiles (per-tile cost = the difference, fixed cost = the rest); between 1 and ``max_batch``."""
    per_tile = max(int(peak_2) - int(peak_1), 1)
    fixed = max(int(peak_1) - per_tile, 0)
    n = int((free_bytes * memory_fraction - fixed) // per_tile)
    return max(1, min(int(max_batch), n))


@torch.no_grad()
def auto_batch_size(
    predictor: Predictor,
    tile_shape: Sequence[int],
    device: str | torch.device,
    in_channels: int = 3,
    autocast: str | None = None,
    memory_fraction: float = 0.5,
    max_batch: int = 64,
) -> int:
    """Tiles per forward pass for ``device``: on CUDA measured (two probe passes of 1 and 2 tiles, then
    :func:`batch_from_memory` on the free memory); elsewhere :data:`AUTO_CPU_BATCH`."""
    device = torch.device(device)
    if device.type != "cuda":
        return AUTO_CPU_BATCH
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "", None)
    peaks = []
    for b in (1, 2):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = torch.zeros(b, in_channels, int(tile_shape[0]), int(tile_shape[1]), device=device)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            predictor(x)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del x
    free, _ = torch.cuda.mem_get_info(device)
    return batch_from_memory(free, peaks[0], peaks[1], memory_fraction, max_batch)


@torch.no_grad()
def tiled_predict(
    image: np.ndarray | torch.Tensor | TileSource,
    predictor: Predictor,
    tile_shape: Sequence[int] = (512, 512),
    overlap: float = 0.25,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    out_scale: int = 1,
    batch_size: int | str = 8,
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
    accum_device: str | torch.device | None = None,
    stripe_width: int | None = STRIPE_WIDTH,
    region: Sequence[int] | None = None,
    read_batches: BatchReader | None = None,
    empty_value: float = 0.0,
) -> torch.Tensor | np.ndarray:
    """Sliding-window prediction of one image of any size.

    Args:
        image: ``CxHxW`` (or ``1xCxHxW``) float tensor, ``HxWxC`` numpy array (uint8 is scaled to [0,1] per
            tile, so a uint8 memmap never becomes one big float array), or any :class:`TileSource`.
        predictor: maps a ``(B,C,th,tw)`` float tensor on ``device`` to ``(B,K,s*th,s*tw)``.
        tile_shape: ``(th, tw)`` input pixels per tile.
        overlap: fraction of a tile shared with its neighbour (stride = ``int(tile*(1-overlap))``).
        blend: ``gaussian`` (sigma = ``sigma_scale`` x tile) or ``constant``.
        out_scale: output/input size ratio (4 for an x4 SR generator).
        batch_size: tiles per forward pass, or ``"auto"`` (:func:`auto_batch_size`: from free memory on CUDA,
            :data:`AUTO_CPU_BATCH` elsewhere).
        device: where tiles go (default: CUDA if available, else CPU).
        out: optional ``(K, s*H, s*W)`` array-like (numpy, memmap, zarr, h5py) to write into; every pixel of
            the ``region`` (default: the image) is written. The return value is then ``out``. Default: a new
            float32 CPU tensor of the region's size.
        tta: ``none``, ``flip`` (3 views) or ``d4`` (8 views).
        pad_mode: how to pad images smaller than a tile (and ``border_pad``): reflect, replicate, constant.
        border_pad: extra context pixels padded on every side (0 = MONAI behaviour).
        autocast: ``bf16`` / ``fp16`` to run the predictor under autocast (outputs are accumulated in fp32).
        tile_filter: ``f(y, x, th, tw) -> bool`` to skip tiles (pixels no kept tile covers get ``empty_value``).
        accum_device: where the band buffer is accumulated (default: ``device`` when it is CUDA, else CPU);
            finished rows are copied to the host as they complete.
        stripe_width: images (regions) wider than this (input pixels) are processed in vertical stripes of this
            width, each with its own band (:func:`stripe_plan`; identical output), so memory does not grow with
            the width either; ``None`` = one stripe.
        region: ``(y0, y1, x0, x1)`` input pixels: predict only the tiles of the *whole image's* grid that
            overlap this window and write only the window (its values equal those of a whole-image run).
        read_batches: ``f(batches) -> iterable of (B, C, th, tw) tensors`` (uint8 or float), one per batch of
            tile positions ``[(y, x), ...]`` (image pixels) in the order given (:func:`tile_batches`), e.g. a
            ``DataLoader`` whose workers read the tiles; default: ``image.tile`` in this process. Not combined
            with padding (images smaller than a tile, ``border_pad``).
        empty_value: value written where no tile contributed (filtered tiles).
    """
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    th, tw = (int(tile_shape[0]), int(tile_shape[1])) if isinstance(tile_shape, Sequence) else (int(tile_shape),) * 2
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accum = torch.device(accum_device) if accum_device is not None else (device if device.type == "cuda" else torch.device("cpu"))
    src0 = _as_source(image, channels_last)
    src, (off_y, off_x) = _pad_small(src0, th, tw, border_pad, pad_mode)
    if read_batches is not None and src is not src0:
        raise ValueError(
            f"read_batches needs an image of at least one tile ({th}x{tw}) and border_pad=0; got "
            f"{src0.h}x{src0.w}, border_pad={border_pad}"
        )
    if batch_size == "auto":
        batch_size = auto_batch_size(predictor, (th, tw), device, src.c, autocast)
    batch_size = _check_batch_size(batch_size)
    H0, W0, s = src0.h, src0.w, int(out_scale)
    y0, y1, x0, x1 = (0, H0, 0, W0) if region is None else (int(v) for v in region)
    if not (0 <= y0 < y1 <= H0 and 0 <= x0 < x1 <= W0):
        raise ValueError(f"region {tuple(region)} is not a non-empty window of the {H0}x{W0} image")
    ry0, ry1 = y0 + off_y, y1 + off_y  # the region in padded coordinates
    ys, stripes = _plan(src.h, src.w, th, tw, overlap, batch_size, (ry0, ry1, x0 + off_x, x1 + off_x), tile_filter,
                        (off_y, off_x), stripe_width)
    n_tiles = sum(len(g) for st in stripes for g in st.groups)

    oth, otw = th * s, tw * s
    weight = gaussian_weights((oth, otw), sigma_scale) if blend == "gaussian" else torch.ones(oth, otw)
    weight = weight.to(accum)
    result = out
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "", None)
    # `out` is image-sized, a new result region-sized: output row / column of image pixel 0 in `result`
    res_y, res_x = (0, 0) if out is not None else (y0 * s, x0 * s)

    if read_batches is None:
        batch_iter: Iterator[torch.Tensor] = (
            torch.stack([src.tile(y, x, th, tw) for (y, x) in g]) for st in stripes for g in st.groups
        )
    else:
        batch_iter = iter(read_batches([[(y - off_y, x - off_x) for (y, x) in g] for st in stripes for g in st.groups]))
    bar = tqdm(total=n_tiles, desc="tiles", disable=not progress, leave=False)
    n_read = 0

    def next_batch(n: int) -> torch.Tensor:
        nonlocal n_read
        try:
            x = next(batch_iter)
        except StopIteration:
            n_groups = sum(len(st.groups) for st in stripes)
            raise ValueError(f"read_batches gave {n_read} batches for {n_groups} batches of tile positions") from None
        n_read += 1
        if x.shape[0] != n:
            raise ValueError(f"read_batches gave a batch of {x.shape[0]} tiles for {n} positions")
        return x

    def run_stripe(st: _Stripe) -> None:
        """Predict the stripe's tiles and write output columns ``[own0, own1)`` (padded input coords) of the
        region's rows, which those tiles cover completely."""
        nonlocal result
        sx, c0 = st.xs, st.own0 * s
        BW, band_h = (st.own1 - st.own0) * s, st.band_h * s  # the band: the stripe's own columns
        out_cols = slice(c0 - off_x * s - res_x, c0 - off_x * s - res_x + BW)

        def clip(x0_: int) -> tuple[slice, slice]:
            """A tile's columns inside the band: (band columns, tile columns)."""
            lo, hi = max(x0_ * s, c0), min(x0_ * s + otw, c0 + BW)
            return slice(lo - c0, hi - c0), slice(lo - x0_ * s, hi - x0_ * s)

        acc: torch.Tensor | None = None  # (K, band_h, BW), allocated on first output (K unknown before)
        wsum = torch.zeros(band_h, BW, device=accum)
        row_weight = None  # without a tile filter every row has tiles at all ``sx``: their summed weights, once
        if tile_filter is None:
            row_weight = torch.zeros(oth, BW, device=accum)
            for x0_ in sx:
                bc, tc = clip(x0_)
                row_weight[:, bc] += weight[:, tc]
        top = ys[0] * s  # padded-output row where the band starts

        def store(r0: int, vals: torch.Tensor) -> None:
            """``vals`` (K, n, BW) at padded-output rows ``r0 ...``, the stripe's columns."""
            nonlocal result
            if result is None:
                result = torch.full((vals.shape[0], (y1 - y0) * s, (x1 - x0) * s), float(empty_value))
            rows = slice(r0 - off_y * s - res_y, r0 - off_y * s - res_y + vals.shape[1])
            if isinstance(result, torch.Tensor):
                result[:, rows, out_cols] = vals
            else:
                v = vals.numpy()
                result[:, rows, out_cols] = v.astype(out_dtype) if out_dtype is not None else v

        def row_chunks(lo: int, hi: int) -> Iterator[tuple[int, int]]:
            step = max(1, (1 << 20) // max(BW, 1))  # row chunks: temporaries stay ~1M values, not band-sized
            for a in range(lo, hi, step):
                yield a, min(a + step, hi)

        def write(r0: int, r1: int) -> None:
            """Normalise band rows [r0, r1) (padded output coords) and store the region's part."""
            lo, hi = max(r0, ry0 * s), min(r1, ry1 * s)
            for a, b in row_chunks(lo - top, hi - top):
                w = wsum[a:b]
                vals = acc[:, a:b] / w.clamp_min(1e-12)
                vals[:, w == 0] = empty_value
                store(a + top, vals.cpu())

        def write_empty(r0: int, r1: int, k: int) -> None:
            """Rows [r0, r1) (padded output coords) that no tile touches: only ``out`` needs them (a new result
            starts as ``empty_value``)."""
            if result is not out or result is None:
                return
            for a, b in row_chunks(max(r0, ry0 * s), min(r1, ry1 * s)):
                store(a, torch.full((k, b - a, BW), float(empty_value)))

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
            if acc is None:  # nothing predicted yet (a tile_filter skipped the first rows): these rows are empty
                if out is not None:
                    write_empty(top, row, out.shape[0])
                top = row
                return
            write(top, min(row, top + band_h))
            write_empty(top + band_h, row, acc.shape[0])
            k = min(row - top, band_h)
            shift_up(acc, k)
            shift_up(wsum, k)
            top = row

        for group in st.groups:
            flush_until(group[0][0] * s)
            # uint8 tiles cross to the device as uint8 (4x fewer bytes) and become float there
            x = to_float(next_batch(len(group)).to(device, non_blocking=True))
            if amp is not None:
                with torch.autocast(device_type=device.type, dtype=amp):
                    pred = predictor(x)
            else:
                pred = predictor(x)
            pred = pred.float().to(accum)
            if pred.shape[-2:] != (oth, otw):
                raise ValueError(
                    f"predictor returned tiles of {tuple(pred.shape[-2:])}, expected {(oth, otw)} "
                    f"(tile {th}x{tw}, out_scale {s})"
                )
            if acc is None:
                acc = torch.zeros((pred.shape[1], band_h, BW), device=accum)
            for (y, x0_), p in zip(group, pred):
                r = y * s - top
                bc, tc = clip(x0_)
                acc[:, r : r + oth, bc].addcmul_(p[:, :, tc], weight[:, tc])
                if row_weight is None:
                    wsum[r : r + oth, bc] += weight[:, tc]
                elif x0_ == sx[0]:  # the first tile of a row adds the weights of the whole row at once
                    wsum[r : r + oth] += row_weight
            bar.update(len(group))
        if acc is None:  # every tile of the stripe filtered out
            if out is not None:
                write_empty(top, ry1 * s, out.shape[0])
            return
        flush_until(ry1 * s)

    for st in stripes:
        run_stripe(st)
    bar.close()
    if result is None:  # every tile filtered out
        raise ValueError("tile_filter rejected every tile and no `out` array was given")
    return result
