"""Segmentation losses as modules. All take raw logits ``(B, K, H, W)`` and an int64 target ``(B, H, W)``.

Modes (``mode`` argument, from ``dataset.num_classes`` in the config):

* ``binary``: one logit per pixel (sigmoid); target in {0, 1}.
* ``multiclass``: K logits (softmax); target in {0..K-1}.

Where smp implements the same loss it is used (Dice, focal, Tversky, Lovasz).
"""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn

from histoseg.losses import functional as Fn

MODES = ("binary", "multiclass")


def mode_for(num_classes: int) -> str:
    """2 classes (background + one) -> binary with a single logit; more -> multiclass."""
    if int(num_classes) < 2:
        raise ValueError(f"num_classes counts background too and must be >= 2, got {num_classes}")
    return "binary" if int(num_classes) == 2 else "multiclass"


class SegLoss(nn.Module):
    """Base: checks the mode, casts logits to fp32 (autocast-safe) and checks channel counts."""

    supported_modes: tuple[str, ...] = MODES
    needs_class_weights = False

    def __init__(self, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in self.supported_modes:
            raise ValueError(
                f"{type(self).__name__} supports only {'/'.join(self.supported_modes)} segmentation, but the "
                f"dataset is {mode}; pick another loss (e.g. loss=ce or loss=dice_ce)"
            )
        self.mode = mode

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mode == "binary" and logits.shape[1] != 1:
            raise ValueError(f"binary mode expects 1 logit channel, got {logits.shape[1]}")
        return self.compute(logits.float(), target.long())

    def compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class CrossEntropyLoss(SegLoss):
    """Pixel cross-entropy (BCE-with-logits in binary mode).

    Args:
        weight: per-class weights, ``"auto"`` (w_i = N / N_i from the training masks, set by the task at
            fit start, as the tumour-cellularity seed) or ``None``.
        ignore_index: label value that contributes nothing.
    """

    def __init__(self, mode: str, weight: list[float] | str | None = None, ignore_index: int | None = None):
        super().__init__(mode)
        self.ignore_index = ignore_index
        self.auto = weight == "auto"
        self.needs_class_weights = self.auto
        w = None if weight is None or self.auto else torch.as_tensor(list(weight), dtype=torch.float32)
        self.register_buffer("weight", w, persistent=False)

    def set_class_weights(self, counts) -> torch.Tensor:
        self.weight = Fn.class_weights_from_counts(counts)
        return self.weight

    def compute(self, logits, target):
        if self.auto and self.weight is None:
            raise RuntimeError("weight='auto' needs set_class_weights(counts) before the first step")
        return Fn.cross_entropy(logits, target, self.weight, self.ignore_index)


class BCEWithLogitsLoss(CrossEntropyLoss):
    """Binary cross-entropy on one logit (the BreCaHAD seed). Binary datasets only."""

    supported_modes = ("binary",)

    def __init__(self, mode: str, pos_weight: float | None = None, ignore_index: int | None = None):
        super().__init__(mode, None if pos_weight is None else [1.0, float(pos_weight)], ignore_index)


class _SMPLoss(SegLoss):
    smp_cls: type = None

    def __init__(self, mode: str, **kwargs):
        super().__init__(mode)
        self.inner = self.smp_cls(mode=mode, **{k: v for k, v in kwargs.items()})

    def compute(self, logits, target):
        return self.inner(logits, target)


class DiceLoss(_SMPLoss):
    """Soft Dice (smp ``DiceLoss``; batch-level, classes absent from the batch are skipped)."""

    smp_cls = smp.losses.DiceLoss

    def __init__(self, mode: str, smooth: float = 0.0, log_loss: bool = False, ignore_index: int | None = None):
        super().__init__(mode, smooth=smooth, log_loss=log_loss, ignore_index=ignore_index, from_logits=True)


class FocalLoss(_SMPLoss):
    smp_cls = smp.losses.FocalLoss

    def __init__(self, mode: str, gamma: float = 2.0, alpha: float | None = None, ignore_index: int | None = None):
        super().__init__(mode, gamma=gamma, alpha=alpha, ignore_index=ignore_index)


class TverskyLoss(_SMPLoss):
    """Tversky (alpha weighs false positives, beta false negatives; 0.5/0.5 = Dice)."""

    smp_cls = smp.losses.TverskyLoss

    def __init__(self, mode: str, alpha: float = 0.3, beta: float = 0.7, gamma: float = 1.0):
        super().__init__(mode, alpha=alpha, beta=beta, gamma=gamma, from_logits=True)


class LovaszLoss(_SMPLoss):
    """Lovasz hinge (binary) / Lovasz-softmax (multiclass): a convex surrogate of the Jaccard index
    (Berman et al. 2018), smp's implementation; ``ignore_index`` pixels are dropped before the sort."""

    smp_cls = smp.losses.LovaszLoss

    def __init__(self, mode: str, per_image: bool = False, ignore_index: int | None = None):
        super().__init__(mode, per_image=per_image, ignore_index=ignore_index, from_logits=True)


class CompoundLoss(SegLoss):
    """Weighted sum of losses; a term weighted 0 is skipped (not computed)."""

    def __init__(self, mode: str, terms: dict[str, SegLoss], weights: dict[str, float]):
        super().__init__(mode)
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"weights name unknown terms {sorted(unknown)}; terms are {sorted(terms)}")
        self.terms = nn.ModuleDict(terms)
        self.weights = {k: float(weights.get(k, 1.0)) for k in terms}
        self.needs_class_weights = any(getattr(t, "needs_class_weights", False) for t in terms.values())

    def set_class_weights(self, counts):
        for t in self.terms.values():
            if getattr(t, "needs_class_weights", False):
                t.set_class_weights(counts)

    def compute(self, logits, target):
        total = logits.new_zeros(())
        for k, t in self.terms.items():
            if self.weights[k]:
                total = total + self.weights[k] * t.compute(logits, target)
        return total


class DiceCELoss(CompoundLoss):
    """Dice + cross-entropy (nnU-Net's default), weights sweepable."""

    def __init__(
        self,
        mode: str,
        weight_dice: float = 1.0,
        weight_ce: float = 1.0,
        ce_weight: list[float] | str | None = None,
        ignore_index: int | None = None,
    ):
        super().__init__(
            mode,
            {
                "dice": DiceLoss(mode, ignore_index=ignore_index),
                "ce": CrossEntropyLoss(mode, weight=ce_weight, ignore_index=ignore_index),
            },
            {"dice": weight_dice, "ce": weight_ce},
        )
