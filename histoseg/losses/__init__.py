"""Losses: pure functions (``functional``), segmentation modules, compounds."""
from histoseg.losses.multihead import MultiHeadLoss, RegressionLoss
from histoseg.losses.segmentation import (
    BCEWithLogitsLoss,
    CompoundLoss,
    CrossEntropyLoss,
    DiceCELoss,
    DiceLoss,
    FocalLoss,
    LovaszLoss,
    SegLoss,
    TverskyLoss,
    mode_for,
)

__all__ = [
    "SegLoss", "CrossEntropyLoss", "BCEWithLogitsLoss", "DiceLoss", "DiceCELoss", "FocalLoss", "TverskyLoss",
    "LovaszLoss", "CompoundLoss", "mode_for", "MultiHeadLoss", "RegressionLoss",
]
