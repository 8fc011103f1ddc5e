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


def test_test_groups_are_the_test_split_and_leave_one_out_covers_every_group_once():
    r = StrataReader()
    groups = sorted({r.group_of(c) for c in r.case_ids()})[:6]
    seen = []
    for g in groups:
        sp = make_split(r, "random", 0, val_fraction=0.25, test_groups=[g])
        assert sp["test"] == [f"{g}_0", f"{g}_1"]  # the whole group, nothing else
        assert not set(sp["train"]) & set(sp["val"]) and not (set(sp["train"]) | set(sp["val"])) & set(sp["test"])
        assert len(sp["train"]) + len(sp["val"]) + 2 == len(r.case_ids())
        assert {r.group_of(c) for c in sp["train"]}.isdisjoint({r.group_of(c) for c in sp["val"]})
        seen += sp["test"]
    assert sorted(seen) == sorted(c for c in r.case_ids() if r.group_of(c) in groups)
    two = make_split(r, "random", 3, test_groups=["g007", "g002"])
    assert {r.group_of(c) for c in two["test"]} == {"g002", "g007"}
    assert make_split(r, "random", 3, test_groups="g007")["test"] == ["g007_0", "g007_1"]  # a bare string
    assert make_split(r, "random", 3, test_groups=["g007", "g007"])["test"] == ["g007_0", "g007_1"]  # named twice


def test_test_groups_refuse_unknown_groups_all_groups_and_the_official_strategy():
    from histoseg.data.io import DataError

    r = StrataReader()
    with pytest.raises(DataError, match=r"\['nope'\].*g000"):
        make_split(r, "random", 0, test_groups=["g001", "nope"])
    with pytest.raises(DataError, match="nothing is left"):
        make_split(r, "random", 0, test_groups=sorted({r.group_of(c) for c in r.case_ids()}))

    class Official(StrataReader):
        def official_split(self):
            return {"test": ["g000_0", "g000_1"]}

    with pytest.raises(ValueError, match="strategy=random"):
        make_split(Official(), "official", 0, test_groups=["g001"])


def test_split_file_refuses_test_leakage_and_warns_on_validation_inside_train(tmp_path, caplog):
    import json
    import logging

    from histoseg.data.io import DataError

    reader = StrataReader()
    f = tmp_path / "split.json"
    # g001_1 is not itself a test image, but its patient (group g001) is: refused like the image itself
    for train in (["g000_0", "g001_0"], ["g000_0", "g001_1"]):
        f.write_text(json.dumps({"train": train, "val": ["g002_0"], "test": ["g001_0"]}))
        with pytest.raises(DataError, match="test leakage"):
            make_split(reader, file=str(f))
    f.write_text(json.dumps({"train": ["g000_0"], "val": ["g002_0", "g001_1"], "test": ["g001_0"]}))
    with pytest.raises(DataError, match="val image"):
        make_split(reader, file=str(f))
    # validation inside train (a final model on every non-test image): allowed, with a warning naming the file
    f.write_text(json.dumps({"train": ["g000_0", "g002_0"], "val": ["g002_0"], "test": ["g001_0"]}))
    with caplog.at_level(logging.WARNING, logger="histoseg.data.splits"):
        split = make_split(reader, file=str(f))
    assert split == {"train": ["g000_0", "g002_0"], "val": ["g002_0"], "test": ["g001_0"]}
    assert any("also training images" in r.getMessage() and str(f) in r.getMessage() for r in caplog.records)
    caplog.clear()
    f.write_text(json.dumps({"train": ["g000_0"], "val": ["g002_0"], "test": ["g001_0"]}))
    with caplog.at_level(logging.WARNING, logger="histoseg.data.splits"):
        make_split(reader, file=str(f))
    assert not caplog.records
