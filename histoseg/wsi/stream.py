"""Streaming inference over a slide's tissue tiles into an on-disk zarr array at the model's resolution.

The slide is processed in blocks of ``block_shape`` model pixels (aligned to the zarr chunks). Each block is
one :func:`histoseg.inference.tiled_predict` call with ``region=`` the block, on the *whole slide's* tile grid
(so the values equal a whole-slide run; tiles straddling a block border are predicted by both blocks),
``tile_filter=`` the tissue mask, ``out=`` the zarr array and ``read_batches=`` a :class:`TileLoader`: the
batches of all blocks are planned first (:func:`~histoseg.inference.tiled.tile_batches`, the same planning
``tiled_predict`` uses) and read by one ``DataLoader`` whose workers live for the whole slide, each with its
own slide handle. Memory is the band buffer of one block plus the prefetched tile batches: it does not
depend on the slide's size.

Resume: after a block is written, its index is added to ``progress.json`` (atomic rename) together with a
fingerprint of the slide, the model and the settings. A killed run leaves at most one block half written;
the next run recomputes only the blocks not listed (every pixel of a block is rewritten), so its output
equals that of an uninterrupted run. A changed fingerprint starts over.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from histoseg.data.io import atomic_write_text
from histoseg.inference.tiled import auto_batch_size, tile_batches, tiled_predict
from histoseg.utils.logging import get_logger
from histoseg.wsi.slide import SlideError
from histoseg.wsi.tiles import SlideTileSource, _Batches

log = get_logger(__name__)


class TileLoader:
    """The tiles of many :func:`tiled_predict` calls, planned in advance and read by one ``DataLoader`` whose
    ``num_workers`` processes live for the whole slide (each opens its own slide handle; ``spawn``, so no
    thread state of this process, e.g. OpenCV's or OpenMP's pools, is inherited). ``reader()`` is the
    ``read_batches`` of one call: it hands out the next batches and checks they are the positions asked for.
    ``num_workers=0`` reads in this process."""

    def __init__(self, source: SlideTileSource, batches: list[list[tuple[int, int]]], tile_shape: tuple[int, int],
                 num_workers: int = 2, prefetch_factor: int = 4):
        ds = _Batches(source, batches, tuple(tile_shape))
        if num_workers == 0:
            self._it = (ds[i] for i in range(len(ds)))
        else:
            dl = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                             prefetch_factor=prefetch_factor, multiprocessing_context="spawn")
            self._it = iter(dl)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)
        except SlideError as e:  # re-raised from a worker with its traceback: keep the message's last line
            raise SlideError(_last_line(str(e))) from None

    def reader(self) -> Callable[[list[list[tuple[int, int]]]], Iterator[torch.Tensor]]:
        def read(batches: list[list[tuple[int, int]]]) -> Iterator[torch.Tensor]:
            for want in batches:
                pos, tiles = self._next()
                if pos.tolist() != [list(t) for t in want]:
                    raise RuntimeError(f"tile loader out of step: got {pos.tolist()[:2]}..., expected {want[:2]}...")
                yield tiles

        return read

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # now, not when the iterator is collected
        if shutdown is not None:
            shutdown()


def _last_line(msg: str) -> str:
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else msg
    return last.split("SlideError: ", 1)[-1]


# ---------------------------------------------------------------------- blocks and progress
def blocks(shape: tuple[int, int], block_shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the blocks covering ``shape``, row by row."""
    H, W = shape
    bh, bw = int(block_shape[0]), int(block_shape[1])
    return [(y, min(y + bh, H), x, min(x + bw, W)) for y in range(0, H, bh) for x in range(0, W, bw)]


