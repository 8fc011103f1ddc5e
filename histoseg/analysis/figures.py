"""Figures: contour overlays, the 3-panel image / ground truth / prediction view (as the BreCaHAD seed) and
training curves from a run's CSV log.

Matplotlib is used through ``matplotlib.figure.Figure`` only (no pyplot, no global backend switch), and
every file is written atomically (rendered to memory, then temp file + rename).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from histoseg.analysis.palette import colorize, palette_for
from histoseg.data.io import atomic_write_bytes, write_image

BINARY_CONTOUR = (0, 255, 0)


def _as_rgb_uint8(image) -> np.ndarray:
    """``HxWx3`` uint8, or a ``3xHxW`` float tensor/array in [0, 1] -> ``HxWx3`` uint8."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return a


def overlay_contours(image, labels: np.ndarray, num_classes: int, instances: np.ndarray | None = None,
                     thickness: int = 1) -> np.ndarray:
    """The image with object outlines drawn on it (``HxWx3`` uint8).

    Outlines are the inner boundaries of ``instances`` when given (touching nuclei stay separate), else of
    each class region of ``labels``. Binary models draw green; multiclass models draw each outline in its
    class colour (cellularity: tumour red, non-tumour green, boundary blue).
    """
    rgb = _as_rgb_uint8(image).copy()
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} differ in size")
    regions = np.asarray(instances) if instances is not None else labels
    edge = find_boundaries(regions, mode="inner") & (regions > 0)
    if thickness > 1:
        from scipy.ndimage import binary_dilation

        edge = binary_dilation(edge, iterations=int(thickness) - 1) & (regions > 0)
    if int(num_classes) == 2:
        rgb[edge] = BINARY_CONTOUR
    else:
        rgb[edge] = palette_for(num_classes)[labels[edge]]
    return rgb


def _mask_rgb(labels: np.ndarray, num_classes: int) -> np.ndarray:
    m = colorize(labels, num_classes)
    return np.repeat(m[..., None], 3, axis=2) if m.ndim == 2 else m


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Render a matplotlib ``Figure`` to PNG in memory and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def panel_figure(image, target: np.ndarray | None, pred: np.ndarray, num_classes: int, path: str | Path,
                 title: str | None = None, instances: np.ndarray | None = None) -> Path:
    """Three panels, image | ground truth | prediction (two when ``target`` is ``None``), written as PNG.

    Masks use :func:`~histoseg.analysis.palette.colorize` (binary white on black; 4 classes red / green /
    blue / black). The prediction panel also outlines ``instances`` when given.
    """
    from matplotlib.figure import Figure

    rgb = _as_rgb_uint8(image)
    panels = [("image", rgb)]
    if target is not None:
        panels.append(("ground truth", _mask_rgb(np.asarray(target), num_classes)))
    pred_rgb = _mask_rgb(np.asarray(pred), num_classes)
    if instances is not None:
        edge = find_boundaries(np.asarray(instances), mode="inner") & (np.asarray(instances) > 0)
        pred_rgb = pred_rgb.copy()
        pred_rgb[edge] = (255, 200, 0)
    panels.append(("prediction", pred_rgb))
    h, w = rgb.shape[:2]
    scale = 4.0 / max(h, w)
    fig = Figure(figsize=(len(panels) * w * scale, h * scale + (0.6 if title else 0.3)), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (name, arr) in zip(np.atleast_1d(axes), panels):
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_overlay(path: str | Path, image, labels: np.ndarray, num_classes: int,
                 instances: np.ndarray | None = None) -> Path:
    """:func:`overlay_contours` written as a full-resolution PNG (atomic)."""
    write_image(path, overlay_contours(image, labels, num_classes, instances))
    return Path(path)


CURVES = (("loss", ("train/loss_epoch", "train/loss", "val/loss")), ("dice", ("train/dice", "val/dice")))


def epoch_table(metrics_csv: str | Path):
    """The CSVLogger's ``metrics.csv`` reduced to one row per epoch (last logged value of each column)."""
    import pandas as pd

    p = Path(metrics_csv)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: metrics CSV not found (was the run logged with logger=csv?)")
    df = pd.read_csv(p)
    if "epoch" not in df.columns or df["epoch"].isna().all():
        raise ValueError(f"{p}: no 'epoch' column with values; not a Lightning CSVLogger metrics file")
    return df.dropna(subset=["epoch"]).groupby("epoch").last()


def training_curves(metrics_csv: str | Path, path: str | Path) -> Path:
    """Loss and Dice per epoch, train and val, from a run's ``csv/metrics.csv`` (written as PNG).

    ``train/loss_epoch`` (the epoch mean of the step losses) is plotted as the train loss; columns the run
    did not log are left out. Raises ``ValueError`` naming the file when it holds no loss or Dice at all.
    """
    from matplotlib.figure import Figure

    table = epoch_table(metrics_csv)
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    drawn = 0
    for ax, (name, cols) in zip(axes, CURVES):
        seen = set()
        for col in cols:
            stage = col.split("/")[0]
            if col not in table.columns or stage in seen:
                continue
            s = table[col].dropna()
            if s.empty:
                continue
            seen.add(stage)
            ax.plot(s.index.astype(int), s.values, marker="o", ms=3, label=stage)
            drawn += 1
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if seen:
            ax.legend(fontsize=8)
    if drawn == 0:
        raise ValueError(f"{metrics_csv}: no per-epoch loss or dice columns ({', '.join(c for _, cs in CURVES for c in cs)})")
    fig.tight_layout()
    return save_figure(fig, path)
