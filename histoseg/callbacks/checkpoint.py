"""``ModelCheckpoint`` that writes ``last.ckpt`` after every epoch again.

Lightning 2.6 changed ``save_last=True`` to write ``last.ckpt`` only at steps where a top-k checkpoint
is saved, so with ``save_top_k=1`` it becomes a copy of the best checkpoint and ``ckpt_path=.../last.ckpt``
would resume from the best epoch instead of the last one. This subclass restores the documented meaning
(the state after the latest epoch) and keeps everything else, including ``last_model_path``.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; with ``save_last=True``, ``last.ckpt`` is rewritten at every save point."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_written_step = -1

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _ensure_last(self, trainer) -> None:
        if (
            self.save_last is not True
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self._last_written_step == trainer.global_step
            or trainer.global_step == 0
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)
