"""``predict_slide``: one slide -> tissue mask -> streaming inference -> streaming post-processing -> outputs.

Folder ``<wsi.output_dir>/<name>/``::

    <name>_mask.ome.tif     predicted class map, level-0 size, pyramidal tiled OME-TIFF (QuPath: open as image)
    <name>.geojson          QuPath objects, level-0 pixels: nuclei = detections, tissue (/ tumour) = annotations
    <name>_overlay.png      thumbnail with the prediction blended in and the tissue outline
    <name>_tissue.png       the tissue mask (thumbnail, 0 / 255)
    summary.csv             one row: tissue area, nuclei, density, areas, cellularity, timings
    done.json               written last: the fingerprint of the finished run (complete outputs are skipped)
    work/                   logits.zarr, labels.zarr, nuclei/, progress.json (resume state)
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from histoseg.analysis.palette import GENERIC_PALETTE, palette_for
from histoseg.data.io import atomic_write_text, exclusive_lock, write_image
from histoseg.inference.tiled import with_tta
from histoseg.utils.config import plain_dict
from histoseg.utils.logging import get_logger
from histoseg.wsi.outputs import (
    TISSUE_STYLE,
    TUMOUR_STYLE,
    annotation_feature,
    class_fractions,
    mask_polygons,
    overlay_thumbnail,
    write_geojson,
    write_mask_tiff,
)
from histoseg.wsi.post import ClassStyle, block_files, open_labels, postprocess_blocks, read_block_header
from histoseg.wsi.slide import Slide, SlideError
from histoseg.wsi.stream import (
    Progress,
    blocks,
    file_id,
    fingerprint,
    open_logits,
    predict_blocks,
    tissue_tile_count,
)
from histoseg.wsi.tiles import SlideTileSource, model_grid
from histoseg.wsi.tissue import clean_mask, detect_tissue

log = get_logger(__name__)

SLIDE_COLUMNS = (
    "slide", "source", "status", "error", "width", "height", "levels", "mpp", "model_mpp", "read_level",
    "resampled", "tissue_area_mm2", "tissue_tiles", "grid_tiles", "foreground_pct", "nuclei_count",
    "density_per_mm2", "area_mean_px", "area_median_px", "area_mean_um2", "area_median_um2", "eccentricity_mean",
    "solidity_mean", "cellularity_pct", "infer_seconds", "post_seconds", "total_seconds", "mask", "geojson",
    "overlay", "tissue",
)
VERSION = 1  # bump when the stored formats change (a new version recomputes instead of resuming)


def class_style(task) -> ClassStyle:
    """QuPath class names (the checkpoint's class names) and colours (cellularity palette for 4 classes,
    else matplotlib tab10) of the model's classes."""
    k = max(int(task.num_classes), 2)
    names = list((task.data_info or {}).get("class_names") or [])
    if len(names) != k:
        names = ["background"] + (["nucleus"] if k == 2 else [f"class {i}" for i in range(1, k)])
    colors = (palette_for(k) if k == 4 else GENERIC_PALETTE[:k]).tolist()
    return ClassStyle([str(n) for n in names], [list(map(int, c)) for c in colors])


def model_mpp_of(task, override: float | None, ckpt_path: str | Path) -> float:
    if override is not None:
        if not float(override) > 0:
            raise ValueError(f"wsi.model_mpp must be a positive number of microns per pixel, got {override}")
        return float(override)
    mpp = (task.data_info or {}).get("mpp")
    if mpp is None:
        from histoseg.tasks.utils import ConfigError

        raise ConfigError(
            f"the model's resolution is unknown: {ckpt_path} stores no training mpp; pass wsi.model_mpp=<microns "
            "per pixel the model was trained at>"
        )
    return float(mpp)


def check_settings(w: dict) -> None:
    from histoseg.tasks.utils import ConfigError

    cy, cx = w["chunk_shape"]
    by, bx = w["block_shape"]
    if by % cy or bx % cx:
        raise ConfigError(f"wsi.block_shape {w['block_shape']} must be a multiple of wsi.chunk_shape {w['chunk_shape']}")
    core = int(w["post"]["block"])
    if core < 64 or core & (core - 1):
        raise ConfigError(f"wsi.post.block must be a power of two >= 64, got {core}")
    if int(w["post"]["halo"]) < 0:
        raise ConfigError(f"wsi.post.halo must be >= 0, got {w['post']['halo']}")


def is_complete(out: Path, name: str, fp: str) -> bool:
    done = out / "done.json"
    if not done.is_file():
        return False
    try:
        d = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return d.get("fingerprint") == fp and all((out / f).is_file() for f in d.get("files", []))


