"""``HistoDataModule``: the one DataModule every dataset uses; datasets differ only by their reader.

Contract (every batch is a dict):

* ``image``: float32 ``(B, 3, H, W)`` in [0, 1]
* ``mask``: int64 ``(B, H, W)`` class indices (0 = background)
* ``instances``: int32 ``(B, H, W)`` nucleus ids, when the reader has instance maps
* target maps from the ``target`` config (e.g. ``dist``, ``hv``), when configured
* ``case_id``: list of str (and ``source`` for whole images)

Training batches are random ``patch_size`` crops; validation and test batches are whole images
(batch size 1), which the task predicts tile by tile, so ``val/dice`` is a whole-image number.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from histoseg.data.datasets import (
    EpochSampler,
    InMemorySource,
    PatchDataset,
    ShardSampler,
    WholeImageDataset,
    worker_init,
)
from histoseg.data.io import DataError
from histoseg.data.readers.base import Reader
from histoseg.data.sample import Sample
from histoseg.data.splits import make_split, save_split
from histoseg.utils.config import plain_dict

log = logging.getLogger(__name__)


class HistoDataModule(L.LightningDataModule):
    """Generic DataModule over a :class:`~histoseg.data.readers.base.Reader`.

    Args:
        reader: the dataset reader (built from ``dataset.reader`` in the config).
        name: dataset name (for logs and tags).
        num_classes: classes including background (2 = binary); must match the reader.
        patch_size: training patch side in pixels (the top-level ``patch_size`` key).
        batch_size: global batch size (divided across devices under DDP).
        samples_per_epoch: random patches per training epoch.
        num_workers / pin_memory / persistent_workers: DataLoader settings; ``pin_memory=None`` pins only when
            the trainer runs on CUDA (page-locked host memory makes the copy asynchronous; on CPU it is pure cost).
        aug: an albumentations ``Compose`` (from ``conf/aug``) applied to training patches only.
        split: keyword arguments of :func:`histoseg.data.splits.make_split` plus ``save_dir``.
        pad: reflect padding added around each training image before patches are drawn.
        patch_store: ``None`` or options of :class:`histoseg.data.patch_store.PatchStore` to draw training
            patches from an HDF5 database instead of the images.
        targets: optional callable ``(mask, instances) -> dict`` adding target maps (``conf/target``).
        seed: seed of patch sampling and augmentation.
        download: fetch the dataset (``reader.downloads``) into the data root if it is missing.
        limit_train: train on at most this many images of the training split (``None`` = all; quick checks
            of a large dataset, e.g. ``dataset.limit_train=2 trainer=debug``).
        limit_val / limit_test: use at most this many whole images (``None`` = all).
        stain_norm: ``None`` or ``reinhard``: normalise each training image (whole, before patches are drawn) to the
            training images' pooled colour statistics (:meth:`stain_reference`), the reference the task applies
            to whole images at inference with ``inference.stain_norm`` (``histoseg.tasks.train`` passes that value
            unless ``inference.stain_norm_train=false``). Validation / test images stay as read: the task
            normalises them.
        scale: the working resolution (``inference.scale``, passed by ``histoseg.tasks.train``): each training
            image is resized by this factor (after stain normalisation, before patches are drawn; masks by nearest
            neighbour, :mod:`histoseg.data.scale`), so ``patch_size`` counts working pixels. Validation / test
            images stay as read: the task resizes them for the network and its logits back.
    """

    def __init__(
        self,
        reader: Reader,
        name: str,
        num_classes: int,
        patch_size: int = 256,
        batch_size: int = 8,
        samples_per_epoch: int = 512,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        aug: Callable | None = None,
        split: dict | None = None,
        pad: int = 0,
        patch_store: dict | None = None,
        targets: Callable | None = None,
        seed: int = 0,
        download: bool = False,
        limit_val: int | None = None,
        limit_test: int | None = None,
        mpp: float | None = None,
        limit_train: int | None = None,
        stain_norm: str | None = None,
        scale: float = 1.0,
    ):
        super().__init__()
        self.reader, self.name = reader, name
        if int(num_classes) != reader.num_classes:
            raise ValueError(
                f"dataset {name!r}: num_classes={num_classes} but the reader defines {reader.num_classes} classes "
                f"{list(reader.class_names)}"
            )
        self.num_classes = int(num_classes)
        self.class_names = list(reader.class_names)
        self.mpp = mpp if mpp is not None else reader.mpp
        self.patch_shape = (int(patch_size), int(patch_size))
        self.batch_size, self.samples_per_epoch = int(batch_size), int(samples_per_epoch)
        self.num_workers = int(num_workers)
        self.pin_memory_cfg = None if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.aug, self.targets, self.seed = aug, targets, int(seed)
        # plain containers: the split settings go into split.json (a list such as test_groups included)
        self.split_cfg = plain_dict(split or {})
        self.pad, self.patch_store_cfg = int(pad), patch_store
        self.download, self.limit_val, self.limit_test = bool(download), limit_val, limit_test
        self.limit_train = limit_train
        if stain_norm:
            from histoseg.data.stain import check_method

            check_method(stain_norm)
            if patch_store:
                raise ValueError(f"dataset {name!r}: stain_norm={stain_norm} normalises whole training images, which "
                                 "a patch_store (patches cut once, in prepare_data) does not see; use one or the other")
        self.stain_norm = stain_norm or None
        from histoseg.data.scale import check_scale

        self.scale = check_scale(scale)
        if self.scale != 1.0 and patch_store:
            raise ValueError(f"dataset {name!r}: inference.scale={scale} resizes whole training images, which a "
                             "patch_store (patches cut once, in prepare_data, at the images' own size) does not see; "
                             "use one or the other")
        self._stain_ref: dict | None = None
        self.split: dict[str, list[str]] | None = None
        self._cache: dict[str, Sample] = {}
        self.train_set = self.val_set = self.test_set = None

    # ------------------------------------------------------------------ preparation
    def prepare_data(self) -> None:
        """Downloads, then builds the HDF5 patch store (when configured). Lightning calls this on one process
        per node, so DDP ranks never write the same store: in ``setup`` they find it up to date and open it."""
        if self.download and self.reader.downloads:
            from histoseg.data.download import ensure_dataset

            ensure_dataset(self.reader)
        self.reader.prepare()
        if self.patch_store_cfg:
            self._patch_store_path()

    def _patch_store_path(self, train: list[Sample] | None = None):
        """``(store, path)`` of the training images' patch store, built or refreshed if needed. ``train``: the
        already-read samples (setup); without them (prepare_data) images are read only if the store is built."""
        from histoseg.data.patch_store import PatchStore

        store = PatchStore(**self.patch_store_cfg)
        return store, store.ensure(self.reader, self.train_ids(), samples=train)

    def _read(self, ids: list[str]) -> list[Sample]:
        out = []
        for cid in ids:
            if cid not in self._cache:
                self._cache[cid] = self.reader.read(cid)
            s = self._cache[cid]
            if s.mask is None:
                raise DataError(f"{s.source}: image has no mask; cannot train or evaluate on it")
            out.append(s)
        return out

    def train_ids(self) -> list[str]:
        """The training images used: the split's ``train`` list, cut to ``limit_train``."""
        return self.resolve_split()["train"][: self.limit_train]

    def resolve_split(self) -> dict[str, list[str]]:
        if self.split is None:
            cfg = {k: v for k, v in self.split_cfg.items() if k != "save_dir"}
            cfg.setdefault("seed", self.seed)
            self.split = make_split(self.reader, **cfg)
            for k in ("train", "val"):
                if not self.split[k]:
                    raise DataError(f"dataset {self.name!r}: the {k} split is empty ({cfg})")
            save_dir = self.split_cfg.get("save_dir")
            if save_dir:
                meta = {"dataset": self.name, **cfg}
                if cfg.get("stratify_val"):  # what the stratification achieved, per part
                    meta["strata"] = {k: dict(sorted(Counter(map(self.reader.stratum_of, ids)).items()))
                                      for k, ids in self.split.items()}
                save_split(self.split, Path(save_dir) / "split.json", meta)
        return self.split

    def setup(self, stage: str | None = None) -> None:
        split = self.resolve_split()
        self.reader.check(split["train"] + split["val"] + split["test"])
        if stage in (None, "fit") and self.train_set is None:
            train = [self._copy(s) for s in self._read(self.train_ids())]
            if self.stain_norm:
                train = self._normalise_stain(train)
            if self.scale != 1.0:
                from histoseg.data.scale import rescale_sample

                train = [rescale_sample(s, self.scale) for s in train]
            self._check_samples(train, "train")
            source = self._train_source(train)
            self.train_set = PatchDataset(
                source, self.patch_shape, self.samples_per_epoch, self.aug, self.seed, self.targets
            )
            self._check_aug(self.train_set)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = WholeImageDataset(self._read(split["val"][: self.limit_val]))
        if stage in (None, "test") and self.test_set is None:
            ids = split["test"] or split["val"]
            if not split["test"]:
                log.warning("dataset %s has no test split: testing on the validation images", self.name)
            self.test_set = WholeImageDataset(self._read(ids[: self.limit_test]))

    @staticmethod
    def _copy(s: Sample) -> Sample:
        return Sample(
            image=s.image, mask=s.mask, case_id=s.case_id, instances=s.instances, group=s.group,
            source=s.source, meta=s.meta,
        )

    def _train_source(self, train: list[Sample]):
        if self.patch_store_cfg:
            store, path = self._patch_store_path(train)
            return store.source(path)
        return InMemorySource(train, pad=self.pad)

    def _check_samples(self, samples: list[Sample], stage: str) -> None:
        ph, pw = self.patch_shape
        for s in samples:
            h, w = s.image.shape[:2]
            if h + 2 * self.pad < ph or w + 2 * self.pad < pw:
                raise DataError(
                    f"{s.source}: image is {w}x{h} but patch_size is {pw} (pad {self.pad}); "
                    f"choose patch_size <= {min(h, w) + 2 * self.pad}"
                )
            bad = np.setdiff1d(np.unique(s.mask), np.arange(self.num_classes))
            if bad.size:
                raise DataError(
                    f"{s.source}: mask holds class values {bad.tolist()} outside 0..{self.num_classes - 1}"
                )

    def _check_aug(self, ds: PatchDataset) -> None:
        try:
            ds[(0, 0)]
        except DataError:
            raise
        except Exception as e:
            raise ValueError(f"dataset {self.name!r}: the training pipeline fails on its first patch: {e}") from e

    # ------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int | None, int | None]:
        """The trainer's global rank and world size (``None``: ask torch.distributed, see EpochSampler)."""
        if self.trainer is None:
            return None, None
        return self.trainer.global_rank, self.trainer.world_size

    @property
    def pin_memory(self) -> bool:
        """``pin_memory`` as configured; ``None``: only when the trainer's device (or, without one, torch) is CUDA."""
        if self.pin_memory_cfg is not None:
            return self.pin_memory_cfg
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _per_device_batch(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the number of devices {world}")
        return self.batch_size // world

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self._per_device_batch(),
            sampler=EpochSampler(len(self.train_set), *self._rank_world()),  # disjoint patch keys per rank
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=worker_init if self.num_workers else None,
            drop_last=True,
        )

    def _whole_loader(self, ds) -> DataLoader:
        # under DDP each rank scores its own share of the images; torchmetrics syncs the counts
        return DataLoader(ds, batch_size=1, sampler=ShardSampler(len(ds), *self._rank_world()), num_workers=0,
                          pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self._whole_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._whole_loader(self.test_set)

    def eval_dataloader(self, split: str = "test") -> DataLoader:
        """Whole images of one split (``test``, ``val``, ``train`` or ``all``) in batches of one, for ``histoseg-eval``.

        ``test`` and ``val`` are exactly what ``trainer.test`` / validation see (``limit_*`` applied); ``all`` is
        every image of the dataset (train + val + test, in that order), for scoring a model on an unseen source.
        """
        if split == "test":
            self.setup("test")
            return self.test_dataloader()
        if split == "val":
            self.setup("validate")
            return self.val_dataloader()
        if split == "train":
            return self._whole_loader(WholeImageDataset(self._read(self.train_ids())))
        if split == "all":
            sp = self.resolve_split()
            return self._whole_loader(WholeImageDataset(self._read([*sp["train"], *sp["val"], *sp["test"]])))
        raise ValueError(f"unknown split {split!r}; choose test, val, train or all")

    # ------------------------------------------------------------------ statistics
    def class_pixel_counts(self) -> np.ndarray:
        """Pixels per class over the training images (for w_i = N / N_i class weights)."""
        counts = np.zeros(self.num_classes, np.int64)
        for s in self._read(self.train_ids()):
            counts += np.bincount(s.mask.ravel(), minlength=self.num_classes)[: self.num_classes]
        return counts

    def _normalise_stain(self, train: list[Sample]) -> list[Sample]:
        from histoseg.data.stain import reinhard_normalize

        ref = self.stain_reference()
        if ref is None:
            raise DataError(f"dataset {self.name!r}: stain_norm={self.stain_norm} needs RGB training images")
        for s in train:  # copies: the cached samples keep the images as read
            s.image = reinhard_normalize(s.image, ref)
        log.info("%d training images normalised (%s) to the training set's colour statistics", len(train),
                 self.stain_norm)
        return train

    def stain_reference(self) -> dict | None:
        """The training images' colour statistics (:func:`histoseg.data.stain.reinhard_reference`, of the images as
        read), or ``None`` when they are not RGB: the reference ``inference.stain_norm`` normalises whole images to."""
        if self._stain_ref is not None:
            return self._stain_ref
        from histoseg.data.stain import reinhard_reference

        images = [s.image for s in self._read(self.train_ids())]
        if not images or any(im.ndim != 3 or im.shape[2] != 3 for im in images):
            return None
        ref = self._stain_ref = reinhard_reference(images)
        log.info("stain reference (L*a*b* mean %s, std %s) from %d training images of %s",
                 np.round(ref["mean"], 2).tolist(), np.round(ref["std"], 2).tolist(), len(images), self.name)
        return ref

    def state_dict(self) -> dict:
        return {"split": self.split}

    def load_state_dict(self, state: dict) -> None:
        if state.get("split") is not None:
            self.split = state["split"]
