"""Split drawing on a synthetic reader (no data): groups never split, strata in their share, folds partition."""
from __future__ import annotations

import pytest

from histoseg.data.splits import make_split


class StrataReader:
    """120 groups of 2 cases each; every fifth group is of kind "b", the rest of kind "a"."""

    name = "strata"
    root = "."

    def case_ids(self):
        return [f"g{g:03d}_{i}" for g in range(120) for i in range(2)]

    def group_of(self, cid):
        return cid.split("_")[0]

    def stratum_of(self, cid):
        return "b" if int(cid[1:4]) % 5 == 0 else "a"

    def official_split(self):
        return None


def kinds(reader, ids):
    return {k: len({reader.group_of(c) for c in ids if reader.stratum_of(c) == k}) for k in ("a", "b")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_val_holds_each_stratum_in_its_share_and_keeps_the_test_groups(seed):
    r = StrataReader()
    plain = make_split(r, "random", seed, val_fraction=0.25, test_fraction=0.2)
    strat = make_split(r, "random", seed, val_fraction=0.25, test_fraction=0.2, stratify_val=True)
    assert strat["test"] == plain["test"]
    assert set(strat["train"]) | set(strat["val"]) == set(plain["train"]) | set(plain["val"])
    assert not set(strat["train"]) & set(strat["val"])
    rest = kinds(r, strat["train"] + strat["val"])
    val = kinds(r, strat["val"])
    assert val == {k: round(0.25 * n) for k, n in rest.items()}
    for part in ("train", "val", "test"):  # groups are never separated
        groups = {r.group_of(c) for c in strat[part]}
        assert sum(len([c for c in strat[part] if r.group_of(c) == g]) for g in groups) == 2 * len(groups)
    assert make_split(r, "random", seed, val_fraction=0.25, test_fraction=0.2, stratify_val=True) == strat


def test_stratified_folds_partition_the_non_test_groups_with_each_stratum_spread():
    r = StrataReader()
    folds = [make_split(r, "random", 0, test_fraction=0.2, fold=k, n_folds=4, stratify_val=True) for k in range(4)]
    rest = set(folds[0]["train"]) | set(folds[0]["val"])
    vals = [set(f["val"]) for f in folds]
    assert all(f["test"] == folds[0]["test"] for f in folds)
    assert set().union(*vals) == rest and sum(map(len, vals)) == len(rest)
    n_b = kinds(r, list(rest))["b"]
    assert all(abs(kinds(r, list(v))["b"] - n_b / 4) <= 1 for v in vals)
