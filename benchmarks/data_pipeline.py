"""Data pipeline: augmented training patches per second into a batch on the device, per source, aug and workers.

Sources, measured one after the other for each (aug, workers) cell so every ratio is side by side:

* ``folder``: the normal path: the DataModule reads the folder of image files at setup and crops in memory
  (``InMemorySource``);
* ``store``: the same images in an HDF5 patch store (one whole image per chunk, gzip), read crop by crop
  through ``PatchStoreSource.crop`` with the folder's sampling rule, so for the same keys both give the
  *same* patches (checked in the result: ``same_patches``) and the pair isolates the storage cost;
* ``store_patches``: the store as ``histoseg-data build`` lays it out (``patch_size`` patches, one per chunk,
  gzip) through the DataModule's own ``patch_store`` path (different random patches, same images).

``gpu_aug`` rows: workers only crop (``aug=none``) and ``histoseg.aug.gpu.BatchAug`` (``conf/gpu_aug``)
augments the batch on the device (on a CPU-only machine: in the main process, on the CPU).

Every batch is moved to the device (pinned memory on CUDA) before it counts. On a CPU the main process runs
with ``main_threads`` (1) intra-op threads, like the workers: on a shared, loaded CPU, two-thread parallel
regions of small tensor ops each wait for a scheduler time slice (measured at 100x slower per patch), which
would measure the machine's other tenants rather than the pipeline. Workers prefetch, so the rate
is taken from batch arrival times after ``1 + 2 x workers`` batches (the prefetch queue) have been consumed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Options, clock, compose, module_main, progress, rate, ratio

FULL = dict(dataset="monuseg", patch_size=256, batch_size=8, augs=["none", "light", "seed_brecahad", "strong"],
            workers=[0, 1, 2], gpu_augs=["light", "stain"], batches=6, store_patches_per_image=20, main_threads=1)
QUICK = dict(dataset="tcia_nuclei", patch_size=64, batch_size=4, augs=["none", "light"], workers=[0],
             gpu_augs=["light"], batches=2, store_patches_per_image=2, main_threads=1)


class SameKeysStoreSource:
    """Crops from a whole-image patch store (one stored patch per image) drawn with ``InMemorySource``'s rule,
    so ``PatchDataset`` gives the same patches for the same keys as over the folder (only storage differs)."""

    def __init__(self, store_source, folder_source):
        self.store = store_source
        self.p = np.asarray(folder_source.p)
        index = {cid: i for i, cid in enumerate(store_source.case_ids)}  # one patch per image, sorted ids
        missing = [s.case_id for s in folder_source.samples if s.case_id not in index]
        if missing:
            raise ValueError(f"{store_source.path}: no stored image for {missing[:3]}")
        self.index = [index[s.case_id] for s in folder_source.samples]
        self.shapes = [s.image.shape[:2] for s in folder_source.samples]
        self.has_instances = store_source.has_instances

    def patch(self, rng: np.random.Generator, shape: tuple[int, int]):
        i = int(rng.choice(len(self.index), p=self.p))  # the InMemorySource draw, value for value
        h, w = self.shapes[i]
        ph, pw = shape
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        return self.store.crop(self.index[i], y, x, shape)


def settings(opts: Options) -> dict:
    s = dict(QUICK if opts.quick else FULL)
    s.update({k: v for k, v in opts.extra.items() if k in s})
    return s


def datamodule(s: dict, opts: Options, out: Path, **kwargs):
    from histoseg.tasks.train import build_datamodule
    from histoseg.tasks.utils import build

    per_epoch = s["batch_size"] * (s["batches"] + 2 * max(s["workers"]) + 8)
    cfg = compose([f"dataset={s['dataset']}", f"patch_size={s['patch_size']}", "aug=none", "seed=0",
                   f"dataset.batch_size={s['batch_size']}", f"dataset.samples_per_epoch={per_epoch}",
                   "dataset.persistent_workers=false"], out)
    dm = build(cfg.dataset, "dataset", **kwargs) if kwargs else build_datamodule(cfg)
    return dm, cfg


def whole_image_store(dm, opts: Options):
    """An HDF5 store holding the training images themselves (one per chunk); built once, then reused."""
    from histoseg.data.patch_store import PatchStore

    samples = dm.train_set.source.samples
    shapes = {s.image.shape[:2] for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"the whole-image store needs equally sized training images, got sizes {sorted(shapes)}")
    store = PatchStore(dir=Path(opts.cache_dir) / "patch_stores", patches_per_image=1, patch_shape=shapes.pop(),
                       pad=0, compression="gzip", compression_opts=4, seed=0, progress=False)
    t = time.perf_counter()
    path = store.ensure(dm.reader, dm.split["train"], samples=samples)
    return store.source(path), time.perf_counter() - t


def build_aug(name: str, group: str, out: Path):
    import hydra

    cfg = compose([f"{group}={name}", "seed=0"], out)
    return hydra.utils.instantiate(cfg[group])


def loader(dm, source, aug, workers: int):
    """The DataModule's own train loader over ``source`` with ``aug`` and ``workers``."""
    from histoseg.data.datasets import PatchDataset

    dm.train_set = PatchDataset(source, dm.patch_shape, dm.samples_per_epoch, aug, dm.seed, dm.targets)
    dm.num_workers, dm.persistent_workers = int(workers), False
    return dm.train_dataloader()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def patches_per_second(dl, workers: int, batches: int, device: torch.device, gpu_aug=None) -> float:
    """Patches/s from batch arrival times, after the prefetch queue (1 + 2 x workers batches) is drained."""
    skip = 1 + 2 * workers
    it = iter(dl)
    times, size = [], None
    try:
        for i in range(skip + batches + 1):
            b = to_device(next(it), device)
            if gpu_aug is not None:
                b = gpu_aug(b, 0, 0, i)
            size = b["image"].shape[0]
            times.append(clock(device))
    finally:
        del it
    return rate(batches * size, times[-1] - times[skip])


