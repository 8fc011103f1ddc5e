"""Model ensembles: several trained networks with one output layout, averaged (as nnU-Net's fold ensembles).

``EnsembleNet`` averages the *raw* outputs of its members (class logits and pre-activation regression maps),
the same quantity :func:`histoseg.inference.tiled.with_tta` averages over test-time views, so an ensemble is a
drop-in ``net`` for a :class:`~histoseg.models.modules.segmentation.SegmentationTask`: tiled inference, TTA,
post-processing and every metric run unchanged. ``histoseg-eval`` / ``histoseg-predict`` build one when
``ckpt_path`` is a list (:func:`histoseg.tasks.restore.restore_models`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class EnsembleNet(nn.Module):
    """The mean of ``nets``' outputs (float32), optionally weighted (``weights`` are normalised to sum 1)."""

    def __init__(self, nets: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if len(nets) < 1:
            raise ValueError("an ensemble needs at least one network")
        self.nets = nn.ModuleList(nets)
        w = torch.ones(len(nets)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (len(nets),) or not torch.all(torch.isfinite(w)) or torch.any(w < 0) or float(w.sum()) <= 0:
            raise ValueError(f"ensemble weights must be {len(nets)} non-negative numbers with a positive sum, got {weights}")
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self.num_classes = getattr(nets[0], "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for w, net in zip(self.weights.tolist(), self.nets):
            y = net(x).float() * w
            out = y if out is None else out + y
        return out
