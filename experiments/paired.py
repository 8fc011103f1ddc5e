#!/usr/bin/env python
"""Paired per-image comparison of runs scored on the same test images.

    python experiments/paired.py --base logs/exp/r1/nuclei_instance/seed_0 --new logs/exp/long24/nuclei_instance/seed_0 \
        --base logs/exp/r2/nuclei_instance/seed_1 --new logs/exp/long24b/nuclei_instance/seed_1 --metrics dice aji pq

Each ``--base`` is paired with the ``--new`` at the same position (for example the same training seed at two
budgets). Both runs' ``per_image.csv`` (written by the test step or ``histoseg-eval``) must list the same images
(``case_id``); a mismatch is an error naming both files, since a comparison on different images is meaningless.

For each pair and metric it reports both means, the mean difference (new - base), and on how many images the new
run is better / equal / worse. ``pooled`` first averages each image's difference over the pairs that scored it (so
an image shared by three seed pairs counts once, and the images stay independent), then reports the mean of those
per-image differences, the better / equal / worse counts and a two-sided Wilcoxon signed-rank p-value (zero
differences dropped; ``null`` when fewer than 6 are non-zero). Prints JSON; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np


class PairError(ValueError):
    """The runs cannot be compared image by image."""


def read_per_image(run: Path) -> dict[str, dict[str, float]]:
    """``case_id -> {metric: value}`` from ``run/per_image.csv`` (or the csv path itself)."""
    path = run / "per_image.csv" if run.is_dir() else run
    if not path.is_file():
        raise PairError(f"{path}: no per_image.csv (run the test step or histoseg-eval first)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "case_id" not in rows[0]:
        raise PairError(f"{path}: empty or without a case_id column")
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        cid = r.pop("case_id")
        if cid in out:
            raise PairError(f"{path}: image {cid!r} listed twice")
        out[cid] = {k: float(v) for k, v in r.items() if v not in ("", None)}
    return out


def check_same_images(base: dict, new: dict, names: tuple[str, str]) -> None:
    if set(base) != set(new):
        only_b, only_n = sorted(set(base) - set(new)), sorted(set(new) - set(base))
        raise PairError(f"{names[0]} and {names[1]} scored different images "
                        f"(only in the first: {only_b[:3]}{'...' if len(only_b) > 3 else ''}; "
                        f"only in the second: {only_n[:3]}{'...' if len(only_n) > 3 else ''})")


def summarise(d: np.ndarray) -> dict:
    """Mean difference and better / equal / worse counts of per-image differences ``new - base``."""
    return {"n": int(d.size), "diff": round(float(d.mean()), 4), "better": int((d > 0).sum()),
            "equal": int((d == 0).sum()), "worse": int((d < 0).sum())}


def compare(base: dict, new: dict, metric: str, names: tuple[str, str]) -> tuple[dict, dict[str, float]]:
    """Summary of ``new - base`` on ``metric`` over the images of two runs that scored the same images (see
    :func:`check_same_images`), and ``case_id -> difference``."""
    ids = sorted(base)
    for name, run in zip(names, (base, new)):
        missing = [i for i in ids if metric not in run[i] or math.isnan(run[i][metric])]
        if missing:
            raise PairError(f"{name}: no {metric!r} for {len(missing)} image(s), e.g. {missing[0]}")
    b = np.array([base[i][metric] for i in ids])
    n = np.array([new[i][metric] for i in ids])
    d = n - b
    counts = summarise(d)
    summary = {"n": counts.pop("n"), "base": round(float(b.mean()), 4), "new": round(float(n.mean()), 4), **counts}
    return summary, dict(zip(ids, d.tolist()))


def wilcoxon_p(d: np.ndarray) -> float | None:
    nz = d[d != 0]
    if nz.size < 6:
        return None
    from scipy.stats import wilcoxon

    return float(f"{wilcoxon(nz).pvalue:.2g}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, action="append", required=True, help="baseline run folder (repeatable)")
    ap.add_argument("--new", type=Path, action="append", required=True, help="compared run folder (repeatable)")
    ap.add_argument("--metrics", nargs="+", default=["dice", "aji", "pq"])
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    if len(a.base) != len(a.new):
        ap.error(f"{len(a.base)} --base but {len(a.new)} --new: give them in pairs")
    pairs, pooled = [], {m: {} for m in a.metrics}
    for base_dir, new_dir in zip(a.base, a.new):
        base, new = read_per_image(base_dir), read_per_image(new_dir)
        names = (str(base_dir), str(new_dir))
        check_same_images(base, new, names)
        entry = {"base": str(base_dir), "new": str(new_dir)}
        for m in a.metrics:
            entry[m], diffs = compare(base, new, m, names)
            for cid, v in diffs.items():
                pooled[m].setdefault(cid, []).append(v)
        pairs.append(entry)
    out = {"pairs": pairs, "pooled": {}}
    for m, per_image in pooled.items():
        d = np.array([np.mean(v) for v in per_image.values()])
        out["pooled"][m] = {**summarise(d), "wilcoxon_p": wilcoxon_p(d)}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out is not None:
        from histoseg.data.io import atomic_write_text

        atomic_write_text(a.out, text + "\n")
    return out


if __name__ == "__main__":
    try:
        main()
    except PairError as e:
        raise SystemExit(f"paired.py: {e}") from None
