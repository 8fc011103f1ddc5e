"""HDF5 patch store: exact round trip, reuse, stale detection, atomic builds, per-process handles, DataModule use."""
from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from histoseg.data import DataError, HistoDataModule
from histoseg.data.datasets import EpochSampler, PatchDataset
from histoseg.data.patch_store import PatchStore, PatchStoreSource
from histoseg.data.readers.nuclei import DSB2018Reader
from tests.test_data_bad_input import make_nuclei


@pytest.fixture
def nuclei(tmp_path):
    make_nuclei(tmp_path / "dsb")
    return DSB2018Reader(tmp_path / "dsb")


def store(tmp_path, **kw) -> PatchStore:
    opts = dict(dir=tmp_path / "stores", patches_per_image=6, patch_shape=(40, 40), pad=8, seed=3, progress=False)
    return PatchStore(**{**opts, **kw})


def test_round_trip_patches_are_exact_crops_of_the_padded_images(tmp_path, nuclei):
    ids = nuclei.case_ids()[:3]
    ps = store(tmp_path)
    path = ps.ensure(nuclei, ids)
    with h5py.File(path, "r") as f:
        assert f["image"].shape == (18, 40, 40, 3) and f["image"].chunks == (1, 40, 40, 3)
        assert f["image"].compression == "gzip" and f["instances"].dtype == np.int32
        imgs, masks, insts, idx = f["image"][:], f["mask"][:], f["instances"][:], f["case_index"][:]
    assert idx.tolist() == [i for i in range(3) for _ in range(6)]
    for k in range(18):
        s = nuclei.read(ids[idx[k]])
        img = np.pad(s.image, ((8, 8), (8, 8), (0, 0)), mode="reflect")
        mask = np.pad(s.mask, 8, mode="reflect")
        # find where the stored patch came from: it must be an exact crop at one position
        hits = [(y, x) for y in range(img.shape[0] - 39) for x in range(img.shape[1] - 39)
                if np.array_equal(img[y : y + 40, x : x + 40], imgs[k])]
        assert len(hits) >= 1
        y, x = hits[0]
        assert np.array_equal(mask[y : y + 40, x : x + 40], masks[k])
        inst = np.pad(s.instances, 8, mode="reflect")
        assert np.array_equal(inst[y : y + 40, x : x + 40], insts[k])


def test_source_crops_lie_inside_stored_patches_and_are_seeded(tmp_path, nuclei):
    ids = nuclei.case_ids()
    ps = store(tmp_path)
    src = ps.source(ps.ensure(nuclei, ids))
    assert src.has_instances and len(src) == 24
    a = src.patch(np.random.default_rng(5), (24, 24))
    b = src.patch(np.random.default_rng(5), (24, 24))
    for u, v in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(u, v)
    img, mask, inst, cid = a
    assert img.shape == (24, 24, 3) and mask.shape == (24, 24) and inst.shape == (24, 24) and cid in ids
    with pytest.raises(DataError, match=r"stored patches are 40x40, smaller than the requested crop 64x64"):
        src.patch(np.random.default_rng(0), (64, 64))


def test_reused_when_fresh_rebuilt_when_sources_change(tmp_path, nuclei):
    ids = nuclei.case_ids()
    ps = store(tmp_path)
    path = ps.ensure(nuclei, ids)
    before = os.stat(path).st_mtime_ns, os.stat(path).st_ino
    assert ps.ensure(nuclei, ids) == path
    assert (os.stat(path).st_mtime_ns, os.stat(path).st_ino) == before  # reused, not rewritten
    # a source mask changes on disk -> same key, stale fingerprint -> rebuilt with the new content
    gt = nuclei.source_files(ids[0])[1]
    import cv2

    cv2.imwrite(str(gt), np.full((48, 48), 255, np.uint8))
    fresh = DSB2018Reader(nuclei.root)
    assert ps.ensure(fresh, ids) == path
    assert os.stat(path).st_ino != before[1]
    with h5py.File(path, "r") as f:
        assert (f["mask"][: ps.patches_per_image] == 1).all()
    # other parameters or another split -> another file; the old one stays valid
    assert store(tmp_path, patches_per_image=3).ensure(fresh, ids) != path
    assert ps.ensure(fresh, ids[:2]) != path
    assert PatchStore.read_meta(path)["n_patches"] == 24


