"""Reader base class and registry.

A reader knows one dataset's files and nothing else: which case ids exist, which patient/case group each
belongs to, the official split if the publisher defines one, and how to turn a case id into a
:class:`~histoseg.data.sample.Sample`. Loaders, patches, splits and augmentation live in the DataModule.

To add a dataset: write ``histoseg/data/readers/<name>.py`` with a ``Reader`` subclass decorated by
``@register_reader("<name>")``, import it in ``readers/__init__.py`` and add ``conf/dataset/<name>.yaml``.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from histoseg.data.io import DataError
from histoseg.data.sample import Sample

_READERS: dict[str, type[Reader]] = {}


def register_reader(name: str) -> Callable[[type[Reader]], type[Reader]]:
    def deco(cls: type[Reader]) -> type[Reader]:
        cls.name = name
        _READERS[name] = cls
        return cls

    return deco


def available_readers() -> list[str]:
    import histoseg.data.readers  # noqa: F401

    return sorted(_READERS)


def get_reader_class(name: str) -> type[Reader]:
    import histoseg.data.readers  # noqa: F401

    if name not in _READERS:
        raise KeyError(f"unknown dataset reader {name!r}; available: {', '.join(available_readers())}")
    return _READERS[name]


class Reader(ABC):
    """Base class of dataset readers.

    Subclasses set ``class_names`` (index 0 = background) and ``mpp`` (microns per pixel at the stored
    resolution), implement :meth:`case_ids` and :meth:`read`, and may override :meth:`group_of`,
    :meth:`official_split`, :meth:`source_files` and :meth:`check`.
    """

    name: ClassVar[str] = "?"
    class_names: tuple[str, ...] = ("background", "foreground")
    mpp: float | None = None
    has_instances: bool = False
    # download descriptions (see histoseg.data.download): list of {url, sha256, filename, strip/layout}
    downloads: ClassVar[list[dict]] = []

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def require_root(self) -> Path:
        if self.root is None:
            raise DataError(f"{self.name}: no data root configured (set paths.data_dir or HISTOSEG_DATA)")
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: data folder for {self.name!r} not found (set HISTOSEG_DATA or paths.data_dir to the "
                f"folder holding '{self.root.name}/', or use download=true)"
            )
        return self.root

    @abstractmethod
    def case_ids(self) -> list[str]:
        """All case ids available on disk, sorted."""

    @abstractmethod
    def read(self, case_id: str) -> Sample:
        """Read one case; raise DataError naming the file on any problem."""

    def group_of(self, case_id: str) -> str:
        """The patient / case a case id belongs to (splits never separate one group). Default: itself."""
        return case_id

    def stratum_of(self, case_id: str) -> str:
        """The kind of image a case is, for ``split.stratify_val`` (e.g. an imaging modality). Default: one
        stratum for all; readers whose images mix kinds override it."""
        return ""

    def official_split(self) -> dict[str, list[str]] | None:
        """``{"train": [...], "test": [...]}`` (optionally ``"val"``) if the publisher defines one."""
        return None

    def source_files(self, case_id: str) -> list[Path]:
        """Files a case is read from (hashed by the patch store to detect stale caches)."""
        return []

    def check(self, case_ids: list[str]) -> None:
        """Cheap validation at setup (before training): default reads nothing. Readers override."""
        return None

    def prepare(self) -> None:
        """Build derived files the reader needs (called once by ``HistoDataModule.prepare_data``, after any
        download). Default: nothing. Must be atomic and reuse an up-to-date result."""
        return None

    def fingerprint(self, case_ids: list[str]) -> str:
        """SHA-256 over the source files' content of the given cases (for cache validity)."""
        h = hashlib.sha256(self.name.encode())
        for cid in case_ids:
            h.update(cid.encode())
            for f in self.source_files(cid):
                h.update(file_sha256(f).encode())
        return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
