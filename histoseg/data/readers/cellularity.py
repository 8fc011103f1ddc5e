"""Tumour cellularity in the tumour-cellularity seed's format, plus a builder that derives such a set from BreCaHAD.

Layout (the seed's ``train_directory`` / ``val_directory``)::

    <root>/train/input/<id>.<png|jpg|tif>
    <root>/train/gt/<id>_gt.png          colour-coded classes
    <root>/val/{input,gt}/...            optional (an official validation split)
    <root>/test/{input,gt}/...           optional (an official test split)
    <root>/cellularity.csv               optional: id, group, ..., cellularity (written by the builder)

Classes (index: colour): 0 background: black (0, 0, 0); 1 tumour: red (255, 0, 0); 2 non_tumour: green
(0, 255, 0); 3 boundary: blue (0, 0, 255). Background is 0 as everywhere in histoseg; the rest follow the
seed's red / green / blue order.

Decoding tolerates JPEG-like noise: every pixel takes the nearest palette colour (Euclidean RGB). Pixels
farther than ``tolerance`` (default 100) from every palette colour are accepted only as thin noise, i.e.
when a pixel within 2 px is a clean palette colour (JPEG chroma bleeding along class edges); a wider region
of an off-palette colour (say yellow or white) is an unknown colour and raises a DataError naming the file,
the colour and where it is.

Cellularity (as the seed and BreastPathQ define it for one image) = tumour-nucleus area / all-nucleus area
= pixels of class 1 / pixels of classes 1 + 2.

``build_cellularity_from_brecahad`` derives a set in exactly this layout from BreCaHAD's point labels:
tumor + mitosis -> tumour; non_tumor -> non-tumour; apoptosis -> non-tumour by default (an apoptotic body is
a nucleus but not a viable tumour cell, and cellularity counts viable tumour cells; configurable); a ring of
``ring_width`` px around every nucleus disc -> boundary; lumen / non_lumen points (tubule structures, not
nuclei) and everything else -> background. Where discs overlap, tumour wins over non-tumour, and both win
over any ring.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from histoseg.data.io import DataError, atomic_write_text, exclusive_lock, publish, read_image, write_image
from histoseg.data.readers.base import Reader, register_reader
from histoseg.data.readers.common import IMAGE_EXTS, check_same_shape, list_files, require_dir
from histoseg.data.sample import Sample

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "tumour", "non_tumour", "boundary")
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
BUILD_FORMAT = 1


def encode_cellularity_mask(labels: np.ndarray) -> np.ndarray:
    """Class map ``(H, W)`` with values 0..3 -> colour mask ``(H, W, 3)`` uint8 RGB (the seed's colours)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected an (H, W) class map, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(PALETTE)):
        bad = np.setdiff1d(np.unique(labels), np.arange(len(PALETTE)))
        raise ValueError(f"class map holds values {bad.tolist()} outside 0..{len(PALETTE) - 1} {list(CLASS_NAMES)}")
    return PALETTE[labels.astype(np.intp)]


def decode_cellularity_mask(rgb: np.ndarray, tolerance: float = 100.0, source: str | Path = "<array>") -> np.ndarray:
    """Colour mask ``(H, W, 3)`` RGB -> class map ``(H, W)`` uint8 (see the module docstring for the rule)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise DataError(f"{source}: expected a colour (RGB) mask, got an array of shape {rgb.shape}")
    px = rgb[..., :3].astype(np.int32)
    key = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    labels = np.full(key.shape, 255, np.uint8)
    for k, (r, g, b) in enumerate(PALETTE.astype(np.int32)):
        labels[key == ((r << 16) | (g << 8) | b)] = k
    off = labels == 255  # not exactly a palette colour: nearest colour, within the tolerance or thin noise
    far = np.zeros(key.shape, bool)
    if off.any():
        sub = px[off]
        d2 = ((sub[:, None, :] - PALETTE.astype(np.int32)[None]) ** 2).sum(-1)
        labels[off] = d2.argmin(-1)
        far[off] = d2.min(-1) > float(tolerance) ** 2
    if far.any():
        clean = cv2.dilate((~far).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        bad = far & ~clean
        if bad.any():
            ys, xs = np.nonzero(bad)
            colours, counts = np.unique(rgb[ys, xs, :3].reshape(-1, 3), axis=0, return_counts=True)
            top = colours[np.argsort(-counts)[:3]]
            raise DataError(
                f"{source}: {int(bad.sum())} pixels have colours that are not in the cellularity palette "
                f"(e.g. RGB {tuple(int(v) for v in top[0])} at x={int(xs[0])}, y={int(ys[0])}; most frequent: "
                f"{[tuple(int(v) for v in c) for c in top]}); expected black background, red tumour, green non-tumour, "
                f"blue boundary (tolerance {tolerance})"
            )
    return labels


def cellularity_of(labels: np.ndarray) -> float:
    """Tumour-nucleus area / all-nucleus area of a class map, as a fraction (NaN when it holds no nucleus)."""
    from histoseg.analysis.morphometry import cellularity

    return cellularity(labels, tumour_classes=[1], nucleus_classes=[1, 2]) / 100.0


# ---------------------------------------------------------------------------------------------- reader
@register_reader("cellularity")
class CellularityReader(Reader):
    """Reads the seed layout; with ``build_from`` set, derives it from BreCaHAD first (``prepare``).

    Args:
        root: the folder holding ``train/`` (and optionally ``val/``, ``test/``).
        tolerance: colour distance accepted as JPEG-like noise (see ``decode_cellularity_mask``).
        build_from: ``None``, or keyword arguments of :func:`build_cellularity_from_brecahad` (without
            ``out_dir``): ``prepare()`` builds ``root`` from them when it is missing or was built with other
            parameters or from other source files.
    """

    class_names = CLASS_NAMES
    mpp = None
    downloads: list[dict] = []

    def __init__(self, root: str | Path | None = None, tolerance: float = 100.0, build_from: dict | None = None):
        super().__init__(root)
        self.tolerance = float(tolerance)
        self.build_from = dict(build_from) if build_from else None
        self._idx: dict[str, tuple[str, Path, Path]] | None = None
        self._grp: dict[str, str] | None = None

    # ------------------------------------------------------------------ derived set
    def prepare(self, force: bool = False) -> None:
        if self.build_from is None:
            return
        if self.root is None:
            raise DataError("cellularity: no data root configured for the derived set")
        build_cellularity_from_brecahad(out_dir=self.root, overwrite=force, **self.build_from)
        self._idx = self._grp = None

    # ------------------------------------------------------------------ files
    def _index(self) -> dict[str, tuple[str, Path, Path]]:
        if self._idx is None:
            root = self.require_root()
            idx: dict[str, tuple[str, Path, Path]] = {}
            for split in ("train", "val", "test"):
                d = root / split
                if not d.is_dir():
                    if split == "train":
                        hint = " (run `histoseg-data build-cellularity` or set dataset.reader.build_from)"
                        raise DataError(f"{d}: train folder not found; expected train/input + train/gt{hint}")
                    continue
                imgs = list_files(require_dir(d / "input", "input"), IMAGE_EXTS)
                for k, p in imgs.items():
                    if k in idx:
                        raise DataError(f"{p}: image id {k!r} appears in both {idx[k][0]}/ and {split}/")
                    idx[k] = (split, p, d / "gt" / f"{k}_gt.png")
            if not idx:
                raise DataError(f"{root / 'train' / 'input'}: no images found")
            self._idx = idx
        return self._idx

    def _entry(self, case_id: str) -> tuple[str, Path, Path]:
        idx = self._index()
        if case_id not in idx:
            raise DataError(f"{self.root}: no image for case id {case_id!r}")
        return idx[case_id]

    def _groups(self) -> dict[str, str]:
        """``{id: group}`` from ``cellularity.csv`` when it has a ``group`` column (the builder writes one)."""
        if self._grp is None:
            p = self.require_root() / "cellularity.csv"
            self._grp = {}
            if p.is_file():
                with open(p, newline="") as f:
                    self._grp = {r["id"]: r["group"] for r in csv.DictReader(f) if r.get("group")}
        return self._grp

    # ------------------------------------------------------------------ Reader API
    def case_ids(self) -> list[str]:
        return sorted(self._index())

    def official_split(self) -> dict[str, list[str]]:
        idx = self._index()
        out = {s: sorted(k for k, v in idx.items() if v[0] == s) for s in ("train", "test")}
        if any(v[0] == "val" for v in idx.values()):
            out["val"] = sorted(k for k, v in idx.items() if v[0] == "val")
        return out

    def group_of(self, case_id: str) -> str:
        return self._groups().get(case_id, case_id)

    def source_files(self, case_id: str) -> list[Path]:
        _, img, gt = self._entry(case_id)
        return [img, gt]

    def check(self, case_ids: list[str]) -> None:
        for cid in case_ids:
            _, img, gt = self._entry(cid)
            if not gt.is_file():
                raise DataError(f"{gt}: mask for image {img.name} not found (expected gt/<id>_gt.png)")
            check_same_shape(img, gt)

    def read(self, case_id: str) -> Sample:
        split, img_path, gt_path = self._entry(case_id)
        image = read_image(img_path, "rgb")
        labels = decode_cellularity_mask(read_image(gt_path, "rgb"), self.tolerance, gt_path)
        if labels.shape != image.shape[:2]:
            raise DataError(
                f"{gt_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image {img_path.name} is "
                f"{image.shape[1]}x{image.shape[0]} (W x H)"
            )
        return Sample(
            image=image, mask=labels, case_id=case_id, group=self.group_of(case_id), source=str(img_path),
            meta={"split": split, "cellularity": cellularity_of(labels)},
        )


# ---------------------------------------------------------------------------------------------- builder
CSV_FIELDS = (
    "id", "group", "split", "n_tumour", "n_non_tumour", "n_apoptosis",
    "tumour_px", "non_tumour_px", "boundary_px", "cellularity",
)


def build_cellularity_from_brecahad(
    brecahad_root: str | Path,
    out_dir: str | Path,
    radius: float = 16,
    ring_width: int = 3,
    apoptosis: str = "non_tumour",
    test_fraction: float = 0.25,
    seed: int = 0,
    method: str = "exact",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Derive a 4-class cellularity set from BreCaHAD points, in the seed's layout, atomically.

    Writes ``out_dir/{train,test}/input/<id>.<ext>`` (the BreCaHAD image bytes, unchanged),
    ``.../gt/<id>_gt.png`` (colour-coded classes), ``cellularity.csv`` (per image: counts, class areas in
    pixels and cellularity = tumour-nucleus area / all-nucleus area) and ``build.json`` (parameters and the
    SHA-256 fingerprint of the source files). The whole folder is built beside ``out_dir`` and renamed into
    place, so an interrupted build never leaves a folder that looks complete. Calls on one ``out_dir`` from several
    processes at once are serialised by a lock on its parent folder: one builds, the others wait and reuse it.

    Args:
        radius: nucleus disc radius in pixels (as the BreCaHAD reader).
        ring_width: width in pixels of the boundary ring drawn outside every nucleus disc (0 = no boundary).
        apoptosis: class given to apoptosis points: ``non_tumour`` (default), ``tumour`` or ``background``.
        test_fraction: fraction of *cases* (``Case_NN``) written to ``test/``, chosen with ``seed``.
        overwrite: rebuild even when ``out_dir`` is up to date.

    Returns ``out_dir``. An existing ``out_dir`` built with the same parameters from the same files is reused.
    """
    from histoseg.data.readers.brecahad import BreCaHADReader

    if apoptosis not in ("tumour", "non_tumour", "background"):
        raise ValueError(f"apoptosis must be 'tumour', 'non_tumour' or 'background', got {apoptosis!r}")
    if int(ring_width) < 0 or float(radius) <= 0:
        raise ValueError(f"need radius > 0 and ring_width >= 0, got radius={radius}, ring_width={ring_width}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = Path(out_dir)
    src = BreCaHADReader(brecahad_root, classes="six", radius=radius, method=method)
    ids = src.case_ids()
    src.check(ids)
    params = {
        "builder": "brecahad", "format": BUILD_FORMAT, "radius": float(radius), "ring_width": int(ring_width),
        "apoptosis": apoptosis, "test_fraction": float(test_fraction), "seed": int(seed), "method": method,
    }
    fingerprint = src.fingerprint(ids)
    meta_path = out / "build.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # two runs starting at once (experiments/batch.py --parallel) would otherwise both build and the second would
    # swap the folder away under the first one's reader: the second waits here, then finds the folder up to date
    with exclusive_lock(out.parent):
        if out.exists():
            if not meta_path.is_file():
                raise DataError(
                    f"{out}: exists but was not built by histoseg (no build.json); remove it or point the reader at "
                    "another folder"
                )
            old = json.loads(meta_path.read_text())
            if not overwrite and old.get("params") == params and old.get("source_fingerprint") == fingerprint:
                return out
            log.info("cellularity: rebuilding %s (%s)", out, "forced" if overwrite else "parameters or BreCaHAD files changed")

        groups = {cid: src.group_of(cid) for cid in ids}
        uniq = sorted(set(groups.values()))
        rng = np.random.default_rng(int(seed))
        n_test = int(round(float(test_fraction) * len(uniq)))
        if test_fraction > 0 and len(uniq) > 1:
            n_test = min(max(n_test, 1), len(uniq) - 1)
        test_groups = set(rng.permutation(uniq)[:n_test].tolist())

        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            rows = []
            it = ids
            if progress:
                from rich.progress import track

                it = track(ids, description=f"cellularity from BreCaHAD -> {out.name}", transient=True)
            for cid in it:
                split = "test" if groups[cid] in test_groups else "train"
                img_path = src.source_files(cid)[0]
                shape = _shape(img_path)
                pts = src.points(cid, shape)
                labels = cellularity_labels(shape, pts, radius, ring_width, apoptosis, method)
                (tmp / split / "input").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(img_path, tmp / split / "input" / f"{cid}{img_path.suffix.lower()}")
                write_image(tmp / split / "gt" / f"{cid}_gt.png", encode_cellularity_mask(labels))
                t, n, b = (int((labels == k).sum()) for k in (1, 2, 3))
                rows.append({
                    "id": cid, "group": groups[cid], "split": split,
                    "n_tumour": len(pts["tumor"]) + len(pts["mitosis"]) + (len(pts["apoptosis"]) if apoptosis == "tumour" else 0),
                    "n_non_tumour": len(pts["non_tumor"]) + (len(pts["apoptosis"]) if apoptosis == "non_tumour" else 0),
                    "n_apoptosis": len(pts["apoptosis"]),
                    "tumour_px": t, "non_tumour_px": n, "boundary_px": b,
                    "cellularity": f"{t / (t + n):.6f}" if t + n else "",
                })
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(tmp / "cellularity.csv", buf.getvalue())
            atomic_write_text(
                tmp / "build.json",
                json.dumps({"params": params, "source": str(Path(brecahad_root).resolve()), "source_fingerprint": fingerprint,
                            "n_images": len(rows), "test_groups": sorted(test_groups)}, indent=1),
            )
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("cellularity: built %d images (%d test) from %s into %s", len(rows),
                 sum(r["split"] == "test" for r in rows), brecahad_root, out)
        return out


def cellularity_labels(
    shape: tuple[int, int], points: dict[str, np.ndarray], radius: float, ring_width: int,
    apoptosis: str = "non_tumour", method: str = "exact",
) -> np.ndarray:
    """The 4-class map of one image from BreCaHAD pixel points (see the module docstring for the rules)."""
    from histoseg.data.readers.common import draw_discs

    tumour = [points["tumor"], points["mitosis"]]
    non_tumour = [points["non_tumor"]]
    if apoptosis == "tumour":
        tumour.append(points["apoptosis"])
    elif apoptosis == "non_tumour":
        non_tumour.append(points["apoptosis"])
    t, n = np.concatenate(tumour).reshape(-1, 2), np.concatenate(non_tumour).reshape(-1, 2)
    labels = np.zeros(shape, np.uint8)
    if ring_width > 0:
        ring, _ = draw_discs(shape, [(3, np.concatenate([n, t]))], radius + ring_width, method)
        labels = ring
    discs, _ = draw_discs(shape, [(2, n), (1, t)], radius, method)
    return np.where(discs > 0, discs, labels).astype(np.uint8)


def _shape(path: Path) -> tuple[int, int]:
    from histoseg.data.readers.common import image_shape

    return image_shape(path)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an older one is moved aside first and then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    publish(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
