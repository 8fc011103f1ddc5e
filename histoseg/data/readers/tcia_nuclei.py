""""Dataset of segmented nuclei in H&E images of ten cancer types" (TCIA, Hou et al., Sci Data 2020): crops.

Layout (as used by the SRGAN / U-Net seed)::

    <root>/images/<n>_crop.png
    <root>/annotations/<n>_labeled_mask_corrected.png    labelled nuclei, > 0 = nucleus

Classes: background / nucleus. Instances: when the label image holds more than one non-zero value it is
taken as an instance map; a 0 / 255 label image (as in the data kit) is split into instances by connected
components (4-connectivity). Each crop is its own split group; the default split is seeded random.
The full set is distributed by TCIA (https://doi.org/10.7937/tcia.2019.4a4dkp9u) through its own download
manager, so there is no automatic download.
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
    downloads: list[dict] = []

    def _files(self) -> tuple[dict[str, Path], Path]:
        root = self.require_root()
        imgs = list_files(require_dir(root / "images", "TCIA images"), suffix=IMAGE_SUFFIX)
        if not imgs:
            raise DataError(f"{root / 'images'}: no <n>{IMAGE_SUFFIX}.png images found")
        return imgs, root / "annotations"

    def _label_path(self, case_id: str) -> Path:
        return self.require_root() / "annotations" / f"{case_id}{LABEL_SUFFIX}.png"

    def case_ids(self) -> list[str]:
        return sorted(self._files()[0], key=_natural)

    def source_files(self, case_id: str) -> list[Path]:
        imgs, _ = self._files()
        if case_id not in imgs:
            raise DataError(f"{self.root}: no image for case id {case_id!r}")
        return [imgs[case_id], self._label_path(case_id)]

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
