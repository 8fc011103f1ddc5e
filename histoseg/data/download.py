"""Dataset download: fetch, verify (SHA-256), extract safely, check the layout, then move into place.

Each reader class lists its archives in ``downloads`` (overridable per config through ``reader.downloads``);
one entry is a dict:

* ``url``: where the archive is (``https://``, ``http://`` or ``file://``);
* ``sha256``: expected SHA-256 of the archive, or ``None`` where none is published (then only the layout
  is verified, and a warning says so);
* ``filename``: the archive's name (its suffix picks the format: ``.zip``, ``.tar``, ``.tar.gz`` / ``.tgz``,
  ``.tar.bz2``, ``.tar.xz``);
* ``strip``: leading path components to drop from every member, or ``"auto"`` (drop the single top-level
  folder when every member lies inside one); default 0;
* ``extract_to``: sub-folder of the dataset root to extract into (default the root itself);
* ``expect``: glob patterns, relative to the dataset root, that must each match a file afterwards.

``ensure_dataset(reader)`` does nothing when every entry's ``expect`` patterns already match under
``reader.root``. Otherwise it downloads into a staging folder beside the root, verifies, extracts member by
member (absolute paths, ``..`` components, links and device files are rejected before anything is written),
checks the layout, and only then moves the result into the root. On any failure the staging folder is
deleted: no partial archive or half-extracted dataset is left behind.

Provenance: the root gets ``.histoseg-download-<archive>.json`` per archive (URL, byte size, the SHA-256 computed
while downloading, and whether it was checked against a published one). Where none is published, that file is
the hash to pin in the dataset config (``sha256:``) for the next machine.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from histoseg.data.io import DataError, exclusive_lock

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def is_present(root: Path, entries: list[dict]) -> bool:
    """Whether every ``expect`` pattern of every entry matches at least one file under ``root``."""
    if not root.is_dir():
        return False
    pats = [p for e in entries for p in e.get("expect", [])]
    return bool(pats) and all(any(root.glob(p)) for p in pats)


def ensure_dataset(reader, progress: bool = True) -> Path:
    """Download the reader's archives into ``reader.root`` unless the data is already there (see module doc)."""
    entries = list(reader.downloads or [])
    if reader.root is None:
        raise DataError(f"{reader.name}: no data root configured; cannot download")
    root = Path(reader.root)
    if not entries:
        raise DataError(f"{reader.name}: no download is defined for this dataset; place the files under {root}")
    if is_present(root, entries):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # parallel runs with dataset.download=true: one downloads, the others wait and then find the data
    with exclusive_lock(root.parent):
        if is_present(root, entries):
            return root
        _download(reader, entries, root, progress)
    log.info("%s: downloaded into %s", reader.name, root)
    return root


def _download(reader, entries: list[dict], root: Path, progress: bool) -> None:
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.download-"))
    try:
        data = staging / "data"
        data.mkdir()
        records = []
        for e in entries:
            archive = fetch(e["url"], staging / e["filename"], e.get("sha256"), progress=progress)
            digest = str(e["sha256"]).lower() if e.get("sha256") else sha256_of(archive)
            records.append({"url": e["url"], "filename": e["filename"], "bytes": archive.stat().st_size,
                            "sha256": digest, "verified_against_published": bool(e.get("sha256"))})
            if not e.get("sha256"):
                log.warning("%s: SHA-256 of %s is %s; pin it as the entry's sha256 to verify later downloads",
                            reader.name, e["filename"], digest)
            dest = data / e.get("extract_to", ".")
            extract(archive, dest, strip=e.get("strip", 0))
            archive.unlink()
        missing = [p for e in entries for p in e.get("expect", []) if not any(data.glob(p))]
        if missing:
            raise DataError(
                f"{reader.name}: the downloaded archive(s) do not have the expected layout: nothing matches {missing} "
                f"(got top-level entries {sorted(p.name for p in data.iterdir())[:10]})"
            )
        for rec in records:
            (data / f".histoseg-download-{rec['filename']}.json").write_text(json.dumps(rec, indent=1) + "\n")
        _merge_into(data, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _merge_into(src: Path, root: Path) -> None:
    if not root.exists():
        os.replace(src, root)
        return
    for item in src.iterdir():
        target = root / item.name
        if target.exists():
            raise DataError(f"{target}: already exists; remove the incomplete dataset folder {root} and retry")
        os.replace(item, target)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def fetch(url: str, dest: Path, sha256: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``), verify its SHA-256, and return ``dest``.

    Raises DataError on HTTP errors, on a web page where an archive was expected (e.g. a Google Drive
    confirmation page), on a truncated transfer and on a checksum mismatch; the partial file is removed.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "histoseg-download"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            ctype = r.headers.get("Content-Type", "") if hasattr(r, "headers") else ""
            if ctype.startswith("text/html") and not dest.name.endswith((".html", ".htm")):
                raise DataError(
                    f"{url}: the server returned a web page instead of {dest.name} (a login or confirmation page, as "
                    "Google Drive shows for large files); download it in a browser and extract it into the data root, "
                    "or set the entry's url to file:///path/to/the/archive"
                )
            total = int(r.headers.get("Content-Length") or 0) if hasattr(r, "headers") else 0
            h = hashlib.sha256()
            got = 0
            bar = None
            if progress:
                from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

                bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                               TransferSpeedColumn(), transient=True)
                bar.start()
                task = bar.add_task(f"download {dest.name}", total=total or None)
            try:
                with open(part, "wb") as f:
                    while b := r.read(CHUNK):
                        f.write(b)
                        h.update(b)
                        got += len(b)
                        if bar is not None:
                            bar.update(task, advance=len(b))
            finally:
                if bar is not None:
                    bar.stop()
        if total and got != total:
            raise DataError(f"{url}: transfer truncated: got {got} of {total} bytes")
        digest = h.hexdigest()
        if sha256 is None:
            log.warning("%s: no SHA-256 is known for this archive; only its layout will be checked", url)
        elif digest.lower() != str(sha256).lower():
            raise DataError(
                f"{url}: SHA-256 mismatch for {dest.name}: expected {sha256}, got {digest} ({got} bytes); the download "
                "is corrupt or the file changed upstream, nothing was kept"
            )
        os.replace(part, dest)
        return dest
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: download failed with HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DataError(f"{url}: download failed ({e.reason})") from None
    finally:
        part.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- extraction
