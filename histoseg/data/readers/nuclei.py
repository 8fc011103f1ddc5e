"""Kaggle Data Science Bowl 2018 nuclei (BBBC038v1 stage 1 train), in two layouts.

* the nuclei seed's copy (the data kit)::

      <root>/raw/<id>.jpg   image (fluorescence, brightfield or H&E; 256x256 up to 1388x1040)
      <root>/gt/<id>.jpg    binary mask, JPEG-compressed: nucleus where the value is >= ``mask_threshold`` (128)

  Instances come from connected components (4-connectivity) of the mask; nuclei that touch in the binary
  mask are one instance.

* the official BBBC038 ``stage1_train.zip`` (extracted under ``<root>/stage1_train``)::

      <root>/stage1_train/<id>/images/<id>.png
      <root>/stage1_train/<id>/masks/*.png      one PNG per nucleus (exact instances)

Classes: background / nucleus. Each image is its own split group (the set publishes no patient ids); the
default split is seeded 80 / 10 / 10 (``split.strategy=random``), ``split.fold=k`` gives k-fold over the
non-test images. The set mixes dark-background fluorescence with light-background brightfield / H&E
(:func:`modality`, the reader's ``stratum_of``): ``split.stratify_val=true`` draws the validation images per
modality.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from histoseg.data.io import DataError, read_image
from histoseg.data.readers.base import Reader, register_reader
from histoseg.data.readers.common import (
    IMAGE_EXTS,
    binarise,
    check_same_shape,
    connected_instances,
    list_files,
    require_same_shape,
)
from histoseg.data.sample import Sample


def modality(rgb: np.ndarray) -> str:
    """``"fluorescence"`` for a dark grey-scale image (mean intensity < 100 and mean per-pixel saturation,
    max - min over RGB, < 10), else ``"brightfield_he"`` (light background: brightfield or H&E)."""
    rgb = np.asarray(rgb, np.float64)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    dark_grey = rgb.mean() < 100 and (rgb.max(-1) - rgb.min(-1)).mean() < 10
    return "fluorescence" if dark_grey else "brightfield_he"


@register_reader("nuclei")
class DSB2018Reader(Reader):
    class_names = ("background", "nucleus")
    mpp = None  # mixed microscopes and magnifications
    has_instances = True
    downloads = [
        {
            "url": "https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip",
            "sha256": None,  # not published by the BBBC; layout is verified instead
            "filename": "stage1_train.zip",
            "extract_to": "stage1_train",
            "expect": ["stage1_train/*/images/*.png", "stage1_train/*/masks/*.png"],
        }
    ]

    def __init__(self, root: str | Path | None = None, mask_threshold: int = 128, downloads: list[dict] | None = None):
        super().__init__(root)
        self.mask_threshold = int(mask_threshold)
        if downloads is not None:
            self.downloads = list(downloads)
        self._idx: dict[str, tuple[Path, Path]] | None = None
        self._modality: dict[str, str] = {}

    # ------------------------------------------------------------------ layouts
    def _layout(self) -> str:
        root = self.require_root()
        if (root / "raw").is_dir():
            return "seed"
        if (root / "stage1_train").is_dir():
            return "bbbc038"
        raise DataError(
            f"{root}: neither the seed layout (raw/<id>.jpg + gt/<id>.jpg) nor BBBC038 (stage1_train/<id>/images) found"
        )

    def _index(self) -> dict[str, tuple[Path, Path]]:
        """``{id: (image, mask file or masks folder)}``, listed once per reader."""
        if self._idx is None:
            root = self.require_root()
            out = {}
            if self._layout() == "seed":
                imgs = list_files(root / "raw", IMAGE_EXTS)
                masks = list_files(root / "gt", IMAGE_EXTS)
                out = {k: (v, masks.get(k, root / "gt" / f"{k}{v.suffix}")) for k, v in imgs.items()}
            else:
                for d in sorted((root / "stage1_train").iterdir()):
                    if d.is_dir() and not d.name.startswith("."):
                        out[d.name] = (d / "images" / f"{d.name}.png", d / "masks")
            self._idx = out
        return self._idx

    def _pair(self, case_id: str) -> tuple[Path, Path]:
        idx = self._index()
        if case_id not in idx:
            raise DataError(f"{self.root}: no image for case id {case_id!r}")
        return idx[case_id]

    # ------------------------------------------------------------------ Reader API
    def case_ids(self) -> list[str]:
        ids = sorted(self._index())
        if not ids:
            raise DataError(f"{self.require_root()}: no images found (raw/ is empty)")
        return ids

    def stratum_of(self, case_id: str) -> str:
        """The image's :func:`modality` (read once per reader)."""
        if case_id not in self._modality:
            self._modality[case_id] = modality(read_image(self._pair(case_id)[0], "rgb"))
        return self._modality[case_id]

    def source_files(self, case_id: str) -> list[Path]:
        img, mask = self._pair(case_id)
        return [img, *sorted(mask.glob("*.png"))] if mask.is_dir() else [img, mask]

    def check(self, case_ids: list[str]) -> None:
        for cid in case_ids:
            img, mask = self._pair(cid)
            if mask.is_dir():
                masks = sorted(p for p in mask.glob("*.png") if not p.name.startswith("."))
                if not masks:
                    raise DataError(f"{mask}: no per-nucleus mask PNGs for image {img.name}")
                check_same_shape(img, *masks)
            else:
                if not mask.is_file():
                    raise DataError(f"{mask}: mask for image {img.name} not found (expected gt/<id> beside raw/<id>)")
                check_same_shape(img, mask)

    def read(self, case_id: str) -> Sample:
        img_path, mask_path = self._pair(case_id)
        image = read_image(img_path, "rgb")
        if mask_path.is_dir():
            inst = np.zeros(image.shape[:2], np.int32)
            for i, p in enumerate(sorted(q for q in mask_path.glob("*.png") if not q.name.startswith(".")), start=1):
                m = read_image(p, "gray")
                require_same_shape(image, m, p, img_path)
                inst[m > 0] = i
            mask = (inst > 0).astype(np.uint8)
        else:
            mask = binarise(read_image(mask_path, "gray"), self.mask_threshold)
            require_same_shape(image, mask, mask_path, img_path)
            inst = connected_instances(mask)
        return Sample(image=image, mask=mask, instances=inst, case_id=case_id, source=str(img_path))
