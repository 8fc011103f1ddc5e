"""``predict(cfg)``: segment new images with a trained checkpoint and report nucleus morphometry.

``input`` is an image, a folder (images with one of ``extensions``; ``recursive=true`` descends) or a glob.
For every image the pipeline is *read -> predict_one(image) -> write outputs*:

* ``masks/<name>.png``: binary 0/255, or colour-coded for multiclass models (4 classes: tumour red,
  non-tumour green, boundary blue, background black);
* ``overlays/<name>.png``: outlines of the predicted nuclei / regions drawn on the image;
* ``instances/<name>.png``: 16-bit instance map (``.tif`` with 32-bit ids above 65535 nuclei), when the
  post-processing produces instances;
* one row of ``report.csv``: size, foreground %, nuclei count, density per mm^2, mean / median area (pixels
  and um^2), mean eccentricity and solidity, cellularity % (4-class models).

Whole-slide images (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, and ``.tif`` / ``.ome.tif`` files holding a pyramid,
see :func:`histoseg.wsi.slide.is_slide`) take the streaming path of :func:`histoseg.wsi.predict_slide` instead:
their outputs go to ``<wsi.output_dir>/<name>/`` (mask OME-TIFF, QuPath GeoJSON, overlay, tissue mask,
``summary.csv``), they get a ``kind=slide`` row in ``report.csv``, and ``<wsi.output_dir>/slides.csv`` collects
every slide summary in that folder. ``input_index`` picks one input (one multirun job per slide).

Unreadable images do not stop the run: each is logged with its path and the reason, gets a row with
``status=error`` and the message in ``error``, and ``histoseg-predict`` exits with status 1 after the
other images are done. Every output file is written atomically (temp file + rename).
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from histoseg.analysis.figures import overlay_contours
from histoseg.analysis.morphometry import NUCLEI_KEYS, cellularity, nuclei_stats
from histoseg.analysis.palette import colorize
from histoseg.data.io import DataError, atomic_write_bytes, atomic_write_text, read_image, write_image
from histoseg.models.loading import load_task
from histoseg.tasks.restore import (
    checkpoint_paths,
    postprocess_overrides,
    resolve_device,
    resolve_stain_reference,
    restore_models,
)
from histoseg.tasks.utils import ConfigError, check_mandatory, task_wrapper, write_run_metadata
from histoseg.utils.logging import get_logger

log = get_logger(__name__)

REPORT_COLUMNS = (
    "image", "source", "status", "error", "height", "width", "mpp", "foreground_pct", *NUCLEI_KEYS,
    "cellularity_pct", "mask", "overlay", "instances", "kind", "tissue_area_mm2", "geojson",
)


# ---------------------------------------------------------------------- inputs
def resolve_inputs(spec: str, extensions: list[str], recursive: bool = False) -> list[Path]:
    """The image files named by ``spec``: one file (taken as is), a folder (files with one of
    ``extensions``) or a glob pattern (``**`` recurses). Raises :class:`DataError` if nothing matches."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        found = p.rglob("*") if recursive else p.iterdir()
        files = sorted(f for f in found if f.is_file() and f.suffix.lower() in exts and not f.name.startswith("."))
        what = f"folder {p} has no images with extensions {sorted(exts)}"
    elif glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        what = f"glob {spec!r} matches no files"
    else:
        raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError(what)
    return files


def output_names(files: list[Path]) -> list[str]:
    """Output name of each input: its stem; when stems collide, its path relative to the inputs' common
    folder (``a/x.png``, ``b/x.png`` -> ``a_x``, ``b_x``), keeping the extension if still needed
    (``x.png``, ``x.jpg`` -> ``x_png``, ``x_jpg``)."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    resolved = [f.resolve() for f in files]
    root = Path(os.path.commonpath([str(f.parent) for f in resolved]))
    rel = [f.relative_to(root) for f in resolved]
    names = ["_".join(r.with_suffix("").parts) for r in rel]
    if len(set(names)) != len(names):
        names = ["_".join(r.parts).replace(".", "_") for r in rel]
    return names


def resolve_mpp(mpp: float | None, task, ckpt_path: str) -> float:
    """Microns per pixel of the inputs: ``mpp`` if given, else the training dataset's (stored in the checkpoint)."""
    if mpp is not None:
        if not float(mpp) > 0:
            raise ConfigError(f"mpp must be a positive number of microns per pixel, got {mpp}")
        return float(mpp)
    stored = task.data_info.get("mpp")
    if stored is None:
        raise ConfigError(
            f"mpp is unknown: {ckpt_path} does not store its training data's pixel size; pass mpp=<microns per "
            "pixel of the input images> (about 0.25 at 40x, 0.5 at 20x)"
        )
    log.info("mpp %.4g from the checkpoint's training dataset %r", stored, task.data_info.get("name"))
    return float(stored)


