"""experiments/paired.py: per-image paired comparison of runs on the same test images (fixture per_image.csv)."""
import json
from pathlib import Path

import pytest

from tests.helpers_scripts import load_experiment_script

paired = load_experiment_script("paired")


def run_dir(tmp_path: Path, name: str, rows: dict[str, dict[str, float]]) -> Path:
    d = tmp_path / name
    d.mkdir()
    keys = sorted(next(iter(rows.values())))
    lines = ["case_id," + ",".join(keys)] + [f"{cid}," + ",".join(str(r[k]) for k in keys) for cid, r in rows.items()]
    (d / "per_image.csv").write_text("\n".join(lines) + "\n")
    return d


def test_pair_counts_means_and_pooled_average_per_image(tmp_path):
    ids = [f"img{i}" for i in range(8)]
    base1 = run_dir(tmp_path, "b1", {c: {"dice": 0.5, "aji": 0.4} for c in ids})
    # new1: better on 5 images (+0.1), equal on 1, worse on 2 (-0.05)
    new_d = [0.6] * 5 + [0.5] + [0.45] * 2
    new1 = run_dir(tmp_path, "n1", {c: {"dice": v, "aji": 0.4} for c, v in zip(ids, new_d)})
    base2 = run_dir(tmp_path, "b2", {c: {"dice": 0.7, "aji": 0.4} for c in ids})
    # new2: +0.3 on img0 only, so img0's pooled difference is (0.1 + 0.3) / 2 = 0.2, the others keep pair 1's
    new2 = run_dir(tmp_path, "n2", {c: {"dice": 1.0 if c == "img0" else 0.7, "aji": 0.4} for c in ids})
    out = paired.main(["--base", str(base1), "--new", str(new1), "--base", str(base2), "--new", str(new2),
                       "--metrics", "dice", "aji", "--out", str(tmp_path / "p.json")])
    p1 = out["pairs"][0]["dice"]
    assert (p1["n"], p1["better"], p1["equal"], p1["worse"]) == (8, 5, 1, 2)
    assert p1["diff"] == pytest.approx((5 * 0.1 - 2 * 0.05) / 8, abs=1e-4)
    assert p1["base"] == pytest.approx(0.5) and p1["new"] == pytest.approx(sum(new_d) / 8, abs=1e-4)
    p2 = out["pairs"][1]["dice"]
    assert (p2["better"], p2["equal"], p2["worse"]) == (1, 7, 0)
    pooled = out["pooled"]["dice"]
    expect = [(0.1 + 0.3) / 2] + [0.1 / 2] * 4 + [0.0] + [-0.05 / 2] * 2
    assert pooled["n"] == 8  # images, not images x pairs
    assert pooled["diff"] == pytest.approx(sum(expect) / 8, abs=1e-4)
    assert (pooled["better"], pooled["equal"], pooled["worse"]) == (5, 1, 2)
    assert 0 < pooled["wilcoxon_p"] < 1
    # identical aji everywhere: no non-zero difference, no test
    assert out["pooled"]["aji"]["wilcoxon_p"] is None and out["pooled"]["aji"]["equal"] == 8
    assert json.loads((tmp_path / "p.json").read_text()) == out


def test_different_images_are_refused_naming_both_runs(tmp_path):
    a = run_dir(tmp_path, "a", {"x": {"dice": 0.5}, "y": {"dice": 0.5}})
    b = run_dir(tmp_path, "b", {"x": {"dice": 0.5}, "z": {"dice": 0.5}})
    with pytest.raises(paired.PairError, match=r"a and .*b scored different images.*'y'.*'z'"):
        paired.main(["--base", str(a), "--new", str(b), "--metrics", "dice"])


def test_missing_metric_and_missing_file_are_named(tmp_path):
    a = run_dir(tmp_path, "a", {"x": {"dice": 0.5}})
    b = run_dir(tmp_path, "b", {"x": {"aji": 0.5}})
    with pytest.raises(paired.PairError, match=r"b: no 'dice'"):
        paired.main(["--base", str(a), "--new", str(b), "--metrics", "dice"])
    with pytest.raises(paired.PairError, match=r"nothing.*no per_image.csv"):
        paired.main(["--base", str(a), "--new", str(tmp_path / "nothing"), "--metrics", "dice"])


def test_unpaired_arguments_are_a_usage_error(tmp_path):
    a = run_dir(tmp_path, "a", {"x": {"dice": 0.5}})
    with pytest.raises(SystemExit):
        paired.main(["--base", str(a), "--base", str(a), "--new", str(a)])
