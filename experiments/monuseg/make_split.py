#!/usr/bin/env python
"""Write the committed MoNuSeg split used by the MoNuSeg experiments.

Official test split (14 images) untouched. Validation = 4 training patients drawn (seed 0) among the 13
training images that have instance maps, so validation can score AJI / PQ and tune the instance
post-processing; the other 26 training images train.

    python experiments/monuseg/make_split.py   # -> histoseg/data/splits/monuseg_val4_instances.json
"""
import json
from pathlib import Path

import numpy as np

from histoseg.data.readers.monuseg import MoNuSegReader
from histoseg.utils.config import PROJECT_ROOT, data_root

reader = MoNuSegReader(root=Path(data_root()) / "monuseg")
official = reader.official_split()
with_inst = sorted(c for c in official["train"] if reader.read(c).instances is not None)
groups = sorted({reader.group_of(c) for c in with_inst})
rng = np.random.default_rng(0)
val_groups = set(rng.choice(groups, size=4, replace=False).tolist())
val = sorted(c for c in official["train"] if reader.group_of(c) in val_groups)
split = {
    "train": sorted(c for c in official["train"] if c not in val),
    "val": val,
    "test": sorted(official["test"]),
    "meta": {"dataset": "monuseg", "made_by": "experiments/monuseg/make_split.py", "seed": 0,
             "rule": "val = 4 patients (seed 0) among train images with instance maps"},
}
out = PROJECT_ROOT / "histoseg" / "data" / "splits" / "monuseg_val4_instances.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(split, indent=1) + "\n")
print(out, {k: len(v) for k, v in split.items() if k != "meta"})
