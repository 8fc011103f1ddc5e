"""torch Datasets shared by every DataModule: random training patches and whole images.

Randomness is a pure function of ``(seed, epoch, index)`` (the sampler passes the epoch), so a run
resumed from a checkpoint sees exactly the patches and augmentations of an uninterrupted run, whatever
the number of workers.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from histoseg.data.sample import Sample


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else those of the initialised process group, else ``(0, 1)``."""
    if rank is None or world_size is None:
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if on else 0) if rank is None else rank
        world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


class EpochSampler(Sampler):
    """Yields ``(epoch, i)`` patch keys; Lightning calls ``set_epoch`` every epoch.

    Under DDP each rank takes a disjoint block of ``length // world_size`` indices, so the ranks together
    draw the same patches as one process would (up to the remainder) and never the same patch twice.
    ``rank`` / ``world_size`` default to the initialised process group (single process: 0 / 1).
    """

    def __init__(self, length: int, rank: int | None = None, world_size: int | None = None):
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.total, self.epoch = int(length), 0
        self.length = self.total // self.world_size
        if self.length < 1:
            raise ValueError(f"samples_per_epoch={self.total} is smaller than the number of processes {self.world_size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        start = self.rank * self.length
        return iter((self.epoch, i) for i in range(start, start + self.length))

    def __len__(self) -> int:
        return self.length


class ShardSampler(Sampler):
    """Whole-image indices split across DDP ranks (``rank::world_size``), each rank getting the same count.

    Real images are plain indices. Ranks whose share is one short get a padding key ``(0, True)``:
    :class:`WholeImageDataset` marks that item ``padding`` and the tasks skip it, so every image is scored
    exactly once (no duplicates in the synced metrics or the per-image report) while every rank runs the
    same number of steps (DDP forwards are collective). A single process never sees a padding key.
    """

    def __init__(self, length: int, rank: int | None = None, world_size: int | None = None):
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self.total = int(length)
        self.length = -(-self.total // self.world_size)

    def __iter__(self):
        own = list(range(self.rank, self.total, self.world_size))
        return iter(own + [(0, True)] * (self.length - len(own)))

    def __len__(self) -> int:
        return self.length


class InMemorySource:
    """Random patches from images held in memory (optionally reflect-padded first)."""

    def __init__(self, samples: Sequence[Sample], pad: int = 0, weighting: str = "area"):
        self.samples = list(samples)
        self.pad = int(pad)
        areas = np.array([s.image.shape[0] * s.image.shape[1] for s in self.samples], np.float64)
        self.p = areas / areas.sum() if weighting == "area" else np.full(len(areas), 1 / len(areas))
        # instance maps may exist for some images only (MoNuSeg train: 13 of 30); patches of the others
        # carry an all-zero map flagged invalid, and instance targets mask them out
        self.has_instances = any(s.instances is not None for s in self.samples)
        if self.pad:
            p = self.pad
            pad = ((p, p), (p, p))
            for s in self.samples:
                s.image = np.pad(s.image, pad + ((0, 0),), mode="reflect")
                s.mask = np.pad(s.mask, pad, mode="reflect")
                if s.instances is not None:
                    s.instances = np.pad(s.instances, pad, mode="reflect")

    def __len__(self) -> int:
        return len(self.samples)

    def patch(self, rng: np.random.Generator, shape: tuple[int, int]):
        s = self.samples[int(rng.choice(len(self.samples), p=self.p))]
        h, w = s.image.shape[:2]
        ph, pw = shape
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        sl = (slice(y, y + ph), slice(x, x + pw))
        inst = s.instances[sl] if s.instances is not None else None
        return s.image[sl], s.mask[sl], inst, s.case_id


class PatchDataset(Dataset):
    """Random ``patch_shape`` crops from a source, augmented, as the batch dict of the DataModule contract.

    Keys: ``image`` float32 (3,H,W) in [0,1]; ``mask`` int64 (H,W); ``instances`` int32 (H,W) when the source
    has them; extra target maps from ``targets``; ``case_id``.
    """

    def __init__(
        self,
        source,
        patch_shape: tuple[int, int],
        length: int,
        aug: Callable | None = None,
        seed: int = 0,
        targets: Callable | None = None,
    ):
        self.source, self.patch_shape, self.length = source, tuple(patch_shape), int(length)
        self.aug, self.seed, self.targets = aug, int(seed), targets

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        epoch, idx = key if isinstance(key, tuple) else (0, int(key))
        rng = np.random.default_rng([self.seed, epoch, idx])
        img, mask, inst, cid = self.source.patch(rng, self.patch_shape)
        if self.aug is not None:
            self.aug.set_random_state(np.random.default_rng(rng.integers(2**62)), random.Random(int(rng.integers(2**62))))
            masks = [mask] if inst is None else [mask, inst]
            out = self.aug(image=img, masks=masks)
            img, masks = out["image"], out["masks"]
            mask, inst = masks[0], (masks[1] if inst is not None else None)
        if img.shape[:2] != self.patch_shape:
            raise ValueError(
                f"augmentation changed the patch shape from {self.patch_shape} to {img.shape[:2]}; transforms "
                "that resize must end at the configured patch_size"
            )
        item = {
            "image": to_tensor_image(img),
            "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
            "case_id": cid,
        }
        known = inst is not None
        if known:
            item["instances"] = torch.from_numpy(np.ascontiguousarray(inst).astype(np.int32))
        elif getattr(self.source, "has_instances", False):
            item["instances"] = torch.zeros(self.patch_shape, dtype=torch.int32)
        if self.targets is not None:
            item.update(self.targets(item["mask"], item["instances"] if known else None, known))
        return item


class WholeImageDataset(Dataset):
    """Whole images for validation / test (batch size 1: images may differ in size)."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        i, padding = key if isinstance(key, tuple) else (int(key), False)
        s = self.samples[i]
        item = {
            "image": to_tensor_image(s.image),
            "mask": torch.from_numpy(s.mask.astype(np.int64)),
            "case_id": s.case_id,
            "source": s.source,
        }
        if s.instances is not None:
            item["instances"] = torch.from_numpy(s.instances.astype(np.int32))
        if s.meta.get("nucleus_points") is not None:  # centre-point annotations: scored by detection metrics
            item["points"] = torch.as_tensor(np.asarray(s.meta["nucleus_points"], np.float32).reshape(-1, 2))
            item["point_radius"] = float(s.meta["point_radius"])
        if padding:
            item["padding"] = True  # a DDP filler (see ShardSampler): run, but do not score
        return item


def worker_init(_: int) -> None:
    # one BLAS/OpenMP thread per worker: workers decode and augment, the main process trains
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
