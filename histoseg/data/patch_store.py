"""HDF5 patch store: fixed-size training patches cut once from a reader's images (the epithelium seed's database).

``PatchStore(dir, patches_per_image, patch_shape, pad, ...)`` materialises the training images of a split as
``patches_per_image`` random ``patch_shape`` patches per image (after ``pad`` px of reflect padding, so border
regions are trained on too) into ``<dir>/<reader>-<key>.h5``:

* datasets ``image`` ``(N, h, w, 3)`` uint8, ``mask`` ``(N, h, w)`` uint8, ``instances`` ``(N, h, w)`` int32 (when
  any image has an instance map; ``instance_known`` ``(N,)`` flags the patches whose image has one, as
  ``InMemorySource`` returns ``None`` for the others) and ``case_index`` ``(N,)``, chunked one patch per chunk and
  compressed with ``compression`` (``gzip`` / ``lzf`` / ``None``);
* attribute ``histoseg``: JSON metadata: format version, store parameters, the reader's name and settings, the
  case ids and the SHA-256 fingerprint of their source files (``Reader.fingerprint``).

``key`` hashes the parameters, reader settings and case ids, so a different fold or radius gets its own file.
``ensure`` reuses a file whose metadata matches and rebuilds it when the source files changed (fingerprint) or
the file is unreadable. A build writes a temporary file in the same folder and renames it into place only when
complete: a killed build never leaves a file that looks valid.

``PatchStore.source(path)`` gives the training patch source of ``HistoDataModule``: ``patch(rng, shape)`` draws
a random stored patch and a random ``shape`` crop inside it. Every process (DataLoader worker) opens its own
read-only h5py handle on first use, keyed by process id.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from histoseg.data.io import DataError, publish

log = logging.getLogger(__name__)

FORMAT = 2


def reader_settings(reader) -> dict:
    """The reader's public, JSON-serialisable settings (root, radius, classes, ...) for cache keys."""
    out = {"name": reader.name, "class_names": list(reader.class_names)}
    for k, v in sorted(vars(reader).items()):
        if k.startswith("_") or k == "downloads":
            continue
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


