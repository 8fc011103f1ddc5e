"""Rank-aware logger and small helpers for logging configs."""
from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


def get_logger(name: str) -> logging.Logger:
    """A logger whose info/warning calls only emit on global rank 0 (DDP-safe)."""
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning", "error", "exception", "fatal", "critical"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger
