"""Train for a fixed wall-clock budget instead of a number of epochs, with the learning rate decayed over the time.

Comparisons in this field are often made at equal wall time ("25 min of training on these 2 cores"), and a step
budget fixed on one machine is a different time budget on the next (bf16 vs fp32 kernels, GPU vs CPU). A plain
``trainer.max_time`` would stop the run on time, but an epoch-based cosine schedule would then be cut off at
whatever learning rate it had reached. :class:`TimeBudget` instead sets the learning rate from the *fraction of
the budget spent*: linear warm-up (optional), then cosine decay from each parameter group's base rate down to
``eta_min``, reached when the budget is spent; training then stops after the current step. Validation time counts
against the budget (it is part of what a run costs), so the best-by-metric checkpoint still comes from within it.

Enable it with ``budget_min=<minutes>`` on the ``train.py`` command line: the task then drops the configured
epoch scheduler and lifts ``trainer.max_epochs`` (see :func:`histoseg.tasks.train.apply_time_budget`). The time
already spent survives resuming (stored in the checkpoint).
"""
from __future__ import annotations

import math

import lightning as L

from histoseg.callbacks.clock import FitTimer
from histoseg.tasks.utils import ConfigError
from histoseg.utils.logging import get_logger

log = get_logger(__name__)


def budget_lr(frac: float, base: float, eta_min: float, warmup_frac: float = 0.0) -> float:
    """The learning rate at ``frac`` (0..1) of the budget: linear warm-up to ``base`` over ``warmup_frac``, then
    cosine decay to ``eta_min`` at ``frac = 1`` (held there beyond it)."""
    frac = min(max(float(frac), 0.0), 1.0)
    if warmup_frac > 0 and frac < warmup_frac:
        return base * frac / warmup_frac
    span = 1.0 - warmup_frac
    t = (frac - warmup_frac) / span if span > 0 else 1.0
    return eta_min + (base - eta_min) * 0.5 * (1.0 + math.cos(math.pi * t))


class TimeBudget(FitTimer):
    """Stop after ``minutes`` of fitting (training + validation) and decay the lr over that time (see module doc).

    Args:
        minutes: the wall-clock budget of fitting, in minutes (> 0).
        eta_min: learning rate at the end of the budget.
        warmup_frac: fraction of the budget spent on a linear warm-up from 0 (0 = none).
        schedule: ``cosine`` (decay over the time) or ``constant`` (the optimiser's lr, only the stop).
    """

    def __init__(self, minutes: float, eta_min: float = 1.0e-6, warmup_frac: float = 0.0, schedule: str = "cosine"):
        if not minutes or float(minutes) <= 0:
            raise ConfigError(f"budget_min must be a positive number of minutes, got {minutes!r}")
        if schedule not in ("cosine", "constant"):
            raise ConfigError(f"TimeBudget schedule must be 'cosine' or 'constant', got {schedule!r}")
        if not 0.0 <= float(warmup_frac) < 1.0:
            raise ConfigError(f"TimeBudget warmup_frac must be in [0, 1), got {warmup_frac!r}")
        super().__init__()
        self.minutes = float(minutes)
        self.eta_min = float(eta_min)
        self.warmup_frac = float(warmup_frac)
        self.schedule = schedule
        self._base: list[list[float]] = []
        self._restored = False  # state loaded from a checkpoint

    # ------------------------------------------------------------------ time (FitTimer: elapsed_min, resume)
    def fraction(self) -> float:
        return self.elapsed_min() / self.minutes

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule == "cosine" and trainer.lr_scheduler_configs:
            raise ConfigError(
                "the time budget sets the learning rate from the time spent, but an lr scheduler is configured "
                "too: set optimizer.scheduler=null (train.py does this itself for budget_min=...)"
            )
        # the base rate of every group: its configured lr, kept as ``initial_lr`` in the optimiser's state so that a
        # resumed run (whose groups hold the decayed lr of the checkpoint) decays from the same base
        self._base = []
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
            self._base.append([g["initial_lr"] for g in opt.param_groups])
        if trainer.ckpt_path and not self._restored:
            log.warning("resumed from %s, which holds no time-budget state: the minutes spent before are not "
                        "counted against budget_min=%g", trainer.ckpt_path, self.minutes)
        if self._fraction(trainer) >= 1.0:
            trainer.should_stop = True  # resumed with the budget spent: no further step
            log.info("time budget of %g min already spent: no training", self.minutes)
        self._set_lr(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._set_lr(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._fraction(trainer) >= 1.0 and not trainer.should_stop:
            trainer.should_stop = True  # Lightning finishes the epoch with a validation pass, so checkpoints see it
            log.info("time budget of %g min spent after %d steps (epoch %d): stopping", self.minutes,
                     trainer.global_step, trainer.current_epoch)

    def _fraction(self, trainer: L.Trainer) -> float:
        """Rank 0's fraction of the budget on every rank, so DDP ranks stop at the same step and set the same lr."""
        frac = self.fraction()
        return float(trainer.strategy.broadcast(frac, src=0)) if trainer.world_size > 1 else frac

    def _set_lr(self, trainer: L.Trainer) -> None:
        if self.schedule != "cosine":
            return
        frac = self._fraction(trainer)
        for opt, bases in zip(trainer.optimizers, self._base):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = budget_lr(frac, base, min(self.eta_min, base), self.warmup_frac)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {**super().state_dict(), "minutes": self.minutes}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._restored = True
