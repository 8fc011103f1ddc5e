"""Deterministic, group-level splits, written as JSON beside the run and reusable.

A split never separates a group (patient / case): ids are grouped with ``reader.group_of`` first.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from histoseg.data.io import DataError, atomic_write_text

log = logging.getLogger(__name__)


def _groups(reader, ids: list[str]) -> dict[str, list[str]]:
    g: dict[str, list[str]] = {}
    for cid in ids:
        g.setdefault(reader.group_of(cid), []).append(cid)
    return g


def _take(groups: list[str], frac: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    order = list(rng.permutation(sorted(groups)))
    k = int(round(frac * len(order)))
    if frac > 0 and len(order) > 1:
        k = min(max(k, 1), len(order) - 1)
    return sorted(order[:k]), sorted(order[k:])


def _strata(reader, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """``{stratum: [group, ...]}``: a group's stratum is the most common ``reader.stratum_of`` among its cases
    (ties: the first in sorted order)."""
    out: dict[str, list[str]] = {}
    for g in sorted(groups):
        votes = Counter(map(reader.stratum_of, groups[g]))
        out.setdefault(max(sorted(votes), key=votes.__getitem__), []).append(g)
    return out


def make_split(
    reader,
    strategy: str = "official",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    fold: int | None = None,
    n_folds: int = 5,
    file: str | None = None,
    stratify_val: bool = False,
    test_groups: list[str] | None = None,
) -> dict[str, list[str]]:
    """Return ``{"train", "val", "test"}`` case-id lists.

    Args:
        strategy: ``official`` (the publisher's train/test; val carved from train) or ``random``
            (test carved from all groups).
        seed: RNG seed for every random choice (the same seed gives the same split).
        val_fraction / test_fraction: fractions of *groups*.
        fold: if set, cross-validation over the non-test groups: ``n_folds`` folds, ``fold`` is val.
        file: a split JSON written by an earlier run: used as-is (ids checked against the reader).
        stratify_val: draw the validation groups (or the folds) per stratum (``reader.stratum_of``, e.g.
            DSB2018's imaging modality), so validation, and so model selection and post-processing tuning, sees
            every kind of image in its share. The test draw is unchanged: the same ``seed`` gives the same test
            images with or without it.
        test_groups: with ``strategy=random``, these groups (``reader.group_of``: patients / cases) are the test
            split instead of a random ``test_fraction`` of the groups; train / val are drawn from the rest as usual.
            One run per group gives leave-one-group-out test folds (e.g. BreCaHAD's four kit cases).
    """
    ids = reader.case_ids()
    if not ids:
        raise DataError(f"{reader.name}: no images found under {reader.root}")
    if file:
        p = Path(file)
        if not p.is_file():
            raise DataError(f"{p}: split file not found")
        split = json.loads(p.read_text())
        missing = sorted(set(sum((split.get(k, []) for k in ("train", "val", "test")), [])) - set(ids))
        if missing:
            raise DataError(f"{p}: split names {len(missing)} ids the reader does not have, e.g. {missing[:3]}")
        out = {k: list(split.get(k, [])) for k in ("train", "val", "test")}
        _check_file_split(reader, out, p)
        return out

    rng = np.random.default_rng(seed)
    official = reader.official_split() if strategy == "official" else None
    if strategy not in ("official", "random"):
        raise ValueError(f"split strategy must be 'official' or 'random', got {strategy!r}")
    if strategy == "official" and official is None:
        raise DataError(f"{reader.name}: the dataset defines no official split; use split.strategy=random")
    if strategy == "official" and test_groups is not None:
        raise ValueError("split.test_groups replaces the random test draw; with split.strategy=official the "
                         "publisher's test set is used: set split.strategy=random to choose the test groups")
    if official is not None:
        test = sorted(official.get("test", []))
        rest = [i for i in ids if i not in set(test)]
        if "val" in official and fold is None:
            val = sorted(official["val"])
            return {"train": sorted(i for i in rest if i not in set(val)), "val": val, "test": test}
    else:
        g_all = _groups(reader, ids)
        if test_groups is not None:
            # a set: a group named twice must not put its cases twice into the test list
            test_groups = {str(g) for g in ([test_groups] if isinstance(test_groups, str) else test_groups)}
            unknown = sorted(test_groups - set(g_all))
            if unknown or not test_groups:
                raise DataError(f"{reader.name}: split.test_groups {unknown or '[]'} name no group of the data; "
                                f"its groups are {sorted(g_all)[:20]}{' ...' if len(g_all) > 20 else ''}")
            if len(test_groups) == len(g_all):
                raise DataError(f"{reader.name}: split.test_groups takes every group; nothing is left to train on")
        else:
            test_groups, _ = _take(list(g_all), test_fraction, rng)
        test = sorted(c for g in test_groups for c in g_all[g])
        rest = [i for i in ids if i not in set(test)]
    g_rest = _groups(reader, rest)
    if fold is not None:
        if not 0 <= int(fold) < n_folds:
            raise ValueError(f"fold must be in [0, {n_folds - 1}] for n_folds={n_folds}, got {fold}")
        if len(g_rest) < n_folds:
            raise DataError(f"{reader.name}: {len(g_rest)} groups cannot make {n_folds} folds")
    # after the checks: a reader's stratum_of may read every image (DSB2018's modality)
    strata = _strata(reader, g_rest) if stratify_val else {"": sorted(g_rest)}
    val_groups = []
    for name in sorted(strata):  # one stratum without stratify_val: the plain draw, same RNG use as before
        if fold is not None:
            val_groups += list(rng.permutation(strata[name]))[int(fold) :: n_folds]
        else:
            val_groups += _take(strata[name], val_fraction, rng)[0]
    val = sorted(c for g in val_groups for c in g_rest[g])
    train = sorted(i for i in rest if i not in set(val))
    return {"train": train, "val": val, "test": test}


def _check_file_split(reader, split: dict[str, list[str]], path: Path) -> None:
    """A hand-written split may not put a test image, or a test image's group (patient / case), into train or
    val: that is test leakage, refused. Validation images also in train are allowed (a final model trained on
    every non-test image, validation then only monitoring), with a warning: checkpoint choice and threshold
    tuning on those images are no longer held out."""
    test_groups = _groups(reader, split["test"])
    for k in ("train", "val"):
        leaked = sorted(c for c in split[k] if reader.group_of(c) in test_groups)
        if leaked:
            raise DataError(f"{path}: {len(leaked)} {k} image(s) share a test image or its group (patient / case), "
                            f"e.g. {leaked[:3]}: test leakage")
    both = sorted(set(split["train"]) & set(split["val"]))
    if both:
        log.warning("%s: %d validation image(s) are also training images (e.g. %s): validation only monitors; "
                    "choose a fixed epoch and tune post-processing on a model that did not train on them",
                    path, len(both), both[:3])


def save_split(split: dict[str, list[str]], path: str | Path, meta: dict | None = None) -> None:
    atomic_write_text(path, json.dumps({**split, "meta": meta or {}}, indent=1))