class Progress:
    """``progress.json``: the fingerprint of the run and the finished blocks of each stage (atomic writes)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint
        self.state: dict = {"fingerprint": fingerprint, "stages": {}}
        self.resumed = False
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            if old.get("fingerprint") == fingerprint:
                self.state, self.resumed = old, True

    def done(self, stage: str) -> set[int]:
        return set(self.state["stages"].get(stage, {}).get("blocks", []))

    def info(self, stage: str) -> dict:
        return self.state["stages"].get(stage, {}).get("info", {})

    def mark(self, stage: str, block: int, **info) -> None:
        st = self.state["stages"].setdefault(stage, {"blocks": [], "info": {}})
        st["blocks"].append(int(block))
        st["info"].update(info)
        self.save()

    def set_info(self, stage: str, **info) -> None:
        self.state["stages"].setdefault(stage, {"blocks": [], "info": {}})["info"].update(info)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state))


def open_logits(path: Path, channels: int, shape: tuple[int, int], chunk_shape: tuple[int, int], dtype: str,
                fresh: bool):
    """The ``(K, H, W)`` logits zarr (fill NaN = not predicted; chunks never written stay absent, so background
    costs no disk); recreated when ``fresh``. Blosc-LZ4 with byte shuffle: logits hardly compress, and it is
    several times faster than zstd."""
    import zarr
    from zarr.codecs import BloscCodec

    if not fresh and (path / "zarr.json").is_file():
        arr = zarr.open_array(str(path), mode="r+")
        if tuple(arr.shape) == (channels, *shape):
            return arr
    return zarr.create_array(str(path), shape=(channels, *shape), chunks=(channels, *chunk_shape), dtype=dtype,
                             fill_value=float("nan"), overwrite=True,
                             compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")])


class ChunkRowWriter:
    """``out=`` for one :func:`tiled_predict` region of a chunked ``(K, H, W)`` array: the rows, which arrive
    top to bottom, are collected until a whole row of chunks is complete and then written at once, so each
    chunk is encoded once instead of read, decoded and re-encoded at every band flush. Holds one chunk row of
    the region (``K x chunk height x region width`` values). Call :meth:`flush` after the region."""

    def __init__(self, arr, region: tuple[int, int, int, int]):
        self.arr, self.shape, self.dtype = arr, tuple(arr.shape), arr.dtype
        self.y0, self.y1, self.x0, self.x1 = (int(v) for v in region)
        self.ch = int(arr.chunks[1])
        self.top: int | None = None  # first row of the buffered chunk row
        self.buf: np.ndarray | None = None

    def _start(self, row: int) -> None:
        self.top = max(row // self.ch * self.ch, self.y0)
        end = min((row // self.ch + 1) * self.ch, self.y1)
        self.buf = np.full((self.shape[0], end - self.top, self.x1 - self.x0), np.nan, self.dtype)

    def __setitem__(self, idx, value) -> None:
        _, rows, cols = idx
        if (cols.start, cols.stop) != (self.x0, self.x1):
            raise ValueError(f"ChunkRowWriter holds columns {self.x0}:{self.x1}, got {cols.start}:{cols.stop}")
        value = np.asarray(value)
        r = rows.start
        while r < rows.stop:
            if self.top is None or not self.top <= r < self.top + self.buf.shape[1]:
                self.flush()
                self._start(r)
            n = min(rows.stop, self.top + self.buf.shape[1]) - r
            self.buf[:, r - self.top : r - self.top + n] = value[:, r - rows.start : r - rows.start + n]
            r += n

    def flush(self) -> None:
        if self.buf is not None:
            self.arr[:, self.top : self.top + self.buf.shape[1], self.x0 : self.x1] = self.buf
        self.top, self.buf = None, None


def predict_blocks(
    source: SlideTileSource,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    logits,
    progress: Progress,
    inference: dict,
    tile_filter: Callable[[int, int, int, int], bool] | None,
    block_shape: tuple[int, int],
    device: torch.device,
    num_workers: int = 2,
    prefetch_factor: int = 4,
    show_progress: bool = True,
) -> dict:
    """Run every block not yet in ``progress`` (stage ``infer``); blocks without tissue tiles are only marked.
    Returns the number of tiles predicted and of blocks run."""
    from tqdm.auto import tqdm

    th, tw = (int(v) for v in inference["tile_shape"])
    overlap, bs = float(inference["overlap"]), inference["batch_size"]
    if bs == "auto":  # resolved once here: the loader plans the batches of every block in advance
        bs = auto_batch_size(predictor, (th, tw), device, source.c, inference.get("autocast"))
    if source.h < th or source.w < tw:
        raise SlideError(f"{source.path}: {source.h}x{source.w} model pixels is smaller than one tile ({th}x{tw})")
    done = progress.done("infer")
    plans = [(i, b, tile_batches(source.grid.shape, (th, tw), overlap, bs, b, tile_filter))
             for i, b in enumerate(blocks(source.grid.shape, block_shape)) if i not in done]
    n_tiles = sum(len(g) for _, _, gs in plans for g in gs)
    loader = TileLoader(source, [g for _, _, gs in plans for g in gs], (th, tw), num_workers, prefetch_factor)
    bar = tqdm(total=n_tiles, desc="tiles", unit="tile", disable=not show_progress, leave=False)
    try:
        for i, region, groups in plans:
            if groups:
                writer = ChunkRowWriter(logits, region)
                tiled_predict(source, predictor, (th, tw), overlap, blend=inference.get("blend", "gaussian"),
                              batch_size=bs, device=device, out=writer, autocast=inference.get("autocast"),
                              tile_filter=tile_filter, region=region, read_batches=loader.reader(),
                              empty_value=float("nan"))
                writer.flush()
            progress.mark("infer", i)
            bar.update(sum(len(g) for g in groups))
    finally:
        bar.close()
        loader.close()
    return {"tiles_predicted": n_tiles, "blocks_run": len(plans)}


def tissue_tile_count(shape: tuple[int, int], inference: dict, tile_filter) -> tuple[int, int]:
    """``(tiles kept, tiles in the grid)`` of the whole-slide tile grid."""
    from histoseg.inference.tiled import tile_starts

    th, tw = (int(v) for v in inference["tile_shape"])
    ys, xs = tile_starts(shape[0], th, inference["overlap"]), tile_starts(shape[1], tw, inference["overlap"])
    kept = sum(1 for y in ys for x in xs if tile_filter is None or tile_filter(y, x, th, tw))
    return kept, len(ys) * len(xs)


def fingerprint(**parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_id(path: str | Path) -> dict:
    """Path, size and modification time: cheap identity of a large file (a slide, a checkpoint)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def ceil_to(v: int, m: int) -> int:
    return int(math.ceil(v / m) * m)