# ---------------------------------------------------------------------- per image
def make_predict_one(task, device, sr_task=None, sr_cfg=None) -> Callable[[np.ndarray], dict]:
    """``image (HxWx3 uint8) -> {"probs", "labels", "instances"[, "image"]}``: the one model call per image.

    With ``sr_task`` (a super-resolution checkpoint), the image is first super-resolved tile by tile
    (Gaussian-blended overlapping tiles, :func:`histoseg.inference.superres.super_resolve`) and the
    segmentation runs on the SR image, returned as ``"image"`` (outputs and overlays refer to it).
    """
    task.to(device).eval()
    if sr_task is None:

        def predict_one(image: np.ndarray) -> dict:
            return task.predict_image(image)

        return predict_one

    from histoseg.inference.superres import super_resolve

    sr_task.to(device).eval()
    sr_cfg = dict(sr_cfg or {})

    def predict_sr_then_segment(image: np.ndarray) -> dict:
        sr = super_resolve(
            image, sr_task, tile_shape=tuple(sr_cfg.get("tile_shape", (64, 64))), overlap=sr_cfg.get("overlap", 0.25),
            batch_size=sr_cfg.get("batch_size", 4), device=device,
        )
        sr_u8 = (sr.clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).numpy()
        return {**task.predict_image(sr_u8), "image": sr_u8}

    return predict_sr_then_segment


def image_report(result: dict, mpp: float, num_classes: int, report_cfg) -> dict:
    """Morphometry columns of one image's report row."""
    labels, inst = result["labels"], result["instances"]
    row: dict = {"foreground_pct": 100.0 * float((labels > 0).mean())}
    if inst is not None:
        row.update(nuclei_stats(inst, mpp))
    if num_classes == 4:
        row["cellularity_pct"] = cellularity(labels, report_cfg.tumour_classes, report_cfg.nucleus_classes)
    return row


def write_instances(folder: Path, name: str, inst: np.ndarray) -> Path:
    """``<folder>/<name>.png`` as 16-bit PNG (ids up to 65535), else ``<name>.tif`` with 32-bit ids; atomic."""
    if int(inst.max(initial=0)) <= np.iinfo(np.uint16).max:
        path = folder / f"{name}.png"
        write_image(path, inst.astype(np.uint16))
        return path
    import tifffile

    path = folder / f"{name}.tif"
    buf = io.BytesIO()
    tifffile.imwrite(buf, inst.astype(np.uint32), compression="zlib")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_outputs(name: str, image: np.ndarray, result: dict, out: Path, num_classes: int, save) -> dict:
    """Mask, overlay and instance files of one image; returns their paths (relative to ``out``)."""
    files: dict = {}
    labels, inst = result["labels"], result["instances"]
    if save.mask:
        p = out / "masks" / f"{name}.png"
        write_image(p, colorize(labels, num_classes))
        files["mask"] = str(p.relative_to(out))
    if save.overlay:
        p = out / "overlays" / f"{name}.png"
        write_image(p, overlay_contours(image, labels, num_classes, inst))
        files["overlay"] = str(p.relative_to(out))
    if save.instances and inst is not None:
        files["instances"] = str(write_instances(out / "instances", name, inst).relative_to(out))
    return files


def write_report_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


# ---------------------------------------------------------------------- slides
def slide_report_row(path: Path, name: str, task, cfg: DictConfig, device) -> dict:
    """Predict one whole-slide image (:func:`histoseg.wsi.predict_slide`); its ``report.csv`` columns."""
    from histoseg.wsi.pipeline import predict_slide

    s = predict_slide(path, name, task, cfg.wsi, cfg.wsi.output_dir, device,
                      ckpt_path=checkpoint_paths(cfg.ckpt_path), report=cfg.report, progress=bool(cfg.progress))
    folder = Path(cfg.wsi.output_dir) / name
    keep = ("height", "width", "mpp", "foreground_pct", *NUCLEI_KEYS, "cellularity_pct", "tissue_area_mm2")
    row = {k: s.get(k) for k in keep}
    row.update(mask=str(folder / s["mask"]), overlay=str(folder / s["overlay"]), geojson=str(folder / s["geojson"]))
    return row


def slide_error_summary(path: Path, name: str, error: str, cfg: DictConfig) -> None:
    """``<wsi.output_dir>/<name>/summary.csv`` with the error, so the cohort table lists failed slides too."""
    from histoseg.wsi.pipeline import error_row, write_rows

    if error:
        write_rows(Path(cfg.wsi.output_dir) / name / "summary.csv", [error_row(path, name, error)])


