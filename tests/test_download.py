"""Download: a tiny archive served by http.server on 127.0.0.1 (no internet): success, checksum failure, traversal."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from histoseg.data import DataError, HistoDataModule
from histoseg.data.download import ensure_dataset, extract
from histoseg.data.readers.nuclei import DSB2018Reader
from tests.test_data_bad_input import make_nuclei


@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1 (random port) for the duration of a test."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    t.join(5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def dsb_tarball(src: Path, out: Path, top: str = "dsb_copy") -> str:
    """A tar.gz of a tiny seed-layout DSB set under one top folder; returns its SHA-256."""
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src, arcname=top)
    return hashlib.sha256(out.read_bytes()).hexdigest()


ENTRY = {"filename": "dsb.tar.gz", "strip": "auto", "expect": ["raw/*.png", "gt/*.png"]}


def test_download_verifies_extracts_and_feeds_the_datamodule(tmp_path, server):
    www, url = server
    make_nuclei(tmp_path / "src")
    sha = dsb_tarball(tmp_path / "src", www / "dsb.tar.gz")
    root = tmp_path / "data" / "dsb2018"
    reader = DSB2018Reader(root, downloads=[{**ENTRY, "url": f"{url}/dsb.tar.gz", "sha256": sha}])
    dm = HistoDataModule(reader, name="nuclei", num_classes=2, patch_size=32, batch_size=2, samples_per_epoch=2,
                         split={"strategy": "random", "val_fraction": 0.25, "test_fraction": 0.25}, download=True)
    dm.prepare_data()
    assert sorted(p.name for p in (root / "raw").iterdir()) == ["id0.png", "id1.png", "id2.png", "id3.png"]
    assert sorted(p.name for p in root.parent.iterdir()) == ["dsb2018"]  # no staging or archive left
    rec = json.loads((root / f".histoseg-download-{ENTRY['filename']}.json").read_text())
    assert rec["sha256"] == sha and rec["verified_against_published"] is True
    dm.setup("fit")
    assert len(dm.split["train"]) == 2
    # present now: a second call downloads nothing (the server is gone)
    (www / "dsb.tar.gz").unlink()
    assert ensure_dataset(reader, progress=False) == root


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path, server):
    www, url = server
    make_nuclei(tmp_path / "src")
    sha = dsb_tarball(tmp_path / "src", www / "dsb.tar.gz")
    wrong = "0" * 64
    root = tmp_path / "data" / "dsb2018"
    reader = DSB2018Reader(root, downloads=[{**ENTRY, "url": f"{url}/dsb.tar.gz", "sha256": wrong}])
    with pytest.raises(DataError, match=rf"dsb.tar.gz: SHA-256 mismatch .*expected {wrong}, got {sha}"):
        ensure_dataset(reader, progress=False)
    assert list((tmp_path / "data").iterdir()) == []  # no root, no .part, no staging folder


def test_http_error_and_web_page_are_clear_errors(tmp_path, server):
    www, url = server
    (www / "page.tar.gz").write_text("<html>confirm download</html>")
    root = tmp_path / "data" / "x"
    missing = DSB2018Reader(root, downloads=[{**ENTRY, "url": f"{url}/nope.tar.gz", "sha256": None}])
    with pytest.raises(DataError, match=r"nope.tar.gz: download failed with HTTP 404"):
        ensure_dataset(missing, progress=False)

    class HtmlHandler(QuietHandler):
        def guess_type(self, path):
            return "text/html"

    # a server answering with a web page (as Google Drive's confirmation) instead of the archive
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(HtmlHandler, directory=str(www)))
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        page = DSB2018Reader(root, downloads=[{**ENTRY, "url": f"http://127.0.0.1:{httpd.server_address[1]}/page.tar.gz",
                                               "sha256": None}])
        with pytest.raises(DataError, match=r"returned a web page instead of dsb.tar.gz"):
            ensure_dataset(page, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert list((tmp_path / "data").iterdir()) == []


def test_wrong_layout_is_rejected_before_anything_lands(tmp_path, server):
    www, url = server
    (tmp_path / "src" / "other").mkdir(parents=True)
    (tmp_path / "src" / "other" / "readme.txt").write_text("not a dataset")
    sha = dsb_tarball(tmp_path / "src", www / "dsb.tar.gz")
    reader = DSB2018Reader(tmp_path / "data" / "dsb2018", downloads=[{**ENTRY, "url": f"{url}/dsb.tar.gz", "sha256": sha}])
    with pytest.raises(DataError, match=r"do not have the expected layout: nothing matches \['raw/\*.png', 'gt/\*.png'\]"):
        ensure_dataset(reader, progress=False)
    assert list((tmp_path / "data").iterdir()) == []


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> None:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("safe/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        if member.isfile():
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
        else:
            tf.addfile(member)


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, target
    return m


@pytest.mark.parametrize("member,problem", [
    (tarfile.TarInfo("../evil.txt"), r"'\.\./evil.txt' points outside"),
    (tarfile.TarInfo("safe/../../evil.txt"), r"points outside"),
    (tarfile.TarInfo("/tmp/evil.txt"), r"absolute path"),
    (_link("safe/link", "../../../etc/passwd"), r"'safe/link' is a link"),
    (_link("safe/hard", "/etc/passwd", tarfile.LNKTYPE), r"is a link"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink"])
def test_tar_path_traversal_is_rejected_and_nothing_is_written(tmp_path, member, problem):
    arc = tmp_path / "bad.tar.gz"
    _tar_with(arc, member)
    dest = tmp_path / "out" / "inner"
    with pytest.raises(DataError, match=rf"bad.tar.gz: member .*{problem}"):
        extract(arc, dest)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not any(dest.rglob("*"))  # validated before writing: not even the safe member


@pytest.mark.parametrize("name,problem", [("../evil.txt", "points outside"), ("/abs/evil.txt", "absolute path"),
                                          ("C:/evil.txt", "absolute path")])
def test_zip_path_traversal_is_rejected(tmp_path, name, problem):
    arc = tmp_path / "bad.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok/ok.txt", "ok")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with pytest.raises(DataError, match=rf"bad.zip: member .* {problem}"):
        extract(arc, tmp_path / "out")
    assert not any((tmp_path / "out").rglob("*"))


def test_zip_symlink_is_rejected(tmp_path):
    arc = tmp_path / "link.zip"
    info = zipfile.ZipInfo("ok/link")
    info.external_attr = (0o120777 << 16)  # S_IFLNK
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr(info, "../../etc/passwd")
    with pytest.raises(DataError, match=r"'ok/link' is a link or special file"):
        extract(arc, tmp_path / "out")


def test_zip_extracts_with_auto_strip(tmp_path):
    arc = tmp_path / "good.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("BreCaHAD/images/a.txt", "a")
        zf.writestr("BreCaHAD/groundTruth/a.json", "{}")
    extract(arc, tmp_path / "out", strip="auto")
    assert (tmp_path / "out" / "images" / "a.txt").read_text() == "a"
    assert (tmp_path / "out" / "groundTruth" / "a.json").is_file()


def test_every_dataset_config_carries_its_readers_downloads(make_cfg):
    """The yaml is the visible spec; it must not drift from the reader class defaults."""
    import hydra

    from histoseg.data.readers import get_reader_class

    for name in ("epithelium", "brecahad", "nuclei", "monuseg", "tcia_nuclei"):
        cfg = make_cfg(f"dataset={name}", base=[])
        cls = hydra.utils.get_class(cfg.dataset.reader._target_)
        assert cls is get_reader_class(name)
        from omegaconf import OmegaConf

        assert OmegaConf.to_container(cfg.dataset.reader.downloads) == cls.downloads
        for e in cls.downloads:
            assert e["url"].startswith("https://") and e["expect"]
            assert e["sha256"] is None or len(e["sha256"]) == 64


def test_tcia_upstream_archive_from_a_file_url_is_read_as_it_comes(tmp_path, data_dir):
    """The Pan-Cancer-Nuclei-Seg archive (crop and label side by side in per-type folders, extra per-annotator
    masks) fetched from a ``file://`` URL, as after a manual browser download: verified by layout, extracted, read."""
    from histoseg.data.readers.tcia_nuclei import TCIANucleiReader

    kit = TCIANucleiReader(data_dir / "tcia_nuclei")
    ids = kit.case_ids()[:3]
    archive = tmp_path / "manual_segmentation_data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for i, cid in enumerate(ids):
            img, lab = kit.source_files(cid)
            folder = f"manual_segmentation_data/{['blca', 'brca', 'luad'][i]}"
            tf.add(img, arcname=f"{folder}/{img.name}")
            tf.add(lab, arcname=f"{folder}/{lab.name}")
            tf.add(lab, arcname=f"{folder}/{cid}_labeled_mask_common0.png")
    root = tmp_path / "data" / "tcia_nuclei"
    entry = {**TCIANucleiReader.downloads[0], "url": archive.as_uri()}
    reader = TCIANucleiReader(root, downloads=[entry])
    assert ensure_dataset(reader, progress=False) == root
    assert sorted(reader.case_ids()) == sorted(ids)
    # no published checksum: the hash computed while downloading is recorded, to be pinned in the config
    rec = json.loads((root / ".histoseg-download-manual_segmentation_data.tar.gz.json").read_text())
    assert rec["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert rec["verified_against_published"] is False and rec["bytes"] == archive.stat().st_size
    for cid in ids:
        ours, theirs = reader.read(cid), kit.read(cid)
        assert (ours.image == theirs.image).all() and (ours.instances == theirs.instances).all()
        assert "manual_segmentation_data" in ours.source


def _ensure_in_child(reader):
    ensure_dataset(reader, progress=False)


def test_parallel_runs_wait_for_one_download(tmp_path):
    """Two runs with dataset.download=true started at once: the second waits on the lock that the first holds
    while downloading, then finds the data instead of downloading again (here the URL does not exist, so a second
    download would fail)."""
    import multiprocessing as mp
    import time

    from histoseg.data.io import exclusive_lock

    root = tmp_path / "data" / "dsb2018"
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    reader = DSB2018Reader(root, downloads=[{**ENTRY, "url": missing, "sha256": "0" * 64}])
    with exclusive_lock(root.parent):  # "the first run", mid-download
        child = mp.get_context("fork").Process(target=_ensure_in_child, args=(reader,))
        child.start()
        time.sleep(1.0)
        assert child.is_alive()  # waiting, not fetching the missing URL
        make_nuclei(root)        # the first run's download lands
    child.join(60)
    assert child.exitcode == 0
    assert sorted(p.name for p in root.parent.iterdir()) == ["dsb2018"]  # nothing staged, no lock file