def test_interrupted_build_leaves_no_file_and_a_truncated_one_is_rebuilt(tmp_path, nuclei):
    ids = nuclei.case_ids()
    ps = store(tmp_path)

    class Boom(DSB2018Reader):
        calls = 0

        def read(self, case_id):
            Boom.calls += 1
            if Boom.calls == 3:
                raise KeyboardInterrupt
            return super().read(case_id)

    boom = Boom(nuclei.root)
    boom.name = nuclei.name
    with pytest.raises(KeyboardInterrupt):
        ps.ensure(boom, ids)
    assert not any((tmp_path / "stores").iterdir())  # no final file, no temp file
    path = ps.ensure(nuclei, ids)
    path.write_bytes(path.read_bytes()[:1000])  # simulate a damaged file at the final path
    assert PatchStore.read_meta(path) is None
    with pytest.raises(DataError, match="not a complete histoseg patch store"):
        PatchStoreSource(path)
    assert PatchStore.read_meta(ps.ensure(nuclei, ids))["n_patches"] == 24


def test_each_process_opens_its_own_handle(tmp_path, nuclei):
    ps = store(tmp_path)
    src = ps.source(ps.ensure(nuclei, nuclei.case_ids()))
    src.patch(np.random.default_rng(0), (16, 16))
    assert list(src._handles) == [os.getpid()]
    clone = pickle.loads(pickle.dumps(src))  # what a spawned worker receives
    assert clone._handles == {}
    ds = PatchDataset(src, (16, 16), 8, seed=1)
    serial = [ds[(0, i)]["image"] for i in range(8)]
    loader = DataLoader(ds, batch_size=4, sampler=EpochSampler(8), num_workers=2)
    parallel = torch.cat([b["image"] for b in loader])
    assert torch.equal(torch.stack(serial), parallel)  # workers read the same patches with their own handles


def test_datamodule_trains_from_the_store(tmp_path, nuclei):
    cfg = dict(dir=str(tmp_path / "stores"), patches_per_image=4, patch_shape=[40, 40], pad=4, compression="lzf",
               seed=0, progress=False)
    dm = HistoDataModule(nuclei, name="nuclei", num_classes=2, patch_size=32, batch_size=2, samples_per_epoch=4,
                         split={"strategy": "random", "val_fraction": 0.25, "test_fraction": 0.25}, patch_store=cfg)
    dm.prepare_data()  # builds the store once (one process per node under DDP) ...
    built = list((tmp_path / "stores").glob("*.h5"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    dm.setup("fit")  # ... and setup only opens it
    assert list((tmp_path / "stores").glob("*.h5")) == built and built[0].stat().st_mtime_ns == stamp
    assert isinstance(dm.train_set.source, PatchStoreSource)
    assert dm.train_set.source.case_ids == dm.split["train"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["instances"].dtype == torch.int32
    assert set(batch["case_id"]) <= set(dm.split["train"])


def test_partial_instance_maps_are_flagged_per_patch(tmp_path, nuclei):
    """MoNuSeg-like: only some images have instance maps; their patches carry them, the others give None."""

    class Partial(DSB2018Reader):
        def read(self, case_id):
            s = super().read(case_id)
            if case_id in ("id1", "id3"):
                s.instances = None
            return s

    part = Partial(nuclei.root)
    part.name = nuclei.name
    ps = store(tmp_path, patches_per_image=3)
    src = ps.source(ps.ensure(part, part.case_ids()))
    assert src.has_instances
    with h5py.File(src.path, "r") as f:
        assert f["instance_known"][:].tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    got = {"with": 0, "without": 0}
    for seed in range(40):
        img, mask, inst, cid = src.patch(np.random.default_rng(seed), (24, 24))
        if cid in ("id1", "id3"):
            assert inst is None
            got["without"] += 1
        else:
            assert np.array_equal(inst > 0, mask > 0)
            got["with"] += 1
    assert got["with"] and got["without"]


def test_limit_train_reads_and_stores_only_the_first_training_images(tmp_path, nuclei):
    cfg = dict(dir=str(tmp_path / "stores"), patches_per_image=2, patch_shape=[40, 40], pad=4, compression="lzf",
               seed=0, progress=False)
    dm = HistoDataModule(nuclei, name="nuclei", num_classes=2, patch_size=32, batch_size=2, samples_per_epoch=4,
                         split={"strategy": "random", "val_fraction": 0.25, "test_fraction": 0.25}, patch_store=cfg,
                         limit_train=1)
    dm.setup("fit")
    assert len(dm.split["train"]) > 1 and dm.train_ids() == dm.split["train"][:1]
    assert dm.train_set.source.case_ids == dm.split["train"][:1]  # the store holds that image only
    assert set(dm._cache) == {*dm.split["train"][:1], *dm.split["val"]}  # the other training images are never read

