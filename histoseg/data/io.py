"""Image reading and writing with errors that name the file and the problem."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


class MissingFileError(DataError, FileNotFoundError):
    """A file the user named (a checkpoint, say) does not exist; still a ``FileNotFoundError`` for callers."""


def read_image(path: str | Path, mode: str = "rgb") -> np.ndarray:
    """Read an image as ``HxWx3`` uint8 RGB (``mode='rgb'``), ``HxW`` (``'gray'``) or unchanged (``'any'``).

    16-bit label images are kept 16-bit in ``any`` mode. Raises :class:`DataError` naming the file if it is
    missing, empty or cannot be decoded.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    if p.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(str(p))
        except Exception as e:  # tifffile raises many types
            raise DataError(f"{p}: cannot decode TIFF ({e})") from None
        if mode == "rgb":
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            arr = arr[..., :3]
            if arr.dtype != np.uint8:
                arr = _to_uint8(arr)
        elif mode == "gray" and arr.ndim == 3:
            arr = cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(arr)
    flag = {"rgb": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE, "any": cv2.IMREAD_UNCHANGED}[mode]
    buf = np.fromfile(str(p), dtype=np.uint8)
    arr = cv2.imdecode(buf, flag)
    if arr is None:
        raise DataError(f"{p}: cannot decode image (corrupt or not an image file)")
    if mode == "rgb":
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif mode == "any" and arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return arr


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return (arr.astype(np.float64) * 255.0 / np.iinfo(arr.dtype).max).astype(np.uint8)


def write_image(path: str | Path, arr: np.ndarray) -> None:
    """Write an RGB (HxWx3) or single-channel image atomically (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)
    ok, enc = cv2.imencode(p.suffix or ".png", arr)
    if not ok:
        raise DataError(f"{p}: cannot encode image of shape {arr.shape} and dtype {arr.dtype}")
    atomic_write_bytes(p, enc.tobytes())


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temporary file or folder onto ``path`` atomically, with the permissions a plainly created
    one would get (``mkstemp`` / ``mkdtemp`` make them private, 0600 / 0700; outputs should follow the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~umask)
    os.replace(tmp, path)


@contextmanager
def exclusive_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on the folder ``folder`` (created if missing) for the ``with`` block.

    For work that several processes may start at once on one output (two training runs deriving the same cached
    data set, parallel jobs updating one table): the second waits for the first, then finds its output. POSIX
    ``flock`` on the folder itself, so no lock file is left behind; released when the block ends or the process
    dies. Where ``fcntl`` is missing (Windows) it does not lock, and the atomic renames are the only guard.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            # unlock explicitly: a child forked inside the block shares the descriptor, so closing ours alone
            # would keep the lock held for as long as the child lives
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
