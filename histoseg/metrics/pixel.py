"""Pixel metrics: online torchmetrics collections (per stage) and per-image scores for whole-image reports."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryJaccardIndex,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)
from torchmetrics.functional.classification import binary_stat_scores, multiclass_stat_scores


class SegMetrics(nn.Module):
    """Online Dice / IoU / pixel accuracy, accumulated over all pixels seen in a stage.

    Binary: foreground Dice (= F1) and IoU. Multiclass: per-class scores averaged over the
    foreground classes (class 0 = background is excluded); ``acc`` is the overall pixel accuracy.
    ``update`` takes hard predictions ``(B,H,W)`` int and targets ``(B,H,W)``.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        if self.num_classes == 2:
            self.dice, self.iou, self.acc = BinaryF1Score(), BinaryJaccardIndex(), BinaryAccuracy()
        else:
            k = self.num_classes
            self.dice = MulticlassF1Score(k, average="none")
            self.iou = MulticlassJaccardIndex(k, average="none")
            self.acc = MulticlassAccuracy(k, average="micro")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        p, t = preds.reshape(-1), target.reshape(-1)
        for m in (self.dice, self.iou, self.acc):
            m.update(p, t)

    def compute(self) -> dict[str, torch.Tensor]:
        d, i, a = self.dice.compute(), self.iou.compute(), self.acc.compute()
        if self.num_classes > 2:
            d, i = d[1:].mean(), i[1:].mean()
        return {"dice": d, "iou": i, "acc": a}

    def reset(self) -> None:
        for m in (self.dice, self.iou, self.acc):
            m.reset()


def image_scores(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int) -> dict:
    """Scores of one whole image: ``acc``, ``dice``, ``iou`` (foreground mean), and per-class ``dice_<k>``.

    Counting uses torchmetrics' stat scores. An image whose foreground is empty in both prediction and
    target scores Dice = IoU = 1 (nothing to find, nothing found).
    """
    p = torch.as_tensor(np.asarray(pred)).long().reshape(-1)
    t = torch.as_tensor(np.asarray(target)).long().reshape(-1)
    out: dict[str, float] = {"acc": float((p == t).float().mean())}

    def dice_iou(tp, fp, fn):
        if tp + fp + fn == 0:
            return 1.0, 1.0
        return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)

    if num_classes == 2:
        tp, fp, tn, fn, _ = (int(v) for v in binary_stat_scores(p, t))
        out["dice"], out["iou"] = dice_iou(tp, fp, fn)
        return out
    stats = multiclass_stat_scores(p, t, num_classes, average="none")  # (K, 5): tp fp tn fn support
    dices, ious = [], []
    for k in range(1, num_classes):
        tp, fp, _, fn, _ = (int(v) for v in stats[k])
        d, i = dice_iou(tp, fp, fn)
        out[f"dice_{k}"], out[f"iou_{k}"] = d, i
        dices.append(d)
        ious.append(i)
    out["dice"], out["iou"] = float(np.mean(dices)), float(np.mean(ious))
    return out
