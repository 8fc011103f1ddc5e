"""A CSV logger that keeps a run's history when the run is resumed into its own folder.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` whenever its folder is not empty, so resuming a run where it
ran (``train.py ckpt_path=<run>/checkpoints/last.ckpt hydra.run.dir=<run>``) used to lose every epoch before the
interruption, and the training curves drawn from that file with them. This logger keeps the file and appends.
When training starts, :class:`KeepLogHistory` drops the rows logged at or after the step training starts from:
the part of an epoch that ran after the last checkpoint and is trained again, and anything a fresh run (step 0)
finds from an earlier run in the same folder. Each step is then in the file once, as in an uninterrupted run.
"""
from __future__ import annotations

import csv
import io

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from histoseg.data.io import atomic_write_text


class _KeepingWriter(ExperimentWriter):
    """``ExperimentWriter`` that appends to an existing ``metrics.csv`` (its header included) instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def drop_from(self, step: int) -> None:
        """Remove the rows (written and buffered) logged at ``step`` or later."""
        self.metrics = [m for m in self.metrics if m.get("step", 0) < step]
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) < step]
        if len(keep) == len(rows):
            return
        if not keep:  # nothing before the start step: a fresh file, as Lightning's logger would begin
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(keep)
        atomic_write_text(self.metrics_file_path, out.getvalue())  # never a half-written history


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` (same arguments and files), except that an existing ``metrics.csv`` is kept."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class KeepLogHistory(Callback):
    """At the start of training, drop what :class:`CSVLogger` files hold from the start step on (see the module)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # the step that Lightning writes in the "step" column: batches that stepped (not global_step, which counts
        # each optimiser step, two per batch for a GAN trained with manual optimisation)
        step = int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                lg.experiment.drop_from(step)