class PatchStore:
    """Builds and opens HDF5 patch stores (see the module docstring).

    Args:
        dir: folder of the ``.h5`` files (e.g. ``${paths.cache_dir}/patch_stores``).
        patches_per_image: random patches cut from each image.
        patch_shape: ``(h, w)`` of stored patches; training crops (``patch_size``) must fit inside.
        pad: reflect padding (px) added around each image before cutting.
        pad_mode: ``numpy.pad`` mode of that padding.
        compression: ``gzip``, ``lzf`` or ``None``; ``compression_opts``: the gzip level.
        seed: seed of the patch positions (image ``i`` uses ``default_rng([seed, i])``).
        progress: show a progress bar while building.
    """

    def __init__(
        self,
        dir: str | Path,
        patches_per_image: int = 100,
        patch_shape: tuple[int, int] | list[int] = (500, 500),
        pad: int = 0,
        pad_mode: str = "reflect",
        compression: str | None = "gzip",
        compression_opts: int | None = 4,
        seed: int = 0,
        progress: bool = True,
    ):
        self.dir = Path(dir)
        self.patches_per_image = int(patches_per_image)
        self.patch_shape = tuple(int(s) for s in patch_shape)
        if len(self.patch_shape) != 2 or min(self.patch_shape) < 1 or self.patches_per_image < 1:
            raise ValueError(f"patch store needs patch_shape [h, w] >= 1 and patches_per_image >= 1, got "
                             f"{list(patch_shape)} and {patches_per_image}")
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"patch store compression must be 'gzip', 'lzf' or null, got {compression!r}")
        self.pad, self.pad_mode = int(pad), pad_mode
        self.compression = compression
        self.compression_opts = int(compression_opts) if compression == "gzip" and compression_opts is not None else None
        self.seed, self.progress = int(seed), bool(progress)

    # ------------------------------------------------------------------ metadata
    def params(self) -> dict:
        return {
            "patches_per_image": self.patches_per_image, "patch_shape": list(self.patch_shape), "pad": self.pad,
            "pad_mode": self.pad_mode, "compression": self.compression, "compression_opts": self.compression_opts,
            "seed": self.seed,
        }

    def path_for(self, reader, case_ids: list[str]) -> Path:
        key = json.dumps({"format": FORMAT, "params": self.params(), "reader": reader_settings(reader),
                          "case_ids": sorted(case_ids)}, sort_keys=True)
        return self.dir / f"{reader.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.h5"

    def expected_meta(self, reader, case_ids: list[str]) -> dict:
        return {
            "format": FORMAT, "params": self.params(), "reader": reader_settings(reader),
            "case_ids": sorted(case_ids), "fingerprint": reader.fingerprint(sorted(case_ids)),
        }

    @staticmethod
    def read_meta(path: str | Path) -> dict | None:
        """The store's metadata, or ``None`` when the file is missing, unreadable or incomplete."""
        try:
            with h5py.File(path, "r") as f:
                meta = json.loads(f.attrs["histoseg"])
                return meta if meta.get("complete") else None
        except (OSError, KeyError, ValueError):
            return None

    # ------------------------------------------------------------------ build / reuse
    def ensure(self, reader, case_ids: list[str], samples=None) -> Path:
        """Path of an up-to-date store for ``case_ids`` of ``reader``: reused if it matches, (re)built if not.

        ``samples``: the already-read :class:`Sample` objects of ``case_ids`` (same order), to avoid reading
        the images twice.
        """
        if not case_ids:
            raise DataError(f"{reader.name}: no training images to build a patch store from")
        path = self.path_for(reader, case_ids)
        want = self.expected_meta(reader, case_ids)
        have = self.read_meta(path)
        if have is not None and all(have.get(k) == v for k, v in want.items()):
            log.info("patch store %s is up to date (%d patches); reusing it", path, have["n_patches"])
            return path
        if path.exists():
            why = "unreadable or incomplete" if have is None else (
                "its source files changed" if have.get("fingerprint") != want["fingerprint"] else "its settings differ")
            log.warning("patch store %s is stale (%s); rebuilding", path, why)
        self.build(path, reader, case_ids, want, samples)
        return path

    def build(self, path: Path, reader, case_ids: list[str], meta: dict, samples=None) -> None:
        ids = sorted(case_ids)
        by_id = {s.case_id: s for s in samples} if samples is not None else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        ph, pw = self.patch_shape
        n = len(ids) * self.patches_per_image
        try:
            with h5py.File(tmp, "w") as f:
                kw = {"compression": self.compression, "compression_opts": self.compression_opts}
                images = f.create_dataset("image", (n, ph, pw, 3), np.uint8, chunks=(1, ph, pw, 3), **kw)
                masks = f.create_dataset("mask", (n, ph, pw), np.uint8, chunks=(1, ph, pw), **kw)
                case_index = f.create_dataset("case_index", (n,), np.int32)
                known = f.create_dataset("instance_known", (n,), bool)  # patch comes from an image with instances
                inst_ds = None
                it = list(enumerate(ids))
                if self.progress:
                    from rich.progress import track

                    it = track(it, description=f"patch store {path.name}", transient=True)
                for i, cid in it:
                    s = by_id.get(cid) or reader.read(cid)
                    if s.mask is None:
                        raise DataError(f"{s.source}: image has no mask; cannot store training patches")
                    if s.instances is not None and inst_ds is None:  # created on the first image that has them
                        inst_ds = f.create_dataset("instances", (n, ph, pw), np.int32, chunks=(1, ph, pw),
                                                   fillvalue=0, **kw)
                    img, mask, inst = self._padded(s)
                    h, w = mask.shape
                    if h < ph or w < pw:
                        raise DataError(
                            f"{s.source}: image is {w}x{h} after padding by {self.pad} but the stored patch is "
                            f"{pw}x{ph}; increase patch_store.pad or lower patch_store.patch_shape"
                        )
                    rng = np.random.default_rng([self.seed, i])
                    ys = rng.integers(0, h - ph + 1, self.patches_per_image)
                    xs = rng.integers(0, w - pw + 1, self.patches_per_image)
                    for j, (y, x) in enumerate(zip(ys, xs)):
                        k = i * self.patches_per_image + j
                        images[k] = img[y : y + ph, x : x + pw]
                        masks[k] = mask[y : y + ph, x : x + pw]
                        if inst is not None:
                            inst_ds[k] = inst[y : y + ph, x : x + pw]
                    rows = slice(i * self.patches_per_image, (i + 1) * self.patches_per_image)
                    case_index[rows] = i
                    known[rows] = inst is not None
                done = {**meta, "complete": True, "n_patches": n, "has_instances": inst_ds is not None}
                f.attrs["histoseg"] = json.dumps(done)
            publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("patch store %s: %d patches of %dx%d from %d images", path, n, pw, ph, len(ids))

    def _padded(self, s):
        if not self.pad:
            return s.image, s.mask, s.instances
        p = self.pad
        pad2 = ((p, p), (p, p))
        img = np.pad(s.image, pad2 + ((0, 0),), mode=self.pad_mode)
        mask = np.pad(s.mask, pad2, mode=self.pad_mode)
        inst = np.pad(s.instances, pad2, mode=self.pad_mode) if s.instances is not None else None
        return img, mask, inst

    # ------------------------------------------------------------------ reading
    def source(self, path: str | Path) -> PatchStoreSource:
        return PatchStoreSource(path)


