"""Rank-aware logger and small helpers for logging configs."""
from __future__ import annotations

import logging
import os

# lightning_utilities' decorator is the one Lightning re-exports (``lightning.pytorch.utilities.rank_zero_only``),
# and the Trainer sets its ``rank``; importing it from there keeps ``import histoseg.tasks.utils`` (and so
# ``python train.py --help`` / ``--cfg job``) free of lightning's multi-second import.
from lightning_utilities.core.rank_zero import rank_zero_only

if getattr(rank_zero_only, "rank", None) is None:  # what lightning.fabric sets on its import, from the same variables
    rank_zero_only.rank = next(
        (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK") if k in os.environ), 0
    )


def get_logger(name: str) -> logging.Logger:
    """A logger whose info/warning calls only emit on global rank 0 (DDP-safe)."""
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning", "error", "exception", "fatal", "critical"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger
