"""Compound losses for multi-head models (class logits + regression maps).

``MultiHeadLoss`` maps each head name to a loss and a weight. Class heads (``seg``) use any segmentation
loss with ``target = batch["seg"]`` (``ignore_index`` marks unsupervised pixels); regression heads
(``dist``, ``hv``) use :class:`RegressionLoss`: MSE (+ HoVer-Net's gradient MSE), masked to nuclei, and to
images whose instance maps are known (``batch["inst_valid"]``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from histoseg.losses import functional as Fn


class RegressionLoss(nn.Module):
    """``w_mse * MSE + w_grad * MSGE`` on a regression map.

    Args:
        mse / grad: weights of the two terms (0 skips a term).
        activation: ``none``, ``sigmoid`` (maps in [0,1], e.g. distance) or ``tanh`` (maps in [-1,1], hv)
            applied to the raw head output before the loss (and at inference).
        grad_on_nuclei: compute the gradient term only on nucleus pixels (HoVer-Net).
    """

    def __init__(self, mse: float = 1.0, grad: float = 0.0, activation: str = "none", grad_on_nuclei: bool = True):
        super().__init__()
        if activation not in ("none", "sigmoid", "tanh"):
            raise ValueError(f"activation must be none, sigmoid or tanh, got {activation!r}")
        self.w_mse, self.w_grad, self.activation, self.grad_on_nuclei = float(mse), float(grad), activation, grad_on_nuclei

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return {"none": lambda t: t, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[self.activation](x)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, nuclei: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pred = self.activate(pred.float())
        v = valid.view(-1, 1, 1).float().expand_as(nuclei)  # (B,H,W)
        if v.sum() == 0:
            return pred.sum() * 0.0
        err = ((pred - target) ** 2).mean(1)  # (B,H,W)
        loss = pred.new_zeros(())
        if self.w_mse:
            loss = loss + self.w_mse * (err * v).sum() / v.sum()
        if self.w_grad:
            m = v * (nuclei > 0).float() if self.grad_on_nuclei else v
            loss = loss + self.w_grad * Fn.gradient_mse(pred, target, m)
        return loss


class MultiHeadLoss(nn.Module):
    """Weighted sum over heads: ``terms={"seg": DiceCELoss(...), "dist": RegressionLoss(...)}``.

    Called as ``loss(outputs, batch)`` with ``outputs`` a dict of raw head outputs. A head weighted 0 is
    skipped. ``last`` holds the individual terms of the last call (logged as ``train/loss_<head>``).
    """

    mode = None  # heads carry their own modes

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float] | None = None):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        weights = dict(weights or {})
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(f"weights name unknown heads {sorted(unknown)}; heads are {sorted(terms)}")
        self.weights = {k: float(weights.get(k, 1.0)) for k in terms}
        self.needs_class_weights = any(getattr(t, "needs_class_weights", False) for t in terms.values())
        self.last: dict[str, torch.Tensor] = {}

    def set_class_weights(self, counts):
        for t in self.terms.values():
            if getattr(t, "needs_class_weights", False):
                t.set_class_weights(counts)

    def activation(self, head: str) -> str:
        t = self.terms[head] if head in self.terms else None
        return getattr(t, "activation", "none")

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        missing = [k for k in self.terms if k not in outputs]
        if missing:
            raise KeyError(f"loss terms {missing} have no model head; heads are {sorted(outputs)}")
        total = None
        self.last = {}
        for k, fn in self.terms.items():
            if not self.weights[k]:
                continue
            if isinstance(fn, RegressionLoss):
                if k not in batch:
                    raise KeyError(f"head {k!r} needs target {k!r} in the batch: add it to target.kinds")
                val = fn(outputs[k], batch[k], batch["mask"], batch["inst_valid"])
            else:
                val = fn(outputs[k], batch["seg"] if "seg" in batch else batch["mask"])
            self.last[k] = val.detach()
            total = self.weights[k] * val if total is None else total + self.weights[k] * val
        return total
