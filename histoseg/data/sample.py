"""The one record every reader returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One image with its labels, as read from disk (or generated).

    Attributes:
        image: ``HxWx3`` uint8 RGB.
        mask: ``HxW`` uint8 class indices (0 = background), or ``None`` for unlabelled images.
        instances: optional ``HxW`` instance ids (0 = background, 1..N nuclei; uint16/int32).
        case_id: the image id (unique within the dataset).
        group: patient / case the image belongs to (splits never separate a group).
        source: the file the image came from (for error messages and reports).
        meta: anything else (points, mpp, ...).
    """

    image: np.ndarray
    mask: np.ndarray | None
    case_id: str
    instances: np.ndarray | None = None
    group: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"{self.source or self.case_id}: image must be HxWx3 uint8, got {self.image.shape} {self.image.dtype}"
            )
        h, w = self.image.shape[:2]
        for name in ("mask", "instances"):
            a = getattr(self, name)
            if a is not None and a.shape[:2] != (h, w):
                raise ValueError(
                    f"{self.source or self.case_id}: {name} is {a.shape[1]}x{a.shape[0]} but the image is {w}x{h}"
                )
        if self.group is None:
            self.group = self.case_id
