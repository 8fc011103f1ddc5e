"""Janowczyk & Madabhushi (JPI 2016) epithelium set, in the published ``epi.tgz`` layout.

Layout (the archive extracts flat)::

    <root>/<id>.tif              H&E image (1000 x 1000, ER+ breast cancer, one image per patient)
    <root>/masks/<id>_mask.png   0 / 255 epithelium mask

Classes: 0 background (stroma, lumen), 1 epithelium. Split by patient: the group of ``<patient>_<n>`` is
``<patient>`` (the upstream set has one image per patient, so this equals a split by image).

**A folder holding a single image** (the data kit ships 1 of the 42) cannot give a train / validation
split by patient. The reader then cuts that image into a ``single_image_grid`` of spatially disjoint
regions (default 2 x 2 quadrants, ids ``<id>@r<row>c<col>``), each its own split group, and logs a
warning: validation then measures generalisation to unseen *regions* of the *same* patient, which is
optimistic compared with the real patient-level split. Set ``single_image_grid: null`` to refuse instead.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from histoseg.data.io import DataError, read_image
from histoseg.data.readers.base import Reader, register_reader
from histoseg.data.readers.common import binarise, check_same_shape, list_files, require_same_shape
from histoseg.data.sample import Sample

log = logging.getLogger(__name__)

_REGION = re.compile(r"^(?P<id>.+)@r(?P<r>\d+)c(?P<c>\d+)$")


@register_reader("epithelium")
class EpitheliumReader(Reader):
    class_names = ("background", "epithelium")
    mpp = None  # the paper gives 20x magnification, not a calibrated microns-per-pixel
    downloads = [
        {
            "url": "https://andrewjanowczyk.com/wp-static/epi.tgz",
            # as published in torch-em (constantinpape/torch-em, torch_em/data/datasets/histopathology/janowczyk.py);
            # not re-verified here (no network)
            "sha256": "5ac91a48de7d4f158f72cfc239b9a465849166397580b95d8f695095f54bcf6d",
            "filename": "epi.tgz",
            "strip": "auto",
            "expect": ["*.tif", "masks/*_mask.png"],
        }
    ]

    def __init__(
        self,
        root: str | Path | None = None,
        single_image_grid: tuple[int, int] | list[int] | None = (2, 2),
        mask_threshold: int = 128,
        downloads: list[dict] | None = None,
    ):
        super().__init__(root)
        self.single_image_grid = tuple(int(g) for g in single_image_grid) if single_image_grid else None
        if self.single_image_grid is not None and (len(self.single_image_grid) != 2 or min(self.single_image_grid) < 1):
            raise ValueError(f"single_image_grid must be [rows, cols] >= 1, got {single_image_grid}")
        self.mask_threshold = int(mask_threshold)
        if downloads is not None:
            self.downloads = list(downloads)
        self._warned = False

    # ------------------------------------------------------------------ files
    def _images(self) -> dict[str, Path]:
        root = self.require_root()
        imgs = list_files(root, (".tif", ".tiff"))
        if not imgs:
            raise DataError(f"{root}: no <id>.tif images found (expected the epi.tgz layout: <id>.tif + masks/<id>_mask.png)")
        return imgs

    def _mask_path(self, image_id: str) -> Path:
        return self.require_root() / "masks" / f"{image_id}_mask.png"

    def _split_id(self, case_id: str) -> tuple[str, tuple[int, int] | None]:
        m = _REGION.match(case_id)
        return (m["id"], (int(m["r"]), int(m["c"]))) if m else (case_id, None)

    # ------------------------------------------------------------------ Reader API
    def case_ids(self) -> list[str]:
        imgs = self._images()
        if len(imgs) == 1 and self.single_image_grid:
            (only,) = imgs
            rows, cols = self.single_image_grid
            if not self._warned:
                log.warning(
                    "epithelium: %s holds a single image (%s); no patient-level split is possible, so it is cut into "
                    "%dx%d spatially disjoint regions that are split like cases. Validation then scores unseen regions "
                    "of the SAME patient (optimistic); use the full 42-image set for patient-level numbers.",
                    self.root, only, rows, cols,
                )
                self._warned = True
            return [f"{only}@r{r}c{c}" for r in range(rows) for c in range(cols)]
        return sorted(imgs)

    def group_of(self, case_id: str) -> str:
        image_id, region = self._split_id(case_id)
        if region is not None:
            return case_id  # single-image mode: each region is its own group (see module docstring)
        return image_id.split("_")[0]  # <patient>_<n>

    def source_files(self, case_id: str) -> list[Path]:
        image_id, _ = self._split_id(case_id)
        imgs = self._images()
        if image_id not in imgs:
            raise DataError(f"{self.root}: no image for case id {case_id!r}")
        return [imgs[image_id], self._mask_path(image_id)]

    def check(self, case_ids: list[str]) -> None:
        seen = set()
        for cid in case_ids:
            image_id, _ = self._split_id(cid)
            if image_id in seen:
                continue
            seen.add(image_id)
            img, mask = self.source_files(cid)
            if not mask.is_file():
                raise DataError(f"{mask}: mask for image {img.name} not found (expected masks/<id>_mask.png)")
            check_same_shape(img, mask)

    def read(self, case_id: str) -> Sample:
        image_id, region = self._split_id(case_id)
        img_path, mask_path = self.source_files(case_id)
        image = read_image(img_path, "rgb")
        mask = binarise(read_image(mask_path, "gray"), self.mask_threshold)
        require_same_shape(image, mask, mask_path, img_path)
        if region is not None:
            rows, cols = self.single_image_grid or (1, 1)
            h, w = mask.shape
            ys = np.linspace(0, h, rows + 1).round().astype(int)
            xs = np.linspace(0, w, cols + 1).round().astype(int)
            r, c = region
            if r >= rows or c >= cols:
                raise DataError(f"{img_path}: region {case_id!r} is outside the {rows}x{cols} grid")
            sl = (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
            image, mask = np.ascontiguousarray(image[sl]), np.ascontiguousarray(mask[sl])
        return Sample(
            image=image, mask=mask, case_id=case_id, group=self.group_of(case_id), source=str(img_path),
            meta={"region": region},
        )
