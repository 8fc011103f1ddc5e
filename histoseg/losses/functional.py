"""Pure loss functions on logits (no modules, no state)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_weights_from_counts(counts) -> torch.Tensor:
    """w_i = N / N_i (the tumour-cellularity seed); absent classes get weight 0."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    w = torch.where(c > 0, c.sum() / c.clamp_min(1), torch.zeros_like(c))
    return w.float()


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, ignore_index: int | None = None
) -> torch.Tensor:
    """Pixel CE. Binary mode (1 logit): BCE-with-logits, class weights applied per pixel (w[target])."""
    if logits.shape[1] == 1:
        t = target.float()
        valid = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else target != ignore_index
        t = torch.where(valid, t, torch.zeros_like(t))
        pix = F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
        if weight is not None:
            w = weight.to(logits.device)[t.long()] * valid
            return (pix * w).sum() / w.sum().clamp_min(1e-12)
        return pix[valid].mean() if ignore_index is not None else pix.mean()
    return F.cross_entropy(
        logits, target, weight=None if weight is None else weight.to(logits.device),
        ignore_index=-100 if ignore_index is None else ignore_index,
    )


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, dims=(0, 2, 3), eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice per channel, reduced over ``dims``."""
    inter = (probs * onehot).sum(dims)
    card = probs.sum(dims) + onehot.sum(dims)
    return (2 * inter + eps) / (card + eps)


def gradient_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between Sobel gradients of ``pred`` and ``target`` (HoVer-Net's MSGE), optionally masked."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=pred.device) / 8.0
    c = pred.shape[1]
    wx = kx.expand(c, 1, 3, 3)
    wy = kx.t().expand(c, 1, 3, 3)

    def grads(t):
        t = F.pad(t, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(t, wx, groups=c), F.conv2d(t, wy, groups=c)

    pgx, pgy = grads(pred)
    tgx, tgy = grads(target)
    err = (pgx - tgx) ** 2 + (pgy - tgy) ** 2
    if mask is not None:
        m = mask.unsqueeze(1).float().expand_as(err)
        return (err * m).sum() / m.sum().clamp_min(1.0)
    return err.mean()