class PatchStoreSource:
    """Random training crops from a built store; the patch source of ``PatchDataset`` (like ``InMemorySource``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = PatchStore.read_meta(self.path)
        if meta is None:
            raise DataError(f"{self.path}: not a complete histoseg patch store (missing, unreadable or interrupted)")
        self.meta = meta
        self.case_ids: list[str] = list(meta["case_ids"])
        self.n = int(meta["n_patches"])
        self.stored_shape = tuple(meta["params"]["patch_shape"])
        self.has_instances = bool(meta["has_instances"])
        self._handles: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # h5py handles never cross processes
        return state

    def _file(self) -> h5py.File:
        pid = os.getpid()
        f = self._handles.get(pid)
        if f is None:
            f = self._handles[pid] = h5py.File(self.path, "r")
        return f

    def patch(self, rng: np.random.Generator, shape: tuple[int, int]):
        ph, pw = (int(s) for s in shape)
        sh, sw = self.stored_shape
        if ph > sh or pw > sw:
            raise DataError(f"{self.path}: stored patches are {sw}x{sh}, smaller than the requested crop {pw}x{ph}")
        i = int(rng.integers(self.n))
        y, x = int(rng.integers(0, sh - ph + 1)), int(rng.integers(0, sw - pw + 1))
        return self.crop(i, y, x, (ph, pw))

    def crop(self, i: int, y: int, x: int, shape: tuple[int, int]):
        """``(image, mask, instances or None, case_id)`` of stored patch ``i`` at ``(y, x)``, ``shape`` pixels
        (only the chunk of patch ``i`` is read)."""
        ph, pw = (int(s) for s in shape)
        f = self._file()
        sl = (int(i), slice(y, y + ph), slice(x, x + pw))
        image, mask = f["image"][sl], f["mask"][sl]
        inst = f["instances"][sl] if self.has_instances and f["instance_known"][i] else None
        return image, mask, inst, self.case_ids[int(f["case_index"][i])]

    def close(self) -> None:
        f = self._handles.pop(os.getpid(), None)
        if f is not None:
            f.close()
