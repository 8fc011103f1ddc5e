"""``RunFigures``: the figures every run saves beside its checkpoints.

* at fit end: ``<dirpath>/curves.png``, loss and Dice per epoch (train and val) from the run's CSV log;
* at test end: ``<dirpath>/test/<case>.png``, image / ground truth / prediction panels of the first
  ``max_panels`` test images (the post-processed prediction that ``per_image.csv`` scores), and with
  ``overlays`` ``<dirpath>/test/<case>_overlay.png``: the predicted outlines on the image, full resolution.
"""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L

from histoseg.utils.logging import get_logger

log = get_logger(__name__)


def safe_name(case_id: str) -> str:
    """A case id as a file name (path separators and odd characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(case_id)).strip("._") or "case"


class RunFigures(L.Callback):
    """Write training curves at fit end and test panels at test end.

    Args:
        dirpath: the run's figure folder (``${paths.output_dir}/figures``).
        curves: draw ``curves.png`` from the CSV logger's ``metrics.csv`` (skipped, with a warning, when the
            run has no CSV logger, e.g. under ``fast_dev_run``).
        max_panels: at most this many test images get figures per test run (0 = none).
        overlays: also write each of those images with the predicted outlines drawn on it.
    """

    def __init__(self, dirpath: str, curves: bool = True, max_panels: int = 8, overlays: bool = True):
        self.dirpath = Path(dirpath)
        self.curves, self.overlays = bool(curves), bool(overlays)
        self.max_panels = int(max_panels)
        if self.max_panels < 0:
            raise ValueError(f"max_panels must be >= 0, got {max_panels}")
        self._panels = 0

    @staticmethod
    def metrics_csv(trainer: L.Trainer) -> Path | None:
        from lightning.pytorch.loggers import CSVLogger

        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                lg.save()  # flush buffered rows
                return Path(lg.log_dir) / "metrics.csv"
        return None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.curves or not trainer.is_global_zero:
            return
        csv = self.metrics_csv(trainer)
        if csv is None or not csv.is_file():
            log.warning("no CSV metrics log in this run (logger=csv writes one): training curves not drawn")
            return
        from histoseg.analysis.figures import training_curves

        try:
            out = training_curves(csv, self.dirpath / "curves.png")
        except ValueError as e:
            log.warning("training curves not drawn: %s", e)
            return
        log.info("training curves written to %s", out)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panels = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or self._panels >= self.max_panels or not isinstance(outputs, dict):
            return
        from histoseg.analysis.figures import panel_figure, save_overlay

        case = str(batch["case_id"][0])
        dice = outputs.get("scores", {}).get("dice")
        title = case if dice is None else f"{case}   Dice {dice:.3f}"
        image, labels, inst = batch["image"][0], outputs["labels"], outputs.get("instances")
        out = self.dirpath / "test" / safe_name(case)
        panel_figure(image, batch["mask"][0].cpu().numpy(), labels, pl_module.num_classes,
                     out.with_name(out.name + ".png"), title=title, instances=inst)
        if self.overlays:
            save_overlay(out.with_name(out.name + "_overlay.png"), image, labels, pl_module.num_classes, inst)
        self._panels += 1