def same_patches(a, b, n: int) -> bool:
    """``a[key] == b[key]`` for the first ``n`` keys (image, mask, instances)."""
    for k in range(n):
        x, y = a[(0, k)], b[(0, k)]
        for key in ("image", "mask", "instances"):
            if (key in x) != (key in y) or (key in x and not torch.equal(x[key], y[key])):
                return False
    return True


def run(opts: Options) -> dict:
    from histoseg.data.datasets import PatchDataset

    s = settings(opts)
    device = opts.torch_device
    if device.type == "cpu" and s["main_threads"]:
        torch.set_num_threads(int(s["main_threads"]))
    out = Path(opts.work_dir) / "data_pipeline"
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    dm, cfg = datamodule(s, opts, out)
    dm.prepare_data()
    dm.setup("fit")
    folder_setup_s = time.perf_counter() - t
    folder_src = dm.train_set.source
    store_src, store_build_s = whole_image_store(dm, opts)
    same_src = SameKeysStoreSource(store_src, folder_src)

    store_opts = dict(dir=str(Path(opts.cache_dir) / "patch_stores"), patches_per_image=s["store_patches_per_image"],
                      patch_shape=[s["patch_size"], s["patch_size"]], pad=0, compression="gzip",
                      compression_opts=4, seed=0, progress=False)
    t = time.perf_counter()
    dm_p, _ = datamodule(s, opts, out, patch_store=store_opts)
    dm_p.prepare_data()
    dm_p.setup("fit")
    patches_setup_s = time.perf_counter() - t
    patches_src = dm_p.train_set.source

    # the pair compares the same patches: check it on the strongest aug of the run
    strongest = build_aug(s["augs"][-1], "aug", out)
    check = same_patches(PatchDataset(folder_src, dm.patch_shape, 16, strongest, 0),
                         PatchDataset(same_src, dm.patch_shape, 16, strongest, 0), 8)

    sources = {"folder": (dm, folder_src), "store": (dm, same_src), "store_patches": (dm_p, patches_src)}
    rows, pairs = [], []
    for aug_name in s["augs"]:
        aug = build_aug(aug_name, "aug", out)
        for w in s["workers"]:
            cell = {}
            for src_name, (module, src) in sources.items():
                progress(f"data: aug={aug_name} workers={w} source={src_name}")
                cell[src_name] = patches_per_second(loader(module, src, aug, w), w, s["batches"], device)
                rows.append({"source": src_name, "aug": aug_name, "gpu_aug": None, "workers": w,
                             "patches_per_s": cell[src_name]})
            pairs.append({"aug": aug_name, "workers": w, "folder": cell["folder"], "store": cell["store"],
                          "store_patches": cell["store_patches"],
                          "store_vs_folder": ratio(cell["store"], cell["folder"]),
                          "store_patches_vs_folder": ratio(cell["store_patches"], cell["folder"])})
    gpu_pairs = []
    cpu_rate = {(r["aug"], r["workers"]): r["patches_per_s"] for r in rows if r["source"] == "folder"}
    for g in s["gpu_augs"]:
        gaug = build_aug(g, "gpu_aug", out)
        cpu_equiv = g if g in s["augs"] else None
        for w in s["workers"]:
            progress(f"data: aug=none gpu_aug={g} workers={w} source=folder")
            v = patches_per_second(loader(dm, folder_src, None, w), w, s["batches"], device, gpu_aug=gaug)
            rows.append({"source": "folder", "aug": "none", "gpu_aug": g, "workers": w, "patches_per_s": v})
            if cpu_equiv:
                gpu_pairs.append({"gpu_aug": g, "cpu_aug": cpu_equiv, "workers": w, "gpu_aug_patches_per_s": v,
                                  "cpu_aug_patches_per_s": cpu_rate[(cpu_equiv, w)],
                                  "gpu_vs_cpu": ratio(v, cpu_rate[(cpu_equiv, w)])})
    return {
        "settings": {**s, "device": str(device), "train_images": len(folder_src.samples),
                     "torch_threads": torch.get_num_threads()},
        "setup_s": {"folder_read_images": round(folder_setup_s, 2), "store_whole_images_ensure": round(store_build_s, 2),
                    "store_patches_setup": round(patches_setup_s, 2)},
        "same_patches": {"checked_keys": 8, "aug": s["augs"][-1], "identical": check},
        "rows": rows,
        "pairs": pairs,
        "gpu_aug_pairs": gpu_pairs,
        "notes": "patches/s of augmented patch_size crops delivered as a batch on the device; store = the folder's "
                 "images in one HDF5 file (one image per gzip chunk) read with the same keys, store_patches = the "
                 "`histoseg-data build` layout (patch_size patches, one per gzip chunk); ratios are store / folder "
                 "measured back to back; gpu_vs_cpu = (aug=none + gpu_aug) / (the same flips as CPU aug)",
    }


if __name__ == "__main__":
    module_main(run)
