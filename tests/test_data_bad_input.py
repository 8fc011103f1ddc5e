"""Bad input gives one clear DataError naming the file and the problem, at setup (before any training step).

Every reader gets a tiny synthetic dataset in tmp_path (a positive control proves it is valid), then one
defect at a time: corrupt image, image/mask size mismatch, missing label, unknown mask colour, bad JSON,
empty folder and wrong data root.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from histoseg.data import DataError, HistoDataModule
from histoseg.data.readers.brecahad import BreCaHADReader
from histoseg.data.readers.cellularity import CellularityReader, encode_cellularity_mask
from histoseg.data.readers.epithelium import EpitheliumReader
from histoseg.data.readers.monuseg import MoNuSegReader
from histoseg.data.readers.nuclei import DSB2018Reader
from histoseg.data.readers.tcia_nuclei import TCIANucleiReader

H = W = 48
SPLIT = {"strategy": "random", "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}


def _img(seed: int, shape=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)


def _mask(seed: int, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, (10 + seed, 20), 6, 255, -1)
    return m


def _write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, arr)
        return path
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), arr)
    return path


# ---------------------------------------------------------------------------------------------- fixtures
def make_epithelium(root: Path) -> dict:
    for i in range(4):
        _write(root / f"{i + 10}_1.tif", _img(i))
        _write(root / "masks" / f"{i + 10}_1_mask.png", _mask(i))
    return {"image": root / "11_1.tif", "label": root / "masks" / "11_1_mask.png", "images": root}


def make_brecahad(root: Path) -> dict:
    for i in range(4):
        cid = f"Case_{i + 1}-01"
        _write(root / "images" / f"{cid}.png", _img(i))
        pts = {"tumor": [{"x": 0.5, "y": 0.5}], "non_tumor": [{"x": 0.2, "y": 0.3}], "mitosis": [], "apoptosis": [],
               "lumen": [], "non_lumen": []}
        (root / "groundTruth").mkdir(parents=True, exist_ok=True)
        (root / "groundTruth" / f"{cid}.json").write_text(json.dumps(pts))
    return {"image": root / "images" / "Case_2-01.png", "label": root / "groundTruth" / "Case_2-01.json",
            "images": root / "images"}


def make_nuclei(root: Path) -> dict:
    for i in range(4):
        _write(root / "raw" / f"id{i}.png", _img(i))
        _write(root / "gt" / f"id{i}.png", _mask(i))
    return {"image": root / "raw" / "id1.png", "label": root / "gt" / "id1.png", "images": root / "raw"}


def make_monuseg(root: Path) -> dict:
    for i in range(5):
        split = "test" if i == 4 else "train"
        cid = f"TCGA-AA-{1000 + i}-01Z-00-DX1"
        _write(root / split / "images" / f"{cid}.png", _img(i))
        _write(root / split / "masks" / f"{cid}.png", _mask(i))
    cid = "TCGA-AA-1001-01Z-00-DX1"
    return {"image": root / "train" / "images" / f"{cid}.png", "label": root / "train" / "masks" / f"{cid}.png",
            "images": root / "train" / "images"}


def make_tcia(root: Path) -> dict:
    for i in range(4):
        _write(root / "images" / f"{i + 1}_crop.png", _img(i))
        _write(root / "annotations" / f"{i + 1}_labeled_mask_corrected.png", _mask(i))
    return {"image": root / "images" / "2_crop.png", "label": root / "annotations" / "2_labeled_mask_corrected.png",
            "images": root / "images"}


def make_cellularity(root: Path) -> dict:
    for i in range(5):
        split = "test" if i == 4 else "train"
        lab = np.zeros((H, W), np.uint8)
        cv2.circle(lab, (20, 20), 8, 3, -1)
        cv2.circle(lab, (20, 20), 6, 1 + i % 2, -1)
        _write(root / split / "input" / f"im{i}.png", _img(i))
        _write(root / split / "gt" / f"im{i}_gt.png", encode_cellularity_mask(lab))
    return {"image": root / "train" / "input" / "im1.png", "label": root / "train" / "gt" / "im1_gt.png",
            "images": root / "train" / "input"}


READERS = {
    "epithelium": (make_epithelium, lambda r: EpitheliumReader(r), SPLIT),
    "brecahad": (make_brecahad, lambda r: BreCaHADReader(r, radius=4), SPLIT),
    "nuclei": (make_nuclei, lambda r: DSB2018Reader(r), SPLIT),
    "monuseg": (make_monuseg, lambda r: MoNuSegReader(r), {"strategy": "official", "val_fraction": 0.25}),
    "tcia_nuclei": (make_tcia, lambda r: TCIANucleiReader(r), SPLIT),
    "cellularity": (make_cellularity, lambda r: CellularityReader(r), {"strategy": "official", "val_fraction": 0.25}),
}


def datamodule(name: str, root: Path) -> HistoDataModule:
    _, factory, split = READERS[name]
    reader = factory(root)
    return HistoDataModule(reader, name=name, num_classes=reader.num_classes, patch_size=32, batch_size=2,
                           samples_per_epoch=4, split=dict(split))


IMAGE_LABELS = sorted(n for n in READERS if n != "brecahad")  # readers whose labels are image files


def make(name: str, tmp_path: Path):
    root = tmp_path / name
    return name, root, READERS[name][0](root)


@pytest.fixture(params=sorted(READERS))
def dataset(request, tmp_path):
    return make(request.param, tmp_path)


@pytest.fixture(params=IMAGE_LABELS)
def image_label_dataset(request, tmp_path):
    return make(request.param, tmp_path)


# ---------------------------------------------------------------------------------------------- tests
def test_valid_fixture_sets_up_and_yields_a_batch(dataset):
    name, root, _ = dataset
    dm = datamodule(name, root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert len(dm.split["train"]) >= 2 and len(dm.split["val"]) >= 1


def test_corrupt_image_names_the_file(dataset):
    name, root, files = dataset
    files["image"].write_bytes(b"this is not an image" * 10)
    with pytest.raises(DataError, match=rf"{files['image'].name}.*(corrupt|cannot)"):
        datamodule(name, root).setup("fit")


def test_truncated_png_label_fails_at_setup(image_label_dataset):
    name, root, files = image_label_dataset
    label = files["label"]
    data = label.read_bytes()
    label.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{label.name}"):
        datamodule(name, root).setup("fit")


def test_image_mask_size_mismatch_names_the_file(image_label_dataset):
    name, root, files = image_label_dataset
    label = files["label"]
    arr = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(label), cv2.resize(arr, (W + 8, H), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(DataError, match=rf"{label.name}: label is {W + 8}x{H} but its image .* is {W}x{H}"):
        datamodule(name, root).setup("fit")


def test_missing_label_names_the_file(dataset):
    name, root, files = dataset
    files["label"].unlink()
    with pytest.raises(DataError, match=rf"{files['label'].name}.*not found|no mask.*{files['image'].name}"):
        datamodule(name, root).setup("fit")


def test_empty_folder_is_a_clear_error(dataset):
    name, root, files = dataset
    for p in files["images"].iterdir():
        p.unlink() if p.is_file() else None
    if name in ("monuseg", "cellularity"):  # remove the other split's images too
        for p in root.rglob("*"):
            if p.is_file() and p.parent.name in ("images", "input"):
                p.unlink()
    with pytest.raises(DataError, match=r"no .*(images|image).* found|no <id>"):
        datamodule(name, root).setup("fit")


def test_wrong_data_root_names_the_folder(dataset, tmp_path):
    name, _, _ = dataset
    wrong = tmp_path / "not_here"
    with pytest.raises(DataError, match=rf"{wrong}: data folder for '{name}' not found.*HISTOSEG_DATA"):
        datamodule(name, wrong).setup("fit")


def test_unknown_mask_colour_names_file_and_colour(tmp_path):
    root = tmp_path / "cellularity"
    files = make_cellularity(root)
    rgb = cv2.cvtColor(cv2.imread(str(files["label"])), cv2.COLOR_BGR2RGB)
    rgb[30:42, 30:42] = (255, 255, 0)  # yellow: no class has it
    _write(files["label"], rgb)
    # a 12x12 square: its 8x8 interior lies more than 2 px from any clean palette pixel (the 2-px rim counts as noise)
    with pytest.raises(DataError, match=rf"{files['label'].name}: 64 pixels .*not in the cellularity palette.*RGB "
                       r"\(255, 255, 0\) at x=32, y=32"):
        datamodule("cellularity", root).setup("fit")


@pytest.mark.parametrize("content,problem", [
    ("{not json", "not valid JSON"),
    (json.dumps({"tumor": [{"x": 1.5, "y": 0.2}]}), r"tumor\[0\] .* outside \[0, 1\]"),
    (json.dumps({"tumour": []}), r"unknown classes \['tumour'\]"),
    (json.dumps({"tumor": [{"x": 0.5}]}), r"tumor\[0\] is .*expected"),
])
def test_bad_json_names_the_file(tmp_path, content, problem):
    root = tmp_path / "brecahad"
    files = make_brecahad(root)
    files["label"].write_text(content)
    with pytest.raises(DataError, match=rf"{files['label'].name}: {problem}"):
        datamodule("brecahad", root).setup("fit")


def test_brecahad_id_without_case_is_rejected(tmp_path):
    root = tmp_path / "brecahad"
    make_brecahad(root)
    shutil.copy(root / "images" / "Case_1-01.png", root / "images" / "slide7.png")
    shutil.copy(root / "groundTruth" / "Case_1-01.json", root / "groundTruth" / "slide7.json")
    with pytest.raises(DataError, match=r"'slide7' does not follow BreCaHAD's Case_NN-MM naming"):
        datamodule("brecahad", root).setup("fit")


def test_epithelium_single_image_refuses_when_regions_are_disabled(tmp_path):
    root = tmp_path / "epi"
    _write(root / "1_1.tif", _img(0))
    _write(root / "masks" / "1_1_mask.png", _mask(0))
    reader = EpitheliumReader(root, single_image_grid=None)
    dm = HistoDataModule(reader, name="epithelium", num_classes=2, patch_size=32, split=dict(SPLIT))
    with pytest.raises(DataError, match=r"the val split is empty"):
        dm.setup("fit")


def test_exact_discs_are_centred_on_sub_pixel_points_and_opencv_on_rounded_ones():
    """BreCaHAD points come at half-pixel precision: exact discs keep it, the seed's cv2.circle rounds it."""
    from histoseg.data.readers.common import draw_discs

    r = 16.0
    for x, y in ((40.5, 30.5), (40.25, 30.75), (41.0, 29.0)):
        exact, inst = draw_discs((80, 90), [(1, np.array([[x, y]]))], r, "exact")
        seed, _ = draw_discs((80, 90), [(1, np.array([[x, y]]))], r, "opencv")
        ys, xs = np.nonzero(exact)
        assert abs(xs.mean() - x) < 0.01 and abs(ys.mean() - y) < 0.01
        assert abs(exact.sum() - np.pi * r * r) / (np.pi * r * r) < 0.01 and inst.max() == 1
        ys, xs = np.nonzero(seed)
        assert (xs.mean(), ys.mean()) == (round(x), round(y))


def test_atomic_outputs_get_umask_permissions_and_leave_no_temporary_file(tmp_path):
    """Outputs are written to a private temporary file and renamed; the result must be readable as a plainly
    created file would be (mkstemp's 0600 would hide reports and masks from colleagues on a shared cluster)."""
    import os
    import stat
    import tempfile

    from histoseg.data.io import atomic_write_text, publish
    from histoseg.wsi.tiff import write_pyramid

    old = os.umask(0o022)
    try:
        staged = tempfile.mkdtemp(dir=tmp_path)  # a folder built in private, as the cellularity builder does
        publish(staged, tmp_path / "derived")
        atomic_write_text(tmp_path / "report.csv", "a,b\n1,2\n")
        write_pyramid(tmp_path / "mask.tif", (64, 64), lambda lv, y, x, h, w: np.zeros((h, w), np.uint8), 1, 0.5,
                      "tif", 32, "zlib")
    finally:
        os.umask(old)
    for name in ("report.csv", "mask.tif"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "derived").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["derived", "mask.tif", "report.csv"]  # no .tmp left
