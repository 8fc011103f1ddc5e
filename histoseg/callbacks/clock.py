"""Wall-clock time of fitting, logged per epoch, so a run's metrics say *when* each score was reached.

Step budgets are what the recipes fix, but comparisons in this field are often made at equal wall time (the
project's CPU reference is "25 min of training"). ``time/fit_min`` in ``metrics.csv`` (and W&B) gives, for
every epoch, the minutes of training + validation so far; the epoch of the best checkpoint then tells how long
the selected model took to reach. The count survives resuming: it is stored in the checkpoint.
"""
from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback

_clock = time.perf_counter  # one name for tests to replace


class FitTimer(Callback):
    """Wall-clock minutes of fitting (training + validation) so far, kept across resumes in the checkpoint: the
    clock that :class:`WallClock` logs and :class:`~histoseg.callbacks.budget.TimeBudget` spends."""

    def __init__(self):
        self._t0: float | None = None
        self._offset = 0.0  # minutes already spent before a resume

    def elapsed_min(self) -> float:
        return self._offset + ((_clock() - self._t0) / 60.0 if self._t0 is not None else 0.0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = _clock()

    def state_dict(self) -> dict:
        return {"fit_min": self.elapsed_min()}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._t0 is not None:  # restored after on_fit_start (some strategies do): count from now
            self._t0 = _clock()
        self._offset = float(state_dict.get("fit_min", 0.0))


class WallClock(FitTimer):
    """Logs ``time/fit_min`` (wall-clock minutes of fitting so far) at the end of every training epoch."""

    def __init__(self, name: str = "time/fit_min"):
        super().__init__()
        self.name = name

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation loop, so the figure covers training + validation
        pl_module.log(self.name, round(self.elapsed_min(), 3), on_step=False, on_epoch=True)
