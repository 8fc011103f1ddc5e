"""MoNuSeg 2018 (Kumar et al., TMI 2017 + the challenge test set): H&E 40x (0.25 um/px), 1000 x 1000.

Two layouts are read, per split folder, so users with the original download need nothing else:

* the data kit (masks already rasterised)::

      <root>/{train,test}/images/<id>.{jpg,tif,png}
      <root>/{train,test}/masks/<id>.png         0 / 255 nuclei
      <root>/{train,test}/instances/<id>.png     uint16 instance ids (optional per image)

* the official archives, as extracted (images + Aperio XML polygons, rasterised here)::

      <root>/MoNuSeg 2018 Training Data/Tissue Images/<id>.tif  +  .../Annotations/<id>.xml
      <root>/MoNuSegTestData/<id>.tif  +  <id>.xml

  (``train/`` / ``test/`` holding ``Tissue Images`` + ``Annotations``, or a flat mix of ``.tif`` + ``.xml``,
  work as well).

Classes: background / nucleus. The official train / test split is the publisher's (``split.strategy:
official``); validation is carved from train by patient (TCGA barcode ``TCGA-XX-XXXX``). Instance maps come
from ``instances/`` or the XML; images without either have ``Sample.instances = None``, unless ``instances_dir``
names a folder of ``<id>.png`` maps for them (training images only; e.g. pseudo instance maps that split the
annotated mask, made by ``experiments/monuseg_instance_pseudo/make_pseudo.py``): such a map must label exactly
the mask's nucleus pixels.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoseg.data.io import DataError, read_image
from histoseg.data.readers.base import Reader, register_reader
from histoseg.data.readers.common import (
    IMAGE_EXTS,
    binarise,
    check_same_shape,
    list_files,
    require_same_shape,
)
from histoseg.data.sample import Sample

SPLIT_FOLDERS = {"train": ("train", "MoNuSeg 2018 Training Data"), "test": ("test", "MoNuSegTestData")}


def parse_aperio_xml(path: str | Path) -> list[np.ndarray]:
    """Polygons of an Aperio ImageScope XML annotation: a list of ``(N, 2)`` float ``(x, y)`` vertex arrays.

    Every ``Region`` of every ``Annotation`` is one polygon, in file order. Regions marked
    ``NegativeROA="1"`` (holes) are skipped; MoNuSeg has none. Regions with fewer than 3 vertices raise.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: annotation XML not found")
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise DataError(f"{p}: not a valid XML file ({e})") from None
    if root.tag != "Annotations":
        raise DataError(f"{p}: not an Aperio annotation file (root element <{root.tag}>, expected <Annotations>)")
    polys = []
    for k, region in enumerate(root.iter("Region")):
        if region.get("NegativeROA", "0") == "1":
            continue
        try:
            xy = np.array([[float(v.get("X")), float(v.get("Y"))] for v in region.iter("Vertex")], np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{p}: region {region.get('Id', k)} has a vertex without numeric X / Y") from None
        if len(xy) < 3:
            raise DataError(f"{p}: region {region.get('Id', k)} has {len(xy)} vertices; a polygon needs 3")
        polys.append(xy)
    return polys


def rasterise(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map ``(H, W)`` int32: polygon ``i`` (0-based) fills the pixels whose centre is inside it with
    ``i + 1``; where polygons overlap the later one wins. Vertices outside the image are clipped."""
    from skimage.draw import polygon as fill

    inst = np.zeros(tuple(shape), np.int32)
    for i, xy in enumerate(polygons, start=1):
        rr, cc = fill(xy[:, 1], xy[:, 0], shape=inst.shape)
        inst[rr, cc] = i
    return inst


@dataclass(frozen=True)
class _Entry:
    split: str
    image: Path
    mask: Path | None = None
    instances: Path | None = None
    xml: Path | None = None
    extra: bool = False  # instances from ``instances_dir`` (e.g. pseudo-labels), not from the publisher


@register_reader("monuseg")
class MoNuSegReader(Reader):
    class_names = ("background", "nucleus")
    mpp = 0.25
    has_instances = True
    # The organisers share the data through Google Drive (https://monuseg.grand-challenge.org/Data/), which asks
    # for a confirmation on large files: a plain download gets a web page and fails with a clear message; then
    # download the two zips in a browser and extract them into the data root (or point `url` at file://...).
    # SHA-256 as published in torch-em (constantinpape/torch-em, torch_em/data/datasets/histopathology/monuseg.py).
    downloads = [
        {
            "url": "https://drive.google.com/uc?export=download&id=1ZgqFJomqQGNnsx7w7QBzQQMVA16lbVCA",
            "sha256": "25d3d3185bb2970b397cafa72eb664c9b4d24294aee382e7e3df9885affce742",
            "filename": "MoNuSeg 2018 Training Data.zip",
            "strip": 0,
            "expect": ["MoNuSeg 2018 Training Data/Tissue Images/*.tif", "MoNuSeg 2018 Training Data/Annotations/*.xml"],
        },
        {
            "url": "https://drive.google.com/uc?export=download&id=1NKkSQ5T0ZNQ8aUhh0a8Dt2YKYCQXIViw",
            "sha256": "13e522387ae8b1bcc0530e13ff9c7b4d91ec74959ef6f6e57747368d7ee6f88a",
            "filename": "MoNuSegTestData.zip",
            "strip": 0,
            "expect": ["MoNuSegTestData/*.tif", "MoNuSegTestData/*.xml"],
        },
    ]

    def __init__(self, root: str | Path | None = None, mask_threshold: int = 128, downloads: list[dict] | None = None,
                 instances_dir: str | Path | None = None):
        super().__init__(root)
        self.mask_threshold = int(mask_threshold)
        self.instances_dir = None if instances_dir in (None, "") else Path(instances_dir)
        if downloads is not None:
            self.downloads = list(downloads)
        self._idx: dict[str, _Entry] | None = None

    # ------------------------------------------------------------------ layouts
    def _split_dir(self, split: str) -> Path | None:
        root = self.require_root()
        for name in SPLIT_FOLDERS[split]:
            if (root / name).is_dir():
                return root / name
        return None

    def _scan(self, split: str, d: Path) -> dict[str, _Entry]:
        if (d / "images").is_dir():  # kit layout
            imgs = list_files(d / "images", IMAGE_EXTS)
            masks = list_files(d / "masks", (".png", ".tif", ".tiff", ".bmp"))
            insts = list_files(d / "instances", (".png", ".tif", ".tiff"))
            xmls = list_files(d / "annotations", (".xml",)) or list_files(d / "Annotations", (".xml",))
            return {k: _Entry(split, v, masks.get(k), insts.get(k), xmls.get(k)) for k, v in imgs.items()}
        img_dir = d / "Tissue Images" if (d / "Tissue Images").is_dir() else d
        xml_dir = d / "Annotations" if (d / "Annotations").is_dir() else d
        imgs = list_files(img_dir, (".tif", ".tiff", ".png", ".jpg"))
        xmls = list_files(xml_dir, (".xml",))
        return {k: _Entry(split, v, xml=xmls.get(k, xml_dir / f"{k}.xml")) for k, v in imgs.items()}

    def _index(self) -> dict[str, _Entry]:
        if self._idx is None:
            root = self.require_root()
            idx: dict[str, _Entry] = {}
            for split in ("train", "test"):
                d = self._split_dir(split)
                if d is None:
                    continue
                for k, e in self._scan(split, d).items():
                    if k in idx:
                        raise DataError(f"{e.image}: image id {k!r} is in both the train and the test folder")
                    idx[k] = e
            if self.instances_dir is not None:
                if not self.instances_dir.is_dir():
                    raise DataError(f"{self.instances_dir}: instances_dir is not a folder")
                extra = list_files(self.instances_dir, (".png", ".tif", ".tiff"))
                for k, e in idx.items():  # training images annotated by a mask only; never the test images
                    if e.split == "train" and e.instances is None and not (e.xml is not None and e.xml.is_file()) \
                            and k in extra:
                        idx[k] = _Entry(e.split, e.image, e.mask, extra[k], e.xml, extra=True)
            if not idx:
                raise DataError(
                    f"{root}: no MoNuSeg images found; expected train/images + test/images, or the official "
                    f"'{SPLIT_FOLDERS['train'][1]}/Tissue Images' and '{SPLIT_FOLDERS['test'][1]}/' folders"
                )
            self._idx = idx
        return self._idx

    def _entry(self, case_id: str) -> _Entry:
        idx = self._index()
        if case_id not in idx:
            raise DataError(f"{self.root}: no image for case id {case_id!r}")
        return idx[case_id]

    # ------------------------------------------------------------------ Reader API
    def case_ids(self) -> list[str]:
        return sorted(self._index())

    def official_split(self) -> dict[str, list[str]]:
        idx = self._index()
        return {s: sorted(k for k, e in idx.items() if e.split == s) for s in ("train", "test")}

    def group_of(self, case_id: str) -> str:
        parts = case_id.split("-")
        return "-".join(parts[:3]) if case_id.startswith("TCGA-") and len(parts) >= 3 else case_id

    def source_files(self, case_id: str) -> list[Path]:
        e = self._entry(case_id)
        return [p for p in (e.image, e.mask, e.instances, e.xml) if p is not None and p.is_file()]

    def check(self, case_ids: list[str]) -> None:
        for cid in case_ids:
            e = self._entry(cid)
            if e.mask is None and e.instances is None and (e.xml is None or not e.xml.is_file()):
                where = e.xml if e.xml is not None else e.image.parent.parent / "masks" / f"{cid}.png"
                raise DataError(f"{where}: no mask, instance map or XML annotation for image {e.image.name}")
            check_same_shape(e.image, e.mask, e.instances)

    def read(self, case_id: str) -> Sample:
        e = self._entry(case_id)
        image = read_image(e.image, "rgb")
        mask = inst = None
        if e.instances is not None:
            inst = read_image(e.instances, "any").astype(np.int32)
            if inst.ndim != 2:
                raise DataError(f"{e.instances}: instance map must be single-channel, got shape {inst.shape}")
            require_same_shape(image, inst, e.instances, e.image)
        elif e.xml is not None and e.xml.is_file():
            inst = rasterise(parse_aperio_xml(e.xml), image.shape[:2])
        if e.mask is not None:
            mask = binarise(read_image(e.mask, "gray"), self.mask_threshold)
            require_same_shape(image, mask, e.mask, e.image)
            if e.extra:  # an added map splits the annotated mask; it must not redraw it
                bad = int(((inst > 0) != (mask > 0)).sum())
                if bad:
                    raise DataError(f"{e.instances}: {bad} pixels differ from the nucleus mask {e.mask} "
                                    f"(an instances_dir map must label exactly the mask's nucleus pixels)")
        else:
            mask = (inst > 0).astype(np.uint8)
        return Sample(
            image=image, mask=mask, instances=inst, case_id=case_id, group=self.group_of(case_id),
            source=str(e.image), meta={"split": e.split, **({"instances_from": str(e.instances)} if e.extra else {})},
        )