def read_summary(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[0] if rows else {}


def write_rows(path: Path, rows: list[dict], columns=SLIDE_COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" if isinstance(v, float) else v)
                    for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def update_cohort_table(root: Path) -> Path:
    """``<root>/slides.csv``: every ``<root>/*/summary.csv``, rebuilt under a lock (parallel jobs share it)."""
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root):
        rows = [read_summary(p) for p in sorted(root.glob("*/summary.csv"))]
        write_rows(root / "slides.csv", [r for r in rows if r])
    return root / "slides.csv"


# ---------------------------------------------------------------------- the slide
def predict_slide(
    path: str | Path,
    name: str,
    task,
    wsi: DictConfig | dict,
    out_root: str | Path,
    device: torch.device | str = "cpu",
    ckpt_path: str | Path | list[str] | None = None,
    report: DictConfig | dict | None = None,
    predictor=None,
    progress: bool = True,
) -> dict:
    """Predict one slide into ``<out_root>/<name>/`` and return its summary row (see the module docstring).

    ``task`` is a restored :class:`~histoseg.models.modules.segmentation.SegmentationTask` (its ``inference``
    and ``postprocess`` settings apply); ``wsi`` the ``wsi`` block of ``conf/predict.yaml``; ``predictor``
    replaces the model call (default: the task with its TTA setting). Raises :class:`SlideError` (naming the
    file) for unreadable slides.
    """
    t_start = time.perf_counter()
    w = plain_dict(wsi)
    check_settings(w)
    from histoseg.data.scale import check_scale

    if check_scale(task.inference.get("scale")) != 1.0:
        from histoseg.tasks.utils import ConfigError

        raise ConfigError(f"inference.scale={task.inference['scale']}: the whole-slide path reads the slide at the "
                          "model's mpp (wsi.model_mpp) and does not resize by inference.scale; predict slides with a "
                          "model trained at scale 1, or pass wsi.model_mpp=<training mpp / scale> inference.scale=1")
    device = torch.device(device)
    out = Path(out_root) / name
    work = out / "work"
    slide = Slide(path, w["backend"], w["mpp"])
    try:
        slide_mpp = slide.mpp
        ckpts = [ckpt_path] if isinstance(ckpt_path, (str, Path)) else list(ckpt_path or [])  # a list: an ensemble
        model_mpp = model_mpp_of(task, w["model_mpp"], ckpts[0] if ckpts else "the checkpoint")
        grid = model_grid(slide, model_mpp, w["mpp_tolerance"])
        inference = {**task.inference}
        ckpt_ids = [file_id(p) for p in ckpts]
        fp = fingerprint(
            version=VERSION, slide=file_id(path), ckpt=ckpt_ids if len(ckpt_ids) > 1 else (ckpt_ids or [None])[0],
            mpp=slide_mpp,
            grid=grid, inference=inference, postprocess=task.postprocess.config(), tissue=w["tissue"],
            block=w["block_shape"], chunk=w["chunk_shape"], dtype=w["logits_dtype"], post=w["post"],
            geojson=w["geojson"], report=plain_dict(report) if report is not None else None,
        )
        files = [f"{name}_mask.ome.tif", f"{name}.geojson", f"{name}_overlay.png", f"{name}_tissue.png", "summary.csv"]
        if w["skip_complete"] and is_complete(out, name, fp):
            log.info("%s: outputs complete (%s), skipped", path, out)
            return {**read_summary(out / "summary.csv"), "skipped": True}

        prog = Progress(work / "progress.json", fp)
        if not prog.resumed and work.exists():
            shutil.rmtree(work)
        if prog.resumed:
            log.info("%s: resuming (%d inference blocks and %d post-processing blocks done)", path,
                     len(prog.done("infer")), len(prog.done("post")))
        (out / "done.json").unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        prog.save()

        # --- tissue
        tissue = _tissue(slide, w["tissue"])
        write_image(out / f"{name}_tissue.png", (tissue.mask * 255).astype(np.uint8))
        tile_filter = tissue.tile_filter(grid.scale, w["tissue"]["min_tile_fraction"])
        kept, total = tissue_tile_count(grid.shape, inference, tile_filter)
        log.info("%s: %dx%d at %.4g um/px, model grid %dx%d at %.4g um/px (level %d%s); tissue %.3g mm^2, "
                 "%d of %d tiles", path, *slide.shape, slide_mpp, *grid.shape, grid.mpp, grid.level,
                 "" if grid.exact else ", resampled", tissue.area_mm2, kept, total)

        # --- streaming inference
        task.to(device).eval()
        pred = predictor or with_tta(task, inference.get("tta"))
        logits = open_logits(work / "logits.zarr", int(task.out_channels), grid.shape, tuple(w["chunk_shape"]),
                             w["logits_dtype"], fresh=not prog.done("infer"))
        source = SlideTileSource(path, grid, w["backend"], w["mpp"])
        t0 = time.perf_counter()
        inf = predict_blocks(source, pred, logits, prog, inference, tile_filter, tuple(w["block_shape"]), device,
                             int(w["num_workers"]), int(w["prefetch_factor"]), progress)
        infer_s = time.perf_counter() - t0

        # --- streaming post-processing
        style = class_style(task)
        core = int(w["post"]["block"])
        labels = open_labels(work / "labels.zarr", grid.shape, core, fresh=not prog.done("post"))
        t0 = time.perf_counter()
        with torch.no_grad():
            post = postprocess_blocks(task, logits, labels, work / "nuclei", prog, grid.scale, grid.mpp, style,
                                      f"{name}:{fp}", core, int(w["post"]["halo"]), float(w["geojson"]["simplify"]),
                                      progress)
        post_s = time.perf_counter() - t0

        # --- outputs
        n_blocks = len(blocks(grid.shape, (core, core)))
        row = summarise(work / "nuclei", n_blocks, tissue, grid, task, report)
        annotations = region_annotations(tissue, labels, grid, task, report, w, row, name)
        write_mask_tiff(out / f"{name}_mask.ome.tif", labels, grid.shape, slide.shape, grid.scale, slide_mpp,
                        task.num_classes)
        n_geo = write_geojson(out / f"{name}.geojson", annotations, block_files(work / "nuclei", n_blocks))
        write_overlay(out / f"{name}_overlay.png", slide, labels, grid, tissue, task, w, annotations)
        row.update(
            slide=name, source=str(path), status="ok", error="", width=slide.shape[1], height=slide.shape[0],
            levels=slide.level_count, mpp=slide_mpp, model_mpp=grid.mpp, read_level=grid.level,
            resampled=not grid.exact, tissue_tiles=kept, grid_tiles=total, infer_seconds=infer_s,
            post_seconds=post_s, total_seconds=time.perf_counter() - t_start, mask=files[0], geojson=files[1],
            overlay=files[2], tissue=files[3],
        )
        if n_geo != (0 if math.isnan(row["nuclei_count"]) else row["nuclei_count"]):
            raise RuntimeError(f"{path}: {n_geo} nucleus features written for {row['nuclei_count']} nuclei")
        write_rows(out / "summary.csv", [row])
        atomic_write_text(out / "done.json", json.dumps({"fingerprint": fp, "files": files, "cut_nuclei": post["cut"],
                                                         "tiles_predicted": inf["tiles_predicted"]}, indent=1))
        if not w["keep_logits"]:
            shutil.rmtree(work / "logits.zarr", ignore_errors=True)
        log.info("%s: %d nuclei, outputs in %s", path, row["nuclei_count"], out)
        return row
    finally:
        slide.close()


def _tissue(slide: Slide, t: dict):
    params = {k: v for k, v in t.items() if k not in ("mpp", "min_tile_fraction")}
    return detect_tissue(slide, mpp=float(t["mpp"]), **params)


def summarise(nuclei_dir: Path, n_blocks: int, tissue, grid, task, report) -> dict:
    """Slide-level numbers from the per-block nucleus files (one block in memory at a time)."""
    areas, ecc, sol = [], [], []
    class_px = np.zeros(max(task.num_classes, 2), np.int64)
    for bf in block_files(nuclei_dir, n_blocks):
        d = read_block_header(bf)
        class_px[: len(d["class_pixels"])] += np.asarray(d["class_pixels"], np.int64)
        areas += d["area_um2"]
        ecc += d["eccentricity"]
        sol += d["solidity"]
    nan = float("nan")
    tissue_mm2 = tissue.area_mm2
    px_um2 = grid.mpp**2
    a = np.asarray(areas, np.float64)
    has_inst = task.postprocess.instances != "none"
    row = {
        "tissue_area_mm2": tissue_mm2,
        "foreground_pct": 100.0 * float(class_px[1:].sum()) * px_um2 * 1e-6 / tissue_mm2 if tissue_mm2 > 0 else nan,
        "nuclei_count": len(a) if has_inst else nan,
        "density_per_mm2": len(a) / tissue_mm2 if has_inst and tissue_mm2 > 0 else nan,
        "area_mean_um2": float(a.mean()) if len(a) else nan,
        "area_median_um2": float(np.median(a)) if len(a) else nan,
        "area_mean_px": float(a.mean()) / px_um2 if len(a) else nan,
        "area_median_px": float(np.median(a)) / px_um2 if len(a) else nan,
        "eccentricity_mean": float(np.mean(ecc)) if ecc else nan,
        "solidity_mean": float(np.mean(sol)) if sol else nan,
        "cellularity_pct": nan,
        "_class_pixels": class_px.tolist(),
    }
    if task.num_classes == 4 and report is not None:
        tum, nuc = list(report["tumour_classes"]), list(report["nucleus_classes"])
        n_nuc = int(class_px[nuc].sum())
        row["cellularity_pct"] = 100.0 * int(class_px[tum].sum()) / n_nuc if n_nuc else nan
    return row


def region_annotations(tissue, labels, grid, task, report, w: dict, row: dict, name: str) -> list[dict]:
    """Tissue (and, for 4-class models, tumour) regions as QuPath annotations in level-0 coordinates."""
    import uuid

    from histoseg.wsi.post import NUCLEUS_NAMESPACE

    feats = []
    geom = mask_polygons(tissue.mask, tissue.scale, float(w["geojson"]["region_simplify"]) * tissue.scale)
    if geom is not None:
        meas = {"Area mm^2": round(tissue.area_mm2, 6)}
        if not math.isnan(row["nuclei_count"]):
            meas.update({"Nuclei": int(row["nuclei_count"]), "Nuclei per mm^2": round(row["density_per_mm2"], 3)})
        if not math.isnan(row["cellularity_pct"]):
            meas["Cellularity %"] = round(row["cellularity_pct"], 3)
        feats.append(annotation_feature(geom, *TISSUE_STYLE, meas, str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{name}/tissue"))))
    if task.num_classes == 4 and report is not None:
        tumour = tumour_region(tissue, labels, grid, list(report["tumour_classes"]), w["tumour_region"])
        row["_tumour_mask"] = tumour
        g = mask_polygons(tumour, tissue.scale, float(w["geojson"]["region_simplify"]) * tissue.scale)
        if g is not None:
            area = float(tumour.sum()) * (tissue.mpp * 1e-3) ** 2
            feats.append(annotation_feature(g, *TUMOUR_STYLE, {"Area mm^2": round(area, 6)},
                                            str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{name}/tumour"))))
    return feats


def tumour_region(tissue, labels, grid, tumour_classes: list[int], t: dict) -> np.ndarray:
    """Tumour region on the tissue overview: the fraction of tumour-class pixels, smoothed over
    ``sigma_um``, above ``min_fraction``, inside the tissue, cleaned like the tissue mask."""
    from scipy import ndimage as ndi

    frac = class_fractions(labels, grid.shape, tissue.scale / grid.scale, tissue.mask.shape, 1 + max(tumour_classes))
    dens = frac[tumour_classes].sum(0)
    sigma = float(t["sigma_um"]) / tissue.mpp
    if sigma > 0:
        dens = ndi.gaussian_filter(dens, sigma)
    m = (dens > float(t["min_fraction"])) & tissue.mask
    m = clean_mask(m, tissue.mpp, closing_um=t["closing_um"], opening_um=0.0, fill_holes=True,
                   min_area_mm2=t["min_area_mm2"])
    return m & tissue.mask


def write_overlay(path: Path, slide: Slide, labels, grid, tissue, task, w: dict, annotations) -> None:
    """Thumbnail (longest side ``wsi.thumbnail.max_side``) with the classes blended in and region outlines."""
    H0, W0 = slide.shape
    scale = max(1.0, max(H0, W0) / float(w["thumbnail"]["max_side"]))
    rgb = slide.read_overview(scale)
    frac = class_fractions(labels, grid.shape, scale / grid.scale, rgb.shape[:2], max(task.num_classes, 2))
    outlines = [(tissue.mask, TISSUE_STYLE[1])]
    write_image(path, overlay_thumbnail(rgb, frac, max(task.num_classes, 2), outlines, float(w["thumbnail"]["alpha"])))


def error_row(path: Path, name: str, msg: str) -> dict:
    return {"slide": name, "source": str(path), "status": "error", "error": msg}


__all__ = ["predict_slide", "SlideError", "SLIDE_COLUMNS", "update_cohort_table"]
