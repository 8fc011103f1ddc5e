"""Embedded default dataset: procedurally generated H&E-like tiles with exact nuclei masks.

No files are needed: every tile is generated in memory, deterministically from ``(seed, index)``.
Pink stroma with fibre texture and white lumen gaps, purple (haematoxylin) elliptical nuclei of varied
size, shape, orientation and stain intensity with chromatin texture, some touching, then optical blur and
sensor noise. The instance map is exact (each visible nucleus pixel carries its nucleus id).

It is a smoke path for ``make train`` and for tests, not a substitute for the real data sets.
"""
from __future__ import annotations

import cv2
import numpy as np

from histoseg.data.readers.base import Reader, register_reader
from histoseg.data.sample import Sample


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float, aniso: float = 1.0) -> np.ndarray:
    n = rng.standard_normal(shape).astype(np.float32)
    k = (0, 0)
    n = cv2.GaussianBlur(n, k, sigmaX=sigma * aniso, sigmaY=sigma)
    return n / (n.std() + 1e-6)


def generate_tile(
    seed: int,
    index: int,
    shape: tuple[int, int] = (256, 256),
    density: float = 1.0,
    radius_range: tuple[float, float] = (4.0, 11.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image HxWx3 uint8, instances HxW uint16)`` for tile ``index`` of generator ``seed``."""
    rng = np.random.default_rng([int(seed), int(index)])
    h, w = int(shape[0]), int(shape[1])

    # --- stroma: eosin-pink base, low-frequency intensity variation, oriented fibres, lumen gaps
    base = np.array([232, 170, 205], np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    low = _smooth_noise(rng, (h, w), sigma=max(h, w) / 10)
    fib = _smooth_noise(rng, (h, w), sigma=1.5, aniso=rng.uniform(3, 8))
    angle = rng.uniform(0, 180)
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    fib = cv2.warpAffine(fib, rot, (w, h), borderMode=cv2.BORDER_REFLECT)
    shade = 1.0 + 0.06 * low[..., None] + 0.05 * fib[..., None]
    img = base[None, None, :] * shade
    lumen = _smooth_noise(rng, (h, w), sigma=max(h, w) / 8) > rng.uniform(1.2, 2.2)
    img[lumen] = img[lumen] * 0.15 + np.array([248, 240, 245], np.float32) * 0.85

    # --- nuclei: ellipses drawn into an exact instance map
    inst = np.zeros((h, w), np.uint16)
    area = h * w
    n_target = int(rng.poisson(density * area / 900.0))
    centres: list[tuple[float, float, float]] = []
    attempts = 0
    while len(centres) < n_target and attempts < n_target * 20:
        attempts += 1
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if lumen[int(cy) % h, int(cx) % w]:
            continue
        r = rng.uniform(*radius_range)
        # mostly separated, some touching / slightly overlapping (the hard case for instance splitting)
        min_gap = rng.choice([1.0, 0.75], p=[0.8, 0.2])
        if any((cy - y) ** 2 + (cx - x) ** 2 < (min_gap * (r + rr)) ** 2 for y, x, rr in centres):
            continue
        centres.append((cy, cx, r))
    chroma = _smooth_noise(rng, (h, w), sigma=1.0)
    hema = np.array([72, 38, 125], np.float32)
    stain = np.zeros((h, w), np.float32)
    for i, (cy, cx, r) in enumerate(centres, start=1):
        ecc = rng.uniform(0.55, 1.0)
        axes = (max(int(round(r)), 2), max(int(round(r * ecc)), 2))
        ang = float(rng.uniform(0, 180))
        cv2.ellipse(inst, (int(round(cx)), int(round(cy))), axes, ang, 0, 360, int(i), thickness=-1)
        cv2.ellipse(stain, (int(round(cx)), int(round(cy))), axes, ang, 0, 360, float(rng.uniform(0.65, 1.0)), -1)
    # relabel so ids are contiguous and fully hidden nuclei disappear
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(int(inst.max()) + 1, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    inst = lut[inst]

    nuc = stain[..., None] * (0.85 + 0.15 * chroma[..., None])
    img = img * (1 - nuc) + hema[None, None, :] * nuc * (1.0 + 0.1 * chroma[..., None])
    # nuclear membrane slightly darker
    edge = cv2.morphologyEx((inst > 0).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    img[edge] *= 0.9

    # --- optics and sensor
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(rng.uniform(0.5, 1.1)))
    img += rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), inst


@register_reader("synthetic")
class SyntheticReader(Reader):
    """In-memory generated nuclei tiles; case ids ``syn-<split>-<n>`` with a fixed train/val/test split."""

    class_names = ("background", "nucleus")
    mpp = 0.5
    has_instances = True

    def __init__(
        self,
        root=None,
        n_train: int = 48,
        n_val: int = 8,
        n_test: int = 8,
        image_shape: tuple[int, int] = (256, 256),
        seed: int = 0,
        density: float = 1.0,
    ):
        super().__init__(None)
        self.n = {"train": n_train, "val": n_val, "test": n_test}
        self.image_shape = tuple(int(s) for s in image_shape)
        self.seed, self.density = int(seed), float(density)

    def case_ids(self) -> list[str]:
        return [f"syn-{s}-{i:04d}" for s in ("train", "val", "test") for i in range(self.n[s])]

    def official_split(self) -> dict[str, list[str]]:
        return {s: [f"syn-{s}-{i:04d}" for i in range(self.n[s])] for s in ("train", "val", "test")}

    def read(self, case_id: str) -> Sample:
        try:
            _, split, idx = case_id.split("-")
            index = int(idx) + {"train": 0, "val": 1_000_000, "test": 2_000_000}[split]
        except (ValueError, KeyError):
            raise KeyError(f"synthetic: unknown case id {case_id!r}") from None
        img, inst = generate_tile(self.seed, index, self.image_shape, self.density)
        return Sample(
            image=img, mask=(inst > 0).astype(np.uint8), instances=inst, case_id=case_id, source=f"<synthetic {case_id}>"
        )
