"""Whole-slide image reading: pyramidal ``.svs`` / ``.tif`` / ``.ome.tif`` through tiffslide (default) and
the OpenSlide formats (``.mrxs``, ``.ndpi``, ...) through openslide-python (optional extra ``wsi``).

Conventions: a region's position is the ``(y, x)`` **level-0** pixel of its top-left corner; shapes are
``(h, w)`` pixels of the level (or resolution) read; arrays are ``HxWx3`` uint8 RGB. Pixels outside the slide
read as 0 (black). ``mpp`` (microns per pixel) is the slide's level-0 pixel size from its metadata (Aperio
``MPP``, TIFF resolution tags, OME ``PhysicalSizeX``), or the ``mpp=`` override; a slide with neither raises
:class:`SlideError` when its pixel size is needed.
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from histoseg.data.io import DataError

BACKENDS = ("auto", "tiffslide", "openslide")
# always slides (never plain images); the first three are not TIFF-based and need OpenSlide
OPENSLIDE_ONLY_EXTS = (".mrxs", ".vms", ".vmu")
SLIDE_EXTS = (".svs", ".ndpi", ".scn", ".bif", ".svslide", *OPENSLIDE_ONLY_EXTS)
TIFF_EXTS = (".tif", ".tiff")


class SlideError(DataError):
    """A slide that cannot be opened or read, or lacks needed metadata; the message names the file."""


def is_slide(path: str | Path, min_slide_side: int = 10000) -> bool:
    """Whether ``path`` goes to the whole-slide path rather than the plain-image path.

    * ``.svs .ndpi .scn .bif .svslide .mrxs .vms .vmu``: always a slide;
    * ``.tif`` / ``.tiff`` (``.ome.tif`` included): a slide if its first image series is a pyramid (more
      than one resolution level, or reduced resolutions declared as SubIFDs of the first page, which also
      catches a truncated pyramid), or it is a single tiled level of at least ``min_slide_side`` pixels on
      its longer side; any other TIFF is a plain image. A TIFF whose header cannot be read is treated as a
      plain image, whose reader then reports it;
    * everything else: a plain image.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SLIDE_EXTS:
        return True
    if suffix not in TIFF_EXTS:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(str(p)) as tf:
            if tf.pages.first.subifds:
                return True
            series = tf.series[0]
            if len(series.levels) > 1:
                return True
            page = series.pages[0] if series.pages else tf.pages.first
            h, w = (int(v) for v in series.shape[:2]) if series.axes.startswith("YX") else page.shape[:2]
            return bool(page.is_tiled) and max(h, w) >= int(min_slide_side)
    except Exception:
        return False


def _ome_mpp(description: str | None) -> float | None:
    """Level-0 ``PhysicalSizeX`` of the first OME ``Pixels`` element, in microns (None if absent)."""
    if not description or "<OME" not in description:
        return None
    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
            size = float(el.get("PhysicalSizeX"))
            unit = el.get("PhysicalSizeXUnit", "µm")
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
            return size * factor if factor is not None and size > 0 else None
    return None


class _TiffSlideBackend:
    name = "tiffslide"

    def __init__(self, path: Path):
        import tiffslide

        self._s = tiffslide.TiffSlide(str(path))
        props = self._s.properties
        self.level_shapes = tuple((int(h), int(w)) for (w, h) in self._s.level_dimensions)
        mpp = props.get("tiffslide.mpp-x")
        if not mpp:
            tf = self._s.ts_tifffile
            mpp = _ome_mpp(tf.pages.first.description if tf.is_ome else None)
        self.mpp = float(mpp) if mpp else None
        self.axes = props["tiffslide.series-axes"]

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        from tiffslide._zarr import get_zarr_selection

        sel = (slice(y, y + h), slice(x, x + w))
        if self.axes == "YXS":
            arr = get_zarr_selection(self._s.zarr_group, level, (*sel, slice(None)))
        elif self.axes == "CYX":
            arr = get_zarr_selection(self._s.zarr_group, level, (slice(None), *sel)).transpose(1, 2, 0)
        elif self.axes == "YX":
            arr = get_zarr_selection(self._s.zarr_group, level, sel)[..., None]
        else:
            raise ValueError(f"unsupported axes {self.axes!r}")
        return np.asarray(arr)

    def close(self) -> None:
        self._s.close()


