#!/usr/bin/env python
"""Whole-image test Dice of DSB2018 runs split by imaging modality (issue 6 analysis).

    python experiments/nuclei/by_modality.py logs/exp/nuclei_strong_full/seed_0 logs/exp/nuclei_multimodal/seed_0

DSB2018 stage 1 mixes dark-background fluorescence with light-background brightfield / H&E. Each test image of a
run's ``per_image.csv`` is classed from its raw RGB image by the reader's ``stratum_of``
(:func:`histoseg.data.readers.nuclei.modality`: fluorescence when the mean intensity is below 100 and the mean
per-pixel saturation (max - min over RGB) below 10 (grey-scale, dark), otherwise brightfield / H&E); the same
classes that ``dataset.split.stratify_val=true`` stratifies the validation draw by.
Prints, per run, the number of images and the mean Dice of each class as JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders holding per_image.csv")
    ap.add_argument("--root", type=Path, default=None, help="the dsb2018 folder (default: <data root>/dsb2018)")
    a = ap.parse_args(argv)

    from histoseg.data.readers.nuclei import DSB2018Reader
    from histoseg.utils.config import data_root

    reader = DSB2018Reader(a.root or Path(data_root()) / "dsb2018")
    out = {}
    for run in a.runs:
        with (run / "per_image.csv").open() as f:
            rows = list(csv.DictReader(f))
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(reader.stratum_of(r["case_id"]), []).append(float(r["dice"]))
        out[str(run)] = {k: {"n": len(v), "dice": round(float(np.mean(v)), 3)} for k, v in sorted(groups.items())}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
