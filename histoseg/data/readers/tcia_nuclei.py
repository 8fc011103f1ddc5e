""""Dataset of segmented nuclei in H&E images of ten cancer types" (TCIA, Hou et al., Sci Data 2020): crops.

Layout (as used by the SRGAN / U-Net seed)::

    <root>/images/<n>_crop.png
    <root>/annotations/<n>_labeled_mask_corrected.png    labelled nuclei, > 0 = nucleus

Classes: background / nucleus. Instances: when the label image holds more than one non-zero value it is
taken as an instance map; a 0 / 255 label image (as in the data kit) is split into instances by connected
components (4-connectivity). Each crop is its own split group; the default split is seeded random.
Also read: the upstream archive of the 1,356 manually segmented patches, ``manual_segmentation_data.tar.gz``
(TCIA collection Pan-Cancer-Nuclei-Seg, https://doi.org/10.7937/tcia.2019.4a4dkp9u), extracted as it comes:
``<n>_crop.png`` beside ``<n>_labeled_mask_corrected.png`` in any sub-folder (per-annotator
``_labeled_mask_common<k>.png`` files are ignored). The archive sits on Stony Brook's Box share, which answers
a plain request with a web page: download it in a browser and set ``reader.downloads[0].url`` to its
``file://`` path (or extract it into the data root). No checksum is published for it, so only the layout is
verified.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from histoseg.data.io import DataError, read_image
from histoseg.data.readers.base import Reader, register_reader
from histoseg.data.readers.common import (
    check_same_shape,
    connected_instances,
    list_files,
    relabel_sequential,
    require_dir,
    require_same_shape,
)
from histoseg.data.sample import Sample

IMAGE_SUFFIX, LABEL_SUFFIX = "_crop", "_labeled_mask_corrected"


def _natural(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


@register_reader("tcia_nuclei")
class TCIANucleiReader(Reader):
    class_names = ("background", "nucleus")
    mpp = None  # not stated with the crops
    has_instances = True
    downloads = [
        {
            # a Box web page, not the file itself: see the module docstring (download by hand, then file://)
            "url": "https://stonybrookmedicine.app.box.com/v/cnn-nuclear-segmentations-2019/file/586046955275",
            "sha256": None,
            "filename": "manual_segmentation_data.tar.gz",
            "strip": 0,
            "expect": [f"**/*{IMAGE_SUFFIX}.png", f"**/*{LABEL_SUFFIX}.png"],
        }
    ]

    def __init__(self, root: str | Path | None = None, downloads: list[dict] | None = None):
        super().__init__(root)
        if downloads is not None:
            self.downloads = list(downloads)
        self._idx: dict[str, tuple[Path, Path]] | None = None

    def _index(self) -> dict[str, tuple[Path, Path]]:
        """``{case id: (crop, label)}`` from the kit layout (``images/`` + ``annotations/``) or, without an
        ``images/`` folder, from the upstream archive layout (crop and label side by side, any depth)."""
        if self._idx is not None:
            return self._idx
        root = self.require_root()
        if (root / "images").is_dir():
            imgs = list_files(root / "images", suffix=IMAGE_SUFFIX)
            idx = {k: (p, root / "annotations" / f"{k}{LABEL_SUFFIX}.png") for k, p in imgs.items()}
            where = root / "images"
        else:
            require_dir(root, "TCIA nuclei data root")
            idx, where = {}, root
            for p in sorted(root.rglob(f"*{IMAGE_SUFFIX}.png")):
                if any(part.startswith(".") for part in p.relative_to(root).parts):
                    continue
                k = p.name[: -len(f"{IMAGE_SUFFIX}.png")]
                if k in idx:
                    raise DataError(f"{p}: crop id {k!r} is also {idx[k][0]}")
                idx[k] = (p, p.with_name(f"{k}{LABEL_SUFFIX}.png"))
        if not idx:
            raise DataError(
                f"{where}: no <n>{IMAGE_SUFFIX}.png images found (expected images/<n>{IMAGE_SUFFIX}.png + "
                f"annotations/<n>{LABEL_SUFFIX}.png, or the extracted manual_segmentation_data archive)"
            )
        self._idx = idx
        return idx

    def case_ids(self) -> list[str]:
        return sorted(self._index(), key=_natural)

    def source_files(self, case_id: str) -> list[Path]:
        idx = self._index()
        if case_id not in idx:
            raise DataError(f"{self.root}: no image for case id {case_id!r}")
        return list(idx[case_id])

    def check(self, case_ids: list[str]) -> None:
        for cid in case_ids:
            img, lab = self.source_files(cid)
            if not lab.is_file():
                raise DataError(f"{lab}: label image for {img.name} not found")
            check_same_shape(img, lab)

    def read(self, case_id: str) -> Sample:
        img_path, lab_path = self.source_files(case_id)
        image = read_image(img_path, "rgb")
        lab = read_image(lab_path, "any")
        if lab.ndim == 3:  # a label saved as RGB(A): any non-black pixel is nucleus
            lab = lab[..., :3].max(axis=2)
        require_same_shape(image, lab, lab_path, img_path)
        values = np.unique(lab)
        if (values > 0).sum() > 1:
            inst = relabel_sequential(lab.astype(np.int32))
        else:
            inst = connected_instances(lab > 0)
        return Sample(image=image, mask=(inst > 0).astype(np.uint8), instances=inst, case_id=case_id, source=str(img_path))