# ---------------------------------------------------------------------- the run
@task_wrapper
def predict(cfg: DictConfig) -> tuple[dict, dict]:
    """Predict every input image. Returns ``(summary, objects)``; ``summary`` has ``n_images``, ``n_ok``,
    ``n_errors`` and ``errors`` (``[(path, message), ...]``); ``objects["rows"]`` are the report rows."""
    from histoseg.wsi.slide import is_slide

    check_mandatory(cfg)
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    inputs = resolve_inputs(str(cfg.input), list(cfg.extensions), bool(cfg.recursive))
    names = output_names(inputs)
    if cfg.input_index is not None:
        i = int(cfg.input_index)
        if not 0 <= i < len(inputs):
            log.info("input_index=%d: %s has %d input(s), nothing to do", i, cfg.input, len(inputs))
            return {"n_images": 0, "n_ok": 0, "n_errors": 0, "errors": []}, {"cfg": cfg, "rows": [], "report": None}
        inputs, names = [inputs[i]], [names[i]]
    slides = [is_slide(p, int(cfg.wsi.min_slide_side)) for p in inputs]
    ckpts = checkpoint_paths(cfg.ckpt_path)  # several: an ensemble (raw outputs averaged)
    task, _ = restore_models(ckpts, cfg.inference, postprocess_overrides(cfg), device="cpu",
                             weights=cfg.get("weights", "averaged"))
    if resolve_stain_reference(task, cfg) is not None and any(slides):
        raise ConfigError(f"inference.stain_norm={task.inference['stain_norm']} normalises whole images by their own "
                          f"colour statistics, which is not implemented for whole slides ({sum(slides)} in "
                          f"input={cfg.input}); predict them with inference.stain_norm=null")
    mpp = resolve_mpp(cfg.mpp, task, ckpts[0]) if not all(slides) else None
    if task.num_classes == 4:
        try:
            cellularity(np.zeros((1, 1), np.uint8), cfg.report.tumour_classes, cfg.report.nucleus_classes)
        except ValueError as e:
            raise ConfigError(f"report: {e}") from None
    sr_task = None
    if cfg.get("sr_ckpt"):
        sr_task = load_task(cfg.sr_ckpt)
        if not hasattr(sr_task, "discriminator") and getattr(sr_task.net, "scale", 1) == 1:
            raise ConfigError(f"sr_ckpt={cfg.sr_ckpt} is not a super-resolution checkpoint")
        scale = int(sr_task.net.scale)
        if cfg.mpp is not None:
            mpp = float(cfg.mpp) / scale  # mpp describes the LR inputs; reports refer to SR pixels
        log.info("super-resolving inputs x%d with %s before segmentation", scale, cfg.sr_ckpt)
        if any(slides):
            raise ConfigError(f"sr_ckpt: super-resolution before segmentation takes images, not whole slides "
                              f"({sum(slides)} slide(s) in input={cfg.input})")
    predict_one = make_predict_one(task, device, sr_task, cfg.get("sr"))
    write_run_metadata(cfg, out)
    log.info("Predicting %d image(s) and %d slide(s) with %s into %s", slides.count(False), slides.count(True),
             ", ".join(ckpts), out)

    rows: list[dict] = []
    errors: list[tuple[str, str]] = []
    try:
        for path, name, slide in tqdm(list(zip(inputs, names, slides)), desc="predict", unit="input",
                                      disable=not cfg.progress):
            row: dict = {"image": name, "source": str(path), "mpp": mpp, "kind": "slide" if slide else "image"}
            try:
                if slide:
                    row.update(slide_report_row(path, name, task, cfg, device))
                else:
                    image = read_image(path)
                    result = predict_one(image)
                    if "image" in result:  # the pipeline changed the image (super-resolution)
                        image = result.pop("image")
                        if cfg.save.get("sr_image", True):
                            write_image(out / "sr" / f"{name}.png", image)
                    row.update(height=image.shape[0], width=image.shape[1])
                    row.update(write_outputs(name, image, result, out, task.num_classes, cfg.save))
                    row.update(image_report(result, mpp, task.num_classes, cfg.report))
                row["status"] = "ok"
            except DataError as e:  # unreadable input: the message names the file
                log.error("skipped: %s", e)
                row.update(status="error", error=str(e))
                errors.append((str(path), str(e)))
            except Exception as e:  # anything else fails this image only; the traceback goes to the log
                log.exception("%s: prediction failed", path)
                msg = f"{path}: prediction failed ({type(e).__name__}: {e})"
                row.update(status="error", error=msg)
                errors.append((str(path), msg))
            if slide and row["status"] == "error":
                slide_error_summary(path, name, row["error"], cfg)
            rows.append(row)
    finally:
        write_report_csv(rows, out / "report.csv")  # also after an interrupt: what was done is reported
        if any(slides):
            from histoseg.wsi.pipeline import update_cohort_table

            update_cohort_table(Path(cfg.wsi.output_dir))
    summary = {"n_images": len(rows), "n_ok": len(rows) - len(errors), "n_errors": len(errors), "errors": errors}
    log.info("%d of %d image(s) predicted; report: %s", summary["n_ok"], len(rows), out / "report.csv")
    if errors:
        log.error("%d image(s) failed:\n%s", len(errors), "\n".join(f"  {m}" for _, m in errors))
    return summary, {"cfg": cfg, "model": task, "rows": rows, "report": out / "report.csv"}


def run(cfg: DictConfig) -> None:
    """Hydra entry (``histoseg-predict``): exits with status 1 if any input could not be processed."""
    summary, objects = predict(cfg)
    print(f"histoseg predict: {summary['n_ok']}/{summary['n_images']} image(s) done, report {objects['report']}",
          flush=True)
    if summary["n_errors"]:
        raise SystemExit(1)

