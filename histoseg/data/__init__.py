"""Data: readers (one file per dataset), the generic DataModule, patch store, splits, downloads."""
from histoseg.data.io import DataError
from histoseg.data.sample import Sample

__all__ = ["HistoDataModule", "Sample", "DataError"]


def __getattr__(name: str):
    # HistoDataModule pulls in Lightning (seconds): imported on first use, so light users of the package
    # (image I/O, slide-reading worker processes) start fast
    if name == "HistoDataModule":
        from histoseg.data.datamodule import HistoDataModule

        return HistoDataModule
    raise AttributeError(f"module 'histoseg.data' has no attribute {name!r}")
