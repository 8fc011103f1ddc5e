"""``EMA``: Lightning's ``EMAWeightAveraging`` for histoseg's train -> tune -> test flow.

Lightning's callback saves the average as the checkpoint's ``state_dict`` and the optimiser's weights as
``current_model_state``, and on *any* checkpoint load puts ``current_model_state`` back into the module. That is
right for resuming a fit, but ``trainer.test(ckpt_path=best)`` at the end of training would then score the raw
weights while validation picked the checkpoint by its average, and ``histoseg-eval`` (which reads ``state_dict``)
would disagree with the run's own test. Here the raw weights are restored only when fitting; every other stage
keeps the average.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights (``decay`` per optimiser step), used for validation,
    checkpoints (``state_dict``), tuning, the test and inference; resume continues both the raw and the
    averaged weights exactly."""

    def __init__(self, decay: float = 0.995, **kwargs: Any):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA: decay={decay} must be in (0, 1)")
        super().__init__(decay=decay, **kwargs)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