class _OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: Path):
        try:
            import openslide
        except ImportError:
            raise SlideError(
                f"{path}: reading this slide needs OpenSlide, which is not installed; install the optional extra: "
                "pip install 'histoseg[wsi]' (openslide-python + openslide-bin)"
            ) from None
        self._s = openslide.OpenSlide(str(path))
        self.level_shapes = tuple((int(h), int(w)) for (w, h) in self._s.level_dimensions)
        self._ds = tuple(float(d) for d in self._s.level_downsamples)
        mpp = self._s.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        ds = self._ds[level]
        img = self._s.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return np.asarray(img)[..., :3]  # RGBA (transparent outside the slide: black after dropping alpha)

    def close(self) -> None:
        self._s.close()


class Slide:
    """A pyramidal whole-slide image.

    Args:
        path: the slide file.
        backend: ``auto`` (tiffslide for TIFF-based formats, OpenSlide for ``.mrxs`` / ``.vms`` / ``.vmu``),
            ``tiffslide`` or ``openslide``.
        mpp: level-0 microns per pixel overriding the metadata (``None``: use the metadata).

    Attributes: ``level_shapes`` (``(h, w)`` per level), ``level_downsamples`` (level-0 pixels per level
    pixel), ``shape`` (level 0), ``mpp`` (raises :class:`SlideError` if unknown).
    """

    def __init__(self, path: str | Path, backend: str = "auto", mpp: float | None = None):
        self.path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"unknown slide backend {backend!r}; choose one of {BACKENDS}")
        if not self.path.is_file():
            raise SlideError(f"{self.path}: slide file not found")
        if self.path.stat().st_size == 0:
            raise SlideError(f"{self.path}: slide file is empty")
        if backend == "auto":
            backend = "openslide" if self.path.suffix.lower() in OPENSLIDE_ONLY_EXTS else "tiffslide"
        try:
            self._b = _OpenSlideBackend(self.path) if backend == "openslide" else _TiffSlideBackend(self.path)
        except SlideError:
            raise
        except Exception as e:  # the libraries raise many types (TiffFileError, OpenSlideError, ValueError ...)
            raise SlideError(f"{self.path}: cannot open slide with {backend} ({type(e).__name__}: {_first_line(e)})") from None
        if mpp is not None and not float(mpp) > 0:
            raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp}")
        self._mpp_override = float(mpp) if mpp is not None else None
        self.backend = backend
        self.level_shapes = self._b.level_shapes
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = tuple((h0 / h + w0 / w) / 2.0 for (h, w) in self.level_shapes)

    # ------------------------------------------------------------------ metadata
    @property
    def shape(self) -> tuple[int, int]:
        return self.level_shapes[0]

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    @property
    def metadata_mpp(self) -> float | None:
        return self._b.mpp

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel: the override if given, else the metadata's."""
        if self._mpp_override is not None:
            return self._mpp_override
        if self._b.mpp is None:
            raise SlideError(
                f"{self.path}: the slide's metadata has no pixel size (no Aperio MPP, TIFF resolution or OME "
                "PhysicalSizeX); pass its level-0 microns per pixel, e.g. wsi.mpp=0.25"
            )
        return self._b.mpp

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (within ``tolerance``, relative)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + tolerance):
                best = i if d >= self.level_downsamples[best] else best
        return best

    # ------------------------------------------------------------------ reading
    def read_level(self, level: int, y: int, x: int, shape: tuple[int, int]) -> np.ndarray:
        """``(h, w)`` pixels of ``level`` at **level** coordinates ``(y, x)``; outside the level reads black."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (the slide has {self.level_count} levels)")
        h, w = int(shape[0]), int(shape[1])
        lh, lw = self.level_shapes[level]
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, lh), min(x + w, lw)
        out = np.zeros((h, w, 3), np.uint8)
        if y1 <= y0 or x1 <= x0:
            return out
        try:
            arr = self._b.read(level, y0, x0, y1 - y0, x1 - x0)
        except Exception as e:
            raise SlideError(
                f"{self.path}: cannot read level {level} at (y={y0}, x={x0}), {y1 - y0}x{x1 - x0} pixels "
                f"({type(e).__name__}: {_first_line(e)}); the file may be truncated or corrupt"
            ) from None
        out[y0 - y : y1 - y, x0 - x : x1 - x] = _to_rgb8(arr)
        return out

    def read_region(self, y: int, x: int, shape: tuple[int, int], level: int = 0) -> np.ndarray:
        """``(h, w)`` pixels of ``level`` whose top-left corner is the level-0 pixel ``(y, x)``."""
        d = self.level_downsamples[level]
        return self.read_level(level, int(math.floor(y / d)), int(math.floor(x / d)), shape)

    def read_scaled(self, y: float, x: float, shape: tuple[int, int], scale: float, level: int | None = None,
                    tolerance: float = 1e-6) -> np.ndarray:
        """``(h, w)`` output pixels of ``scale`` level-0 pixels each, from the level-0 position ``(y, x)``.

        Read from ``level`` (default: the coarsest level not coarser than ``scale``), resized with area
        averaging (downsampling) or bilinear interpolation (upsampling) unless the level matches ``scale``.
        """
        h, w = int(shape[0]), int(shape[1])
        level = self.best_level(scale) if level is None else level
        d = self.level_downsamples[level]
        r = scale / d  # level pixels per output pixel
        ly, lx = y / d, x / d
        if abs(r - 1) <= tolerance:
            return self.read_level(level, int(round(ly)), int(round(lx)), (h, w))
        iy0, ix0 = int(round(ly)), int(round(lx))
        ih, iw = max(int(round(ly + h * r)) - iy0, 1), max(int(round(lx + w * r)) - ix0, 1)
        box = self.read_level(level, iy0, ix0, (ih, iw))
        return cv2.resize(box, (w, h), interpolation=cv2.INTER_AREA if r > 1 else cv2.INTER_LINEAR)

    def read_region_mpp(self, y: float, x: float, shape: tuple[int, int], mpp: float) -> np.ndarray:
        """``(h, w)`` pixels at a resolution of ``mpp`` microns per pixel, top-left at level-0 ``(y, x)``."""
        return self.read_scaled(y, x, shape, float(mpp) / self.mpp)

    def read_overview(self, scale: float, max_strip_pixels: int = 1 << 24) -> np.ndarray:
        """The whole slide at ``scale`` level-0 pixels per output pixel (``ceil(H0 / scale)`` rows), read in
        row strips from the best level, so memory holds the output and one strip, never level 0."""
        h0, w0 = self.shape
        oh, ow = max(int(math.ceil(h0 / scale)), 1), max(int(math.ceil(w0 / scale)), 1)
        level = self.best_level(scale)
        r = scale / self.level_downsamples[level]
        rows = max(1, int(max_strip_pixels // max(ow * r * r, 1)))
        out = np.zeros((oh, ow, 3), np.uint8)
        for a in range(0, oh, rows):
            b = min(a + rows, oh)
            out[a:b] = self.read_scaled(a * scale, 0.0, (b - a, ow), scale, level)
        return out

    def close(self) -> None:
        self._b.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = self._mpp_override or self._b.mpp
        return f"Slide({str(self.path)!r}, backend={self.backend}, levels={list(self.level_shapes)}, mpp={mpp})"


def open_slide(path: str | Path, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a slide (see :class:`Slide`); errors name the file."""
    return Slide(path, backend, mpp)


def _to_rgb8(arr: np.ndarray) -> np.ndarray:
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        from histoseg.data.io import _to_uint8

        arr = _to_uint8(arr)
    return arr


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return re.split(r"\n", text, maxsplit=1)[0] if text else type(e).__name__
