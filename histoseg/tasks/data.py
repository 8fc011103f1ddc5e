"""``histoseg-data <command> dataset=<name>``: data preparation without training (``conf/data.yaml``).

Commands: ``build`` (HDF5 patch store of the training split), ``build-cellularity`` (derive the 4-class
cellularity set from BreCaHAD), ``check`` (validate and read every image, print a summary) and ``radius``
(BreCaHAD nucleus radius measured per class).
"""
from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from histoseg.data.io import DataError
from histoseg.tasks.utils import ConfigError, build
from histoseg.utils.logging import get_logger

log = get_logger(__name__)


def _datamodule(cfg: DictConfig):
    return build(cfg.dataset, "dataset")


def build_store(cfg: DictConfig) -> dict:
    """Build (or reuse) the patch store of the training split; returns its path and size."""
    from histoseg.data.patch_store import PatchStore

    dm = _datamodule(cfg)
    dm.prepare_data()
    train = dm.train_ids()  # the training split (cut to dataset.limit_train)
    dm.reader.check(train)
    store_cfg = dm.patch_store_cfg or OmegaConf.to_container(cfg.patch_store, resolve=True)
    store = PatchStore(**store_cfg)
    path = store.ensure(dm.reader, train)
    meta = store.read_meta(path)
    out = {"path": str(path), "n_patches": meta["n_patches"], "images": len(train),
           "bytes": path.stat().st_size, "has_instances": meta["has_instances"]}
    if not dm.patch_store_cfg:
        opts = json.dumps(store_cfg, separators=(",", ":")).replace('"', "")
        out["use_with"] = f"train.py dataset={cfg.dataset.name} 'dataset.patch_store={opts}'"
    return out


def build_cellularity(cfg: DictConfig) -> dict:
    """(Re)build the derived cellularity set of ``dataset=cellularity`` (``force=true`` rebuilds when fresh)."""
    from histoseg.data.readers.cellularity import CellularityReader

    dm = _datamodule(cfg)
    if not isinstance(dm.reader, CellularityReader) or dm.reader.build_from is None:
        raise ConfigError("build-cellularity needs dataset=cellularity with dataset.reader.build_from set")
    dm.reader.prepare(force=bool(cfg.force))
    return {"path": str(dm.reader.root), "images": len(dm.reader.case_ids()), "split": {
        k: len(v) for k, v in dm.reader.official_split().items()}}


def check(cfg: DictConfig) -> dict:
    """Prepare, split, validate and read every image of the dataset; a summary of what was found."""
    dm = _datamodule(cfg)
    dm.prepare_data()
    dm.setup(None)
    split = dm.resolve_split()
    counts = np.zeros(dm.num_classes, np.int64)
    sizes = []
    for s in dm._read(split["train"]):
        counts += np.bincount(s.mask.ravel(), minlength=dm.num_classes)[: dm.num_classes]
        sizes.append(s.image.shape[:2])
    frac = counts / max(counts.sum(), 1)
    return {
        "dataset": dm.name, "root": str(dm.reader.root), "split": {k: len(v) for k, v in split.items()},
        "groups": len({dm.reader.group_of(c) for c in dm.reader.case_ids()}),
        "train_class_fraction": {n: round(float(f), 4) for n, f in zip(dm.class_names, frac)},
        "train_image_hw_min": [int(min(s[0] for s in sizes)), int(min(s[1] for s in sizes))],
        "train_image_hw_max": [int(max(s[0] for s in sizes)), int(max(s[1] for s in sizes))],
        "instances": dm.train_set.source.has_instances,
    }


def radius(cfg: DictConfig) -> dict:
    """Nucleus radius (px) per class, measured under BreCaHAD's points (see ``estimate_nucleus_radius``)."""
    from histoseg.data.readers.brecahad import BreCaHADReader, estimate_nucleus_radius

    dm = _datamodule(cfg)
    if not isinstance(dm.reader, BreCaHADReader):
        raise ConfigError(f"radius needs dataset=brecahad, got dataset={cfg.dataset.name}")
    ids = dm.reader.case_ids()
    dm.reader.check(ids)
    return {"images": len(ids), **estimate_nucleus_radius(dm.reader, ids, ("tumor", "non_tumor", "mitosis", "apoptosis"))}


COMMANDS: dict[str, Callable[[DictConfig], dict]] = {
    "build": build_store,
    "build-cellularity": build_cellularity,
    "check": check,
    "radius": radius,
}


def run(cfg: DictConfig) -> dict:
    """Hydra entry of ``histoseg-data``: run ``cfg.command`` and print its result as JSON."""
    command = cfg.get("command")
    if command not in COMMANDS:
        raise ConfigError(f"unknown data command {command!r}; available: {', '.join(COMMANDS)}")
    try:
        result = COMMANDS[command](cfg)
    except DataError as e:
        log.error("%s", e)
        raise
    print(json.dumps(result, indent=1, default=str), flush=True)
    return result
