"""The real datasets through their configs (``conf/dataset/<name>.yaml``) on the data kit.

Per dataset: batch shapes, dtypes and value sets, whole-image validation items, group-disjoint seeded splits.
Then what each reader must get right: BreCaHAD discs land on the annotated points, the MoNuSeg XML rasterises
to the provided mask, the derived cellularity set matches its JSON, the epithelium single image is split
into disjoint regions and trains from the patch store.
"""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from histoseg.data.patch_store import PatchStoreSource
from histoseg.tasks.train import build_datamodule

pytestmark = pytest.mark.data

# dataset -> (num_classes, training images with instance maps: all / some / none, val item (H, W) or None if mixed)
EXPECT = {
    "epithelium": (2, "none", (500, 500)),
    "brecahad": (2, "all", (1024, 1360)),
    "nuclei": (2, "all", None),
    "monuseg": (2, "some", (1000, 1000)),  # only 13 of the 30 kit training images have instance maps
    "tcia_nuclei": (2, "all", (256, 256)),
    "cellularity": (4, "none", (1024, 1360)),
}
FAST = ["dataset.batch_size=4", "dataset.samples_per_epoch=8", "patch_size=128",
        "dataset.patch_store.patches_per_image=4"]


def datamodule(make_cfg, name, *overrides):
    fast = FAST if name == "epithelium" else FAST[:-1]
    dm = build_datamodule(make_cfg(f"dataset={name}", *fast, *overrides, base=[]))
    dm.prepare_data()
    return dm


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_datamodule_batches_and_splits(make_cfg, data_dir, tmp_path, name):
    k, has_inst, val_hw = EXPECT[name]
    dm = datamodule(make_cfg, name)
    dm.setup("fit")
    assert dm.num_classes == k == len(dm.class_names)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 128, 128)
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (4, 128, 128)
    assert set(batch["mask"].unique().tolist()) <= set(range(k))
    have = [s.instances is not None for s in dm._read(dm.split["train"])]
    assert {"all": all(have), "none": not any(have), "some": any(have) and not all(have)}[has_inst]
    if has_inst == "none":
        assert "instances" not in batch
    if has_inst == "all":
        assert batch["instances"].dtype == torch.int32
        assert torch.equal(batch["instances"] > 0, batch["mask"] > 0)
    if "instances" in batch:  # partial maps: patches of images without one carry zeros (or no key at all)
        assert batch["instances"].dtype == torch.int32
        assert not ((batch["instances"] > 0) & (batch["mask"] == 0)).any()
    split = dm.split
    assert set(batch["case_id"]) <= set(split["train"])
    # every class occurs in the training masks (binary: both; cellularity: all four)
    seen = set()
    for s in dm._read(split["train"]):
        seen |= set(np.unique(s.mask).tolist())
    assert seen == set(range(k))
    # whole-image validation items
    item = dm.val_set[0]
    h, w = item["mask"].shape
    assert item["image"].shape == (3, h, w) and item["mask"].dtype == torch.int64
    if val_hw is not None:
        assert (h, w) == val_hw
    # splits: disjoint, group-level, seeded and written beside the run
    groups = {part: {dm.reader.group_of(c) for c in ids} for part, ids in split.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert json.loads((tmp_path / "split.json").read_text())["train"] == split["train"]
    again = datamodule(make_cfg, name).resolve_split()
    assert again == split


def test_brecahad_discs_land_on_the_annotated_points(data_dir, tmp_path):
    from histoseg.data.readers.brecahad import BreCaHADReader, to_pixels

    cid = "Case_10-03"
    raw = json.loads((data_dir / "brecahad" / "groundTruth" / f"{cid}.json").read_text())
    # the point -> pixel maths on a known point: x by the width (1360), y by the height (1024)
    x0, y0 = raw["tumor"][0]["x"], raw["tumor"][0]["y"]
    np.testing.assert_allclose(to_pixels(np.array([[x0, y0]]), (1024, 1360))[0], [x0 * 1360, y0 * 1024])
    assert abs(x0 * 1360 - 112.0) < 1e-3 and abs(y0 * 1024 - 87.5) < 1e-3

    r = 16
    six = BreCaHADReader(data_dir / "brecahad", classes="six", radius=r).read(cid)
    binary = BreCaHADReader(data_dir / "brecahad", radius=r).read(cid)
    h, w = six.mask.shape
    pts = six.meta["points"]
    allpts = np.concatenate([v for v in pts.values() if len(v)])
    names = ("background", "mitosis", "apoptosis", "tumor", "non_tumor", "lumen", "non_lumen")
    checked = 0
    for cls, xy in pts.items():
        for x, y in xy:
            px, py = min(int(round(x)), w - 1), min(int(round(y)), h - 1)
            if cls not in ("lumen", "non_lumen"):
                assert binary.mask[py, px] == 1
            d = np.hypot(*(allpts - [x, y]).T)
            if np.sort(d)[1] <= 2 * r + 2 or not (r + 2 < x < w - r - 2 and r + 2 < y < h - r - 2):
                continue  # overlapping or clipped discs are not round
            assert names[six.mask[py, px]] == cls
            k = six.instances[py, px]
            ys, xs = np.nonzero(six.instances == k)
            assert abs(xs.mean() - x) < 0.5 and abs(ys.mean() - y) < 0.5  # centred on the sub-pixel point
            assert abs(len(xs) - np.pi * r * r) / (np.pi * r * r) < 0.03
            assert six.mask[py, int(round(x + r + 1))] == 0 and six.mask[int(round(y - r - 1)), px] == 0
            checked += 1
    assert checked >= 50
    # six-class priority where discs overlap: a mitosis point always shows mitosis
    for cid2 in ("Case_10-03", "Case_11-07", "Case_12-01"):
        s = BreCaHADReader(data_dir / "brecahad", classes="six", radius=40).read(cid2)
        for x, y in s.meta["points"]["mitosis"]:
            assert s.mask[min(int(round(y)), h - 1), min(int(round(x)), w - 1)] == 1
    # one instance per visible disc
    n_discs = sum(len(v) for k2, v in pts.items() if k2 not in ("lumen", "non_lumen"))
    assert 0.9 * n_discs <= binary.instances.max() <= n_discs


def test_monuseg_xml_rasterises_to_the_provided_mask(data_dir, tmp_path):
    from histoseg.data.io import read_image
    from histoseg.data.readers.monuseg import MoNuSegReader, parse_aperio_xml, rasterise

    xml = next((data_dir / "monuseg" / "xml_sample").glob("*.xml"))
    polys = parse_aperio_xml(xml)
    kit = MoNuSegReader(data_dir / "monuseg")

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    inst = rasterise(polys, (1000, 1000))
    scores = {cid: dice(inst > 0, kit.read(cid).mask > 0) for cid in kit.official_split()["test"]}
    owner = max(scores, key=scores.get)
    assert owner == xml.stem  # the XML belongs to the image of the same name ...
    assert scores[owner] >= 0.97  # ... and agrees with its mask
    assert sorted(scores.values())[-2] < 0.5  # no other image comes close
    provided = kit.read(owner).instances
    assert len(polys) == inst.max() == len(np.unique(provided)) - 1  # one instance per polygon

    # the official download layout (images + XML only) reads to the same mask
    for folder in ("MoNuSegTestData", "MoNuSeg 2018 Training Data/Tissue Images"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "MoNuSeg 2018 Training Data" / "Annotations").mkdir()
    shutil.copy(data_dir / "monuseg" / "test" / "images" / f"{owner}.jpg", tmp_path / "MoNuSegTestData")
    shutil.copy(xml, tmp_path / "MoNuSegTestData")
    train_id = "TCGA-XX-0000-01Z-00-DX1"
    shutil.copy(data_dir / "monuseg" / "test" / "images" / f"{owner}.jpg",
                tmp_path / "MoNuSeg 2018 Training Data" / "Tissue Images" / f"{train_id}.jpg")
    shutil.copy(xml, tmp_path / "MoNuSeg 2018 Training Data" / "Annotations" / f"{train_id}.xml")
    orig = MoNuSegReader(tmp_path)
    assert orig.official_split() == {"train": [train_id], "test": [owner]}
    orig.check(orig.case_ids())
    s = orig.read(owner)
    assert s.instances.max() == len(polys) and dice(s.mask > 0, kit.read(owner).mask > 0) >= 0.97
    assert np.array_equal(s.image, read_image(data_dir / "monuseg" / "test" / "images" / f"{owner}.jpg"))


def test_monuseg_official_split_and_patient_groups(data_dir):
    from histoseg.data.readers.monuseg import MoNuSegReader

    r = MoNuSegReader(data_dir / "monuseg")
    sp = r.official_split()
    assert len(sp["train"]) == 30 and len(sp["test"]) == 14 and not set(sp["train"]) & set(sp["test"])
    def has_instances(c):
        return any(f.parent.name == "instances" for f in r.source_files(c))

    assert sum(map(has_instances, sp["train"])) == 13 and all(map(has_instances, sp["test"]))
    assert r.read(sp["train"][0]).instances is None or has_instances(sp["train"][0])
    assert r.group_of("TCGA-HT-8564-01Z-00-DX1") == "TCGA-HT-8564"


def test_nuclei_default_split_is_80_10_10_and_folds_partition_the_rest(make_cfg, data_dir):
    dm = datamodule(make_cfg, "nuclei")
    sp = dm.resolve_split()
    n = sum(len(v) for v in sp.values())
    assert n == 590 and len(sp["test"]) == 59 and len(sp["val"]) == 59
    vals = []
    for k in range(5):
        f = datamodule(make_cfg, "nuclei", f"dataset.split.fold={k}").resolve_split()
        assert f["test"] == sp["test"]
        vals.append(set(f["val"]))
    assert sum(len(v) for v in vals) == n - 59 and len(set().union(*vals)) == n - 59


@pytest.mark.parametrize("case", ["Case_10", "Case_13"])
def test_brecahad_leave_one_case_out_tests_on_exactly_that_case(make_cfg, data_dir, case):
    sp = datamodule(make_cfg, "brecahad", f"dataset.split.test_groups=[{case}]").resolve_split()
    assert sp["test"] and all(c.startswith(case + "-") for c in sp["test"])
    cases = {part: {c.split("-")[0] for c in sp[part]} for part in ("train", "val")}
    assert case not in cases["train"] | cases["val"] and not cases["train"] & cases["val"]
    assert len(cases["val"]) == 1 and len(cases["train"]) == 2  # the kit's 4 cases: 2 train, 1 val, 1 test


def test_tcia_instances_split_touching_nuclei_into_components(data_dir):
    from histoseg.data.readers.tcia_nuclei import TCIANucleiReader

    r = TCIANucleiReader(data_dir / "tcia_nuclei")
    assert r.case_ids() == [str(i) for i in range(1, 11)]
    s = r.read("1")
    assert s.instances.max() == 71 and s.mask.max() == 1 and np.array_equal(s.instances > 0, s.mask > 0)


def test_derived_cellularity_matches_the_brecahad_json(make_cfg, data_dir, tmp_path):
    dm = datamodule(make_cfg, "cellularity")  # prepare_data builds the set into the test's cache dir
    root = dm.reader.root
    assert str(root).startswith(str(tmp_path))
    rows = {r["id"]: r for r in csv.DictReader(open(root / "cellularity.csv"))}
    assert len(rows) == 30
    sp = dm.reader.official_split()
    assert sorted(sp["train"] + sp["test"]) == sorted(rows) and sp["test"]
    groups = {dm.reader.group_of(c) for c in sp["test"]}
    assert not groups & {dm.reader.group_of(c) for c in sp["train"]}  # test cases held out whole
    for cid in ("Case_10-03", "Case_11-07", "Case_13-02"):
        js = json.loads((data_dir / "brecahad" / "groundTruth" / f"{cid}.json").read_text())
        s = dm.reader.read(cid)
        h, w = s.mask.shape
        r = rows[cid]
        assert int(r["n_tumour"]) == len(js["tumor"]) + len(js["mitosis"])
        assert int(r["n_non_tumour"]) == len(js["non_tumor"]) + len(js["apoptosis"])
        for p in js["tumor"] + js["mitosis"]:
            assert s.mask[min(round(p["y"] * h), h - 1), min(round(p["x"] * w), w - 1)] == 1
        for p in js["non_tumor"]:
            assert s.mask[min(round(p["y"] * h), h - 1), min(round(p["x"] * w), w - 1)] in (1, 2)
        t, n = int((s.mask == 1).sum()), int((s.mask == 2).sum())
        assert (t, n, int((s.mask == 3).sum())) == (int(r["tumour_px"]), int(r["non_tumour_px"]), int(r["boundary_px"]))
        assert float(r["cellularity"]) == pytest.approx(t / (t + n), abs=1e-6)


def test_epithelium_single_image_becomes_disjoint_regions_in_the_patch_store(make_cfg, data_dir):
    from histoseg.data.io import read_image

    dm = datamodule(make_cfg, "epithelium")
    ids = dm.reader.case_ids()
    assert ids == [f"12947_00004@r{r}c{c}" for r in range(2) for c in range(2)]
    assert len({dm.reader.group_of(c) for c in ids}) == 4
    full = read_image(data_dir / "epithelium" / "12947_00004.tif")
    tiles = {c: dm.reader.read(c).image for c in ids}
    top = np.concatenate([tiles[ids[0]], tiles[ids[1]]], axis=1)
    bottom = np.concatenate([tiles[ids[2]], tiles[ids[3]]], axis=1)
    assert np.array_equal(np.concatenate([top, bottom], axis=0), full)  # regions tile the image exactly
    dm.setup("fit")
    assert isinstance(dm.train_set.source, PatchStoreSource)
    assert dm.train_set.source.stored_shape == (500, 500) and len(dm.train_set.source) == 4 * len(dm.split["train"])
    assert dm.train_set.source.meta["params"]["pad"] == 500


# whole-image val + test on 1000-1360 px images take 20-70 s on 2 busy CPU cores: slow, except the 256 px crops
@pytest.mark.parametrize("name", [n if n == "tcia_nuclei" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(EXPECT)])
def test_fast_dev_run_on_real_data(make_cfg, data_dir, name):
    """`python train.py dataset=<name> trainer=debug` with a tiny UNet: one train, val and test step."""
    from histoseg.tasks.train import train

    fast = FAST if name == "epithelium" else FAST[:-1]
    cfg = make_cfg(f"dataset={name}", "trainer=debug", "model=unet", "model.net.width=8", "model.net.depth=3",
                   "inference.tile_shape=[128,128]", "trainer.enable_progress_bar=false", "logger=csv",
                   "dataset.limit_train=2", "dataset.limit_val=1", "dataset.limit_test=1", *fast, base=[])
    metrics, obj = train(cfg)
    assert len(obj["datamodule"].train_ids()) == min(2, len(obj["datamodule"].split["train"]))
    assert 0.0 <= float(metrics["val/dice"]) <= 1.0 and 0.0 <= float(metrics["test/dice"]) <= 1.0
    assert obj["datamodule"].num_classes == obj["model"].num_classes == EXPECT[name][0]
    # centre-point annotations (BreCaHAD) are also scored as detections; the other sets have no points
    assert ("test/det_f1" in metrics) == (name == "brecahad")
    if name == "brecahad":
        assert 0.0 <= float(metrics["test/det_f1"]) <= 1.0 and float(metrics["test/det_n_points"]) > 0


def test_split_follows_the_seed_unless_its_own_seed_is_fixed(make_cfg, data_dir):
    """Multi-seed experiments: ``seed=S`` alone redraws the random split; ``++dataset.split.seed=0`` keeps the
    seed-0 split (the same held-out images) while the run's seed still drives patch sampling."""
    base = datamodule(make_cfg, "nuclei", "seed=0").resolve_split()
    other = datamodule(make_cfg, "nuclei", "seed=1")
    assert other.resolve_split()["test"] != base["test"] and other.seed == 1
    pinned = datamodule(make_cfg, "nuclei", "seed=1", "++dataset.split.seed=0")
    assert pinned.resolve_split() == base and pinned.seed == 1


def test_stratified_val_keeps_the_test_images_and_gives_brightfield_its_share(make_cfg, data_dir, tmp_path):
    """``split.stratify_val`` (issue 6): DSB2018's validation draw per imaging modality. The test images are
    those of the plain split; validation holds each modality in its share of the non-test images."""
    plain = datamodule(make_cfg, "nuclei").resolve_split()
    dm = datamodule(make_cfg, "nuclei", "dataset.split.stratify_val=true")
    strat = dm.resolve_split()
    r = dm.reader
    assert strat["test"] == plain["test"] and strat["val"] != plain["val"]
    assert sorted(strat["train"] + strat["val"]) == sorted(plain["train"] + plain["val"])
    for kind in ("fluorescence", "brightfield_he"):
        rest = [c for c in strat["train"] + strat["val"] if r.stratum_of(c) == kind]
        in_val = sum(r.stratum_of(c) == kind for c in strat["val"])
        assert rest and in_val == round(0.111 * len(rest)), (kind, in_val, len(rest))
    assert r.stratum_of(plain["test"][0]) in ("fluorescence", "brightfield_he")
    written = json.loads((tmp_path / "split.json").read_text())  # the run folder records the per-part counts
    assert written["val"] == strat["val"] and written["meta"]["stratify_val"] is True
    assert written["meta"]["strata"]["val"] == {k: sum(r.stratum_of(c) == k for c in strat["val"])
                                                for k in ("brightfield_he", "fluorescence")}


def test_monuseg_instances_dir_splits_training_masks_only_and_must_match_the_mask(tmp_path):
    from PIL import Image

    from histoseg.data.io import DataError
    from histoseg.data.readers.monuseg import MoNuSegReader

    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:20] = 255  # two touching nuclei, merged in the binary mask
    split_map = np.zeros((32, 32), np.uint16)
    split_map[4:12, 4:12], split_map[4:12, 12:20] = 1, 2
    for part, cid in (("train", "TCGA-AA-0001-01Z"), ("test", "TCGA-BB-0002-01Z")):
        for sub in ("images", "masks"):
            (tmp_path / "kit" / part / sub).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "kit" / part / "images" / f"{cid}.png")
        Image.fromarray(mask).save(tmp_path / "kit" / part / "masks" / f"{cid}.png")
    extra = tmp_path / "pseudo"
    extra.mkdir()
    for cid in ("TCGA-AA-0001-01Z", "TCGA-BB-0002-01Z"):
        Image.fromarray(split_map).save(extra / f"{cid}.png")

    assert MoNuSegReader(tmp_path / "kit").read("TCGA-AA-0001-01Z").instances is None
    r = MoNuSegReader(tmp_path / "kit", instances_dir=extra)
    s = r.read("TCGA-AA-0001-01Z")
    assert np.array_equal(s.instances, split_map) and s.meta["instances_from"].endswith("TCGA-AA-0001-01Z.png")
    assert extra / "TCGA-AA-0001-01Z.png" in r.source_files("TCGA-AA-0001-01Z")
    assert r.read("TCGA-BB-0002-01Z").instances is None  # the test ground truth is never replaced

    bad = split_map.copy()
    bad[20, 20] = 3  # a nucleus the annotation does not have
    Image.fromarray(bad).save(extra / "TCGA-AA-0001-01Z.png")
    with pytest.raises(DataError, match=r"TCGA-AA-0001-01Z\.png: 1 pixels differ from the nucleus mask"):
        MoNuSegReader(tmp_path / "kit", instances_dir=extra).read("TCGA-AA-0001-01Z")
    with pytest.raises(DataError, match="instances_dir is not a folder"):
        MoNuSegReader(tmp_path / "kit", instances_dir=tmp_path / "nowhere").case_ids()
