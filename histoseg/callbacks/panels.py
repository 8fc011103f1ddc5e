"""``ValidationPanels``: every N epochs, image / ground truth / prediction panels of validation images.

Each panel is one PNG, ``<run dir>/panels/epoch_<NNN>/<case_id>.png``, always written (so CSV-only runs
have them too), and is also sent to every logger that can show images: W&B (``WandbLogger.log_image``,
key ``val/panels``) and TensorBoard (``add_image``, tag ``val/panels/<i>``). The predictions are the
whole-image ones the task scores (``SegmentationTask.val_examples``), so no extra inference is run.
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch

from histoseg.analysis.figures import BINARY_CONTOUR
from histoseg.analysis.palette import palette_for
from histoseg.data.io import atomic_write_bytes
from histoseg.utils.logging import get_logger

log = get_logger(__name__)

def class_colours(num_classes: int) -> np.ndarray:
    """``(K, 3)`` colours of the panels: the run figures' palette (``histoseg.analysis``), binary in green."""
    if int(num_classes) == 2:
        return np.array([[0, 0, 0], BINARY_CONTOUR], np.uint8)
    return palette_for(num_classes)


def _to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return np.ascontiguousarray(a)


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """Class colours blended onto the image (background left as is) with class outlines drawn opaque."""
    labels = labels.astype(np.int64)
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"class map holds value {int(labels.max())} but there are {num_classes} classes")
    colours = class_colours(num_classes)[labels]
    fg = labels > 0
    out = image.copy()
    out[fg] = (image[fg] * (1 - alpha) + colours[fg] * alpha).astype(np.uint8)
    edge = cv2.morphologyEx(labels.astype(np.uint16), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edge & fg] = colours[edge & fg]
    return out


def render_panel(image, mask, pred, num_classes: int, max_side: int = 512, gap: int = 4) -> np.ndarray:
    """``HxWx3`` uint8 panel: image | ground truth overlay | prediction overlay, longest side <= ``max_side``."""
    img = _to_uint8_image(image)
    gt = np.asarray(mask.numpy() if isinstance(mask, torch.Tensor) else mask)
    pr = np.asarray(pred.numpy() if isinstance(pred, torch.Tensor) else pred)
    if gt.shape != img.shape[:2] or pr.shape != img.shape[:2]:
        raise ValueError(f"panel: image {img.shape[:2]}, mask {gt.shape} and prediction {pr.shape} differ in size")
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        gt = cv2.resize(gt.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST)  # labels: nearest
        pr = cv2.resize(pr.astype(np.uint16), size, interpolation=cv2.INTER_NEAREST)
    sep = np.full((img.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([img, sep, overlay(img, gt, num_classes), sep, overlay(img, pr, num_classes)], axis=1)


class ValidationPanels(L.Callback):
    """Image / ground truth / prediction panels of the first ``max_images`` validation images.

    Args:
        every_n_epochs: draw after every N-th validation epoch (and after the last epoch).
        max_images: validation images per panel set (the first ones of the validation split on rank 0).
        max_side: panels are downscaled so their image side is at most this many pixels.
        dirname: folder under the run dir (``trainer.default_root_dir``) for the PNGs.
    """

    def __init__(self, every_n_epochs: int = 5, max_images: int = 4, max_side: int = 512, dirname: str = "panels"):
        if every_n_epochs < 1 or max_images < 1:
            raise ValueError(f"ValidationPanels: every_n_epochs ({every_n_epochs}) and max_images ({max_images}) must be >= 1")
        self.every_n_epochs, self.max_images = int(every_n_epochs), int(max_images)
        self.max_side, self.dirname = int(max_side), dirname
        self.written: list[Path] = []
        self.active = False

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.should_stop or (trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch)
        return epoch % self.every_n_epochs == 0 or last  # should_stop: a spent time budget (set before this validation)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.active = hasattr(pl_module, "val_examples") and hasattr(pl_module, "num_classes")
        if not self.active:  # e.g. the super-resolution task: nothing to draw, not an error
            log.info("ValidationPanels: %s keeps no validation predictions; no panels", type(pl_module).__name__)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            pl_module.val_keep = self.max_images if self._due(trainer) and trainer.is_global_zero else 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        examples = list(pl_module.val_examples)
        pl_module.val_keep, pl_module.val_examples = 0, []
        if not examples or not trainer.is_global_zero:
            return
        k = pl_module.num_classes
        panels = [render_panel(e["image"], e["mask"], e["pred"], k, self.max_side) for e in examples]
        captions = [str(e["case_id"]) for e in examples]
        out = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}"
        for panel, cid in zip(panels, captions):
            ok, buf = cv2.imencode(".png", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError(f"could not encode the validation panel of {cid}")
            path = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', cid)}.png"
            atomic_write_bytes(path, buf.tobytes())
            self.written.append(path)
        self._log(trainer, panels, captions)

    @staticmethod
    def _log(trainer: L.Trainer, panels: list[np.ndarray], captions: list[str]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="val/panels", images=panels, step=step, caption=captions)
            elif isinstance(lg, TensorBoardLogger):
                for i, (panel, cid) in enumerate(zip(panels, captions)):
                    lg.experiment.add_image(f"val/panels/{i}_{cid}", panel, global_step=step, dataformats="HWC")
