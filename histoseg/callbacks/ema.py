"""``EMA``: Lightning's ``EMAWeightAveraging`` with a decay warm-up, fitted to histoseg's train -> tune -> test flow.

* **Warm-up** (timm's ``ModelEmaV3``): the decay of the ``n``-th update is ``min(decay, (1 + n) / (10 + n))``.
  With a fixed decay the average starts as a copy of the first step's (nearly random) weights and keeps
  ``decay ** steps`` of them: 0.995 ** 512 = 8 % after a 512-step run, and the first epochs validate an
  almost untrained network. With the warm-up the average covers roughly the last tenth of the steps until the
  decay reaches its cap.
* **Loading**: Lightning's callback saves the average as the checkpoint's ``state_dict`` and the optimiser's
  weights as ``current_model_state``, and on *any* checkpoint load puts ``current_model_state`` back into the
  module. That is right for resuming a fit, but ``trainer.test(ckpt_path=best)`` at the end of training would
  then score the raw weights while validation picked the checkpoint by its average, and ``histoseg-eval`` (which
  reads ``state_dict``) would disagree with the run's own test. Here the raw weights are restored only when
  fitting; every other stage keeps the average.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


def ema_multi_avg_fn(decay: float, warmup: bool = True):
    """``AveragedModel`` ``multi_avg_fn``: ``avg <- d * avg + (1 - d) * current`` with ``d = decay``, or with
    ``warmup`` ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` earlier updates. Integer buffers (BatchNorm's
    ``num_batches_tracked``) take the current value."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = torch.clamp((1 + n) / (10 + n), max=decay) if warmup else torch.full_like(n, decay, dtype=torch.float64)
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, (1 - d).to(a.dtype))
            else:
                a.copy_(c)

    return update


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights (``decay`` per optimiser step, warmed up unless ``warmup=False``),
    used for validation, checkpoints (``state_dict``), tuning, the test and inference; resume continues both the
    raw and the averaged weights exactly."""

    def __init__(self, decay: float = 0.995, warmup: bool = True, **kwargs: Any):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA: decay={decay} must be in (0, 1)")
        super().__init__(decay=decay, **kwargs)
        self.decay, self.warmup = float(decay), bool(warmup)
        self._kwargs.pop("avg_fn", None)  # replaced by the warmed-up, foreach-style update
        self._kwargs["multi_avg_fn"] = ema_multi_avg_fn(self.decay, self.warmup)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
