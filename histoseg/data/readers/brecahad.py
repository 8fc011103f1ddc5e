"""BreCaHAD (Aksac et al., BMC Res Notes 2019): breast cancer H&E with point annotations.

Layout (as published; the data kit stores the images as JPEG)::

    <root>/images/<Case_NN-MM>.{tif,jpg,png}
    <root>/groundTruth/<Case_NN-MM>.json   {"mitosis"|"apoptosis"|"tumor"|"non_tumor"|"lumen"|"non_lumen":
                                            [{"x": .., "y": ..}, ...]}

Each point is a centre normalised to [0, 1]: ``x`` by the image width, ``y`` by its height. The pixel
position is ``(x * W, y * H)`` in pixel-centre coordinates (pixel ``i`` has its centre at ``i``); the
annotations come at half-pixel precision, so no rounding is applied: the disc is rasterised exactly around
the sub-pixel centre (a pixel is inside when its centre is within ``radius`` of the point).

Masks are filled discs of ``radius`` pixels (default 16: about the lower quartile of the tumour-nucleus
radius that ``estimate_nucleus_radius`` measures on the kit, median 20.6 px; non-tumour nuclei are smaller,
median 12.8 px; see the README).
``classes``:

* ``binary``: background / nucleus, from the classes in ``binary_classes`` (default the four nucleus classes
  mitosis, apoptosis, tumor, non_tumor; ``lumen`` / ``non_lumen`` mark tubule structures, not nuclei);
* ``six``: background + the six upstream classes, in the order of ``SIX_CLASSES``. Where discs overlap the
  higher-priority class wins: mitosis > apoptosis > tumor > non_tumor > lumen > non_lumen (rare and
  diagnostically decisive classes are never hidden by common ones).

Instances: one id per disc (after overlap, a disc keeps the pixels its class won; fully hidden discs vanish).
Split groups are cases (``Case_NN``): a split never separates the images of one case.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np

from histoseg.data.io import DataError, read_image
from histoseg.data.readers.base import Reader, register_reader
from histoseg.data.readers.common import IMAGE_EXTS, draw_discs, image_shape, list_files, require_dir
from histoseg.data.sample import Sample

UPSTREAM_CLASSES = ("mitosis", "apoptosis", "tumor", "non_tumor", "lumen", "non_lumen")
NUCLEUS_CLASSES = ("mitosis", "apoptosis", "tumor", "non_tumor")
SIX_CLASSES = ("background", *UPSTREAM_CLASSES)
# drawn in this order, later discs win where they overlap
PRIORITY = ("non_lumen", "lumen", "non_tumor", "tumor", "apoptosis", "mitosis")
_CASE = re.compile(r"^(Case_\d+)-\d+$")


def load_points(path: str | Path) -> dict[str, np.ndarray]:
    """``{class: (N, 2) float array of normalised (x, y)}`` from a BreCaHAD groundTruth JSON; validated."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: annotation JSON not found")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{p}: expected an object of classes, got {type(data).__name__}")
    unknown = sorted(set(data) - set(UPSTREAM_CLASSES))
    if unknown:
        raise DataError(f"{p}: unknown classes {unknown}; BreCaHAD classes are {list(UPSTREAM_CLASSES)}")
    out: dict[str, np.ndarray] = {}
    for cls in UPSTREAM_CLASSES:
        pts = data.get(cls, [])
        if not isinstance(pts, list):
            raise DataError(f"{p}: {cls!r} must be a list of points")
        arr = np.zeros((len(pts), 2), np.float64)
        for i, pt in enumerate(pts):
            try:
                arr[i] = float(pt["x"]), float(pt["y"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{p}: {cls}[{i}] is {pt!r}, expected {{'x': float, 'y': float}}") from None
            if not (0.0 <= arr[i, 0] <= 1.0 and 0.0 <= arr[i, 1] <= 1.0):
                raise DataError(f"{p}: {cls}[{i}] = {pt} lies outside [0, 1] (coordinates are normalised)")
        out[cls] = arr
    return out


def to_pixels(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Normalised ``(x, y)`` -> pixel-centre coordinates ``(x * W, y * H)`` (float, no rounding)."""
    h, w = shape
    return np.asarray(points, np.float64) * np.array([w, h], np.float64)


@register_reader("brecahad")
class BreCaHADReader(Reader):
    """BreCaHAD point annotations as disc masks (see the module docstring)."""

    mpp = None  # not published with the set
    has_instances = True
    downloads = [
        {
            "url": "https://figshare.com/ndownloader/files/14062469",
            "sha256": None,  # figshare publishes an MD5 only; no SHA-256 known offline: layout is verified instead
            "filename": "BreCaHAD.zip",
            "strip": "auto",
            "expect": ["images/*", "groundTruth/*.json"],
        }
    ]

    def __init__(
        self,
        root: str | Path | None = None,
        classes: str = "binary",
        radius: float = 16,
        binary_classes: list[str] | tuple[str, ...] = NUCLEUS_CLASSES,
        method: str = "exact",
        downloads: list[dict] | None = None,
    ):
        super().__init__(root)
        if classes not in ("binary", "six"):
            raise ValueError(f"brecahad classes must be 'binary' or 'six', got {classes!r}")
        bad = sorted(set(binary_classes) - set(UPSTREAM_CLASSES))
        if bad:
            raise ValueError(f"brecahad binary_classes {bad} are not BreCaHAD classes {list(UPSTREAM_CLASSES)}")
        if float(radius) <= 0:
            raise ValueError(f"brecahad radius must be positive, got {radius}")
        self.classes, self.radius, self.method = classes, float(radius), method
        self.binary_classes = tuple(binary_classes)
        self.class_names = ("background", "nucleus") if classes == "binary" else SIX_CLASSES
        if downloads is not None:
            self.downloads = list(downloads)

    # ------------------------------------------------------------------ files
    def _images(self) -> dict[str, Path]:
        folder = require_dir(self.require_root() / "images", "BreCaHAD images")
        imgs = list_files(folder, IMAGE_EXTS)
        if not imgs:
            raise DataError(f"{folder}: no images found (expected images/<Case_NN-MM>.tif|jpg)")
        return imgs

    def json_path(self, case_id: str) -> Path:
        return self.require_root() / "groundTruth" / f"{case_id}.json"

    # ------------------------------------------------------------------ Reader API
    def case_ids(self) -> list[str]:
        return sorted(self._images())

    def group_of(self, case_id: str) -> str:
        m = _CASE.match(case_id)
        if not m:
            raise DataError(
                f"{self.root}: image id {case_id!r} does not follow BreCaHAD's Case_NN-MM naming, so its case "
                "(the split group) is unknown"
            )
        return m.group(1)

    def source_files(self, case_id: str) -> list[Path]:
        imgs = self._images()
        if case_id not in imgs:
            raise DataError(f"{self.root}: no image for case id {case_id!r}")
        return [imgs[case_id], self.json_path(case_id)]

    def check(self, case_ids: list[str]) -> None:
        for cid in case_ids:
            self.group_of(cid)
            img, js = self.source_files(cid)
            if not js.is_file():
                raise DataError(f"{js}: annotation JSON for image {img.name} not found")
            image_shape(img)
            load_points(js)

    def points(self, case_id: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Pixel-centre ``(x, y)`` of every annotated point, per upstream class."""
        return {k: to_pixels(v, shape) for k, v in load_points(self.json_path(case_id)).items()}

    def read(self, case_id: str) -> Sample:
        img_path, js = self.source_files(case_id)
        image = read_image(img_path, "rgb")
        pts = self.points(case_id, image.shape[:2])
        nuclei = [pts[c] for c in PRIORITY if c in self.binary_classes]  # the nucleus classes, in drawing order
        if self.classes == "binary":
            centres = [(1, xy) for xy in nuclei]
        else:
            centres = [(SIX_CLASSES.index(c), pts[c]) for c in PRIORITY]
        mask, inst = draw_discs(image.shape[:2], centres, self.radius, self.method)
        return Sample(
            image=image, mask=mask, instances=inst, case_id=case_id, group=self.group_of(case_id),
            source=str(img_path),
            # nucleus_points / point_radius: the detection metrics (histoseg.metrics.points) match predicted
            # nuclei to the annotated nuclei within the disc radius
            meta={"points": pts, "annotation": str(js), "point_radius": float(self.radius),
                  "nucleus_points": np.concatenate(nuclei or [np.zeros((0, 2))]).reshape(-1, 2)},
        )


def haematoxylin_blobs(image: np.ndarray) -> np.ndarray:
    """Connected haematoxylin blobs of an RGB H&E image (int32 labels, 0 = background): haematoxylin from colour
    deconvolution (``skimage.color.rgb2hed``), smoothed (sigma 1.5 px), Otsu threshold per image, 3x3 opening.
    No learning: the nucleus-size estimate below and the classical detection baseline of experiments/ use it."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    hema = cv2.GaussianBlur(rgb2hed(image)[..., 0].astype(np.float32), (0, 0), 1.5)
    blobs = cv2.morphologyEx((hema > threshold_otsu(hema)).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return cv2.connectedComponents(blobs)[1].astype(np.int32)


def estimate_nucleus_radius(
    reader: BreCaHADReader, case_ids: list[str] | None = None, classes: tuple[str, ...] = ("tumor", "non_tumor")
) -> dict[str, dict[str, float]]:
    """Equivalent radius (pixels) of the haematoxylin blob under each annotated point, per class.

    The connected blob (``haematoxylin_blobs``) under the point gives ``sqrt(area / pi)``. Blobs larger than
    3000 px (merged clusters) are skipped. Returns ``{class: {n, median, q25, q75}}``.
    """
    radii: dict[str, list[float]] = {c: [] for c in classes}
    for cid in case_ids or reader.case_ids():
        img_path, _ = reader.source_files(cid)
        lab = haematoxylin_blobs(read_image(img_path, "rgb"))
        areas = np.bincount(lab.ravel())
        h, w = lab.shape
        for cls, xy in reader.points(cid, (h, w)).items():
            if cls not in radii:
                continue
            for x, y in xy:
                c, r = min(int(round(x)), w - 1), min(int(round(y)), h - 1)
                k = lab[r, c]
                if k and areas[k] <= 3000:
                    radii[cls].append(float(np.sqrt(areas[k] / np.pi)))
    return {
        c: {"n": len(v), "median": float(np.median(v)), "q25": float(np.percentile(v, 25)), "q75": float(np.percentile(v, 75))}
        for c, v in radii.items() if v
    }
