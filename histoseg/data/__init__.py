"""Data: readers (one file per dataset), the generic DataModule, patch store, splits, downloads."""
from histoseg.data.datamodule import HistoDataModule
from histoseg.data.io import DataError
from histoseg.data.sample import Sample

__all__ = ["HistoDataModule", "Sample", "DataError"]