def _safe_parts(name: str, archive: Path, strip) -> tuple[str, ...] | None:
    """Validated path components of a member (after ``strip``); ``None`` for members stripped away."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"{archive}: member {name!r} points outside the extraction folder ('..'); refusing to extract")
    parts = parts[int(strip):]
    return parts or None


def _auto_strip(names: list[str]) -> int:
    tops = {PurePosixPath(n.replace("\\", "/")).parts[0] for n in names if n.strip("/")}
    nested = all(len(PurePosixPath(n.replace("\\", "/")).parts) > 1 or n.endswith("/") for n in names if n.strip("/"))
    return 1 if len(tops) == 1 and nested else 0


def extract(archive: Path, dest: Path, strip: int | str = 0) -> None:
    """Extract a zip or tar archive into ``dest`` without path traversal (see the module docstring)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip"):
        _extract_zip(archive, dest, strip)
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        _extract_tar(archive, dest, strip)
    else:
        raise DataError(f"{archive}: unknown archive type (expected .zip, .tar, .tar.gz/.tgz, .tar.bz2 or .tar.xz)")


def _write_members(dest: Path, plan, open_member) -> None:
    """Write validated archive members: ``plan`` holds ``(member, path parts, is_dir)``; ``open_member(member)``
    returns a readable binary file for a file member."""
    for member, parts, is_dir in plan:
        target = dest.joinpath(*parts)
        if is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)


def _extract_zip(archive: Path, dest: Path, strip) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a valid zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        strip = _auto_strip([i.filename for i in infos]) if strip == "auto" else int(strip)
        plan = []
        for info in infos:  # validate everything before writing anything
            parts = _safe_parts(info.filename, archive, strip)
            mode = (info.external_attr >> 16) & 0o170000
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise DataError(f"{archive}: member {info.filename!r} is a link or special file; refusing to extract")
            if parts is not None:
                plan.append((info, parts, info.is_dir()))
        _write_members(dest, plan, zf.open)


def _extract_tar(archive: Path, dest: Path, strip) -> None:
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise DataError(f"{archive}: not a valid tar archive ({e})") from None
    with tf:
        members = tf.getmembers()
        strip = _auto_strip([m.name + ("/" if m.isdir() else "") for m in members]) if strip == "auto" else int(strip)
        plan = []
        for m in members:  # validate everything before writing anything
            parts = _safe_parts(m.name, archive, strip)
            if m.issym() or m.islnk():
                raise DataError(f"{archive}: member {m.name!r} is a link (to {m.linkname!r}); refusing to extract")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{archive}: member {m.name!r} is a device or special file; refusing to extract")
            if parts is not None:
                plan.append((m, parts, m.isdir()))

        def reader(m):
            src = tf.extractfile(m)
            if src is None:
                raise DataError(f"{archive}: cannot read member {m.name!r}")
            return src

        _write_members(dest, plan, reader)
