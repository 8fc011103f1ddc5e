"""Dataset readers: one file per dataset, each registered by name."""
from histoseg.data.readers import (  # noqa: F401  (registration)
    brecahad,
    cellularity,
    epithelium,
    monuseg,
    nuclei,
    synthetic,
    tcia_nuclei,
)
from histoseg.data.readers.base import Reader, available_readers, get_reader_class, register_reader

__all__ = ["Reader", "register_reader", "available_readers", "get_reader_class"]
