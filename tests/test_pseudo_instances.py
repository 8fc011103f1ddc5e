"""experiments/monuseg_instance_pseudo/make_pseudo.py: pseudo instance maps for mask-only training images."""
import json

import numpy as np
import torch
from PIL import Image

from histoseg.data.readers.monuseg import MoNuSegReader
from histoseg.data.targets import InstanceTargets
from histoseg.inference.postprocess import PostProcessor
from tests.helpers_scripts import load_experiment_script

mk = load_experiment_script("monuseg_instance_pseudo/make_pseudo")
PP = PostProcessor(instances="markers", marker_source="interior_distance", marker_threshold=0.7, min_marker_size=3,
                   min_size=20)


def discs(centres, shape=(64, 64), r=7):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)] = i
    return inst


def teacher_maps(inst):
    t = InstanceTargets(["three_class", "distance"])(torch.from_numpy(inst > 0), torch.from_numpy(inst))
    return {"interior": (t["seg"].numpy() == 1).astype(np.float16), "dist": t["dist"][0].numpy().astype(np.float16)}


def test_make_pseudo_splits_only_mask_only_images_and_scores_the_others(tmp_path):
    touching = discs(((20, 20), (20, 32), (45, 45)))  # two touching nuclei and one alone
    images = {"TCGA-AA-0001-01Z": (touching, False), "TCGA-AA-0002-01Z": (discs(((30, 20), (30, 32))), True)}
    kit, run = tmp_path / "kit", tmp_path / "teacher_train"
    for sub in ("train/images", "train/masks", "train/instances", "test/images", "test/masks", "maps"):
        (kit if sub != "maps" else run).joinpath(sub if sub != "maps" else "maps").mkdir(parents=True, exist_ok=True)
    for cid, (inst, annotated) in images.items():
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(kit / "train/images" / f"{cid}.png")
        Image.fromarray(((inst > 0) * 255).astype(np.uint8)).save(kit / "train/masks" / f"{cid}.png")
        if annotated:
            Image.fromarray(inst.astype(np.uint16)).save(kit / "train/instances" / f"{cid}.png")
        np.savez(run / "maps" / f"{cid}.npz", true_mask=(inst > 0).astype(np.uint8), true_instances=inst,
                 **teacher_maps(inst))
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(kit / "test/images/TCGA-BB-0003-01Z.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(kit / "test/masks/TCGA-BB-0003-01Z.png")
    (run / "summary.json").write_text(json.dumps({"postprocess": PP.config(), "checkpoint": "teacher.ckpt"}))

    out = tmp_path / "pseudo"
    rep = mk.main(["--maps", str(run), "--data-root", str(kit), "--out", str(out), "--report", str(tmp_path / "q.json")])
    assert sorted(p.name for p in out.iterdir()) == ["TCGA-AA-0001-01Z.png"]  # only the mask-only image
    assert rep["written"]["TCGA-AA-0001-01Z"] == {"nuclei": 3, "mask_components": 2}
    q = json.loads((tmp_path / "q.json").read_text())["quality"][str(run)]
    assert q["images"] == 1 and q["mean"]["aji"] > 0.98  # perfect teacher maps split a true map (up to the float16 maps)
    assert q["mask_components_mean"]["aji"] < 0.6  # the mask alone merges the pair

    s = MoNuSegReader(kit, instances_dir=out).read("TCGA-AA-0001-01Z")
    assert s.instances.max() == 3 and np.array_equal(s.instances > 0, touching > 0)
    owner = []
    for i in (1, 2, 3):  # each true nucleus is (up to the watershed line's pixels) one pseudo nucleus
        ids, n = np.unique(s.instances[touching == i], return_counts=True)
        assert n.max() >= 0.95 * n.sum()
        owner.append(ids[n.argmax()])
    assert len(set(owner)) == 3
