"""Restore a trained task for evaluation or prediction, with config overrides of its stored settings."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from histoseg.inference.postprocess import PostProcessor
from histoseg.models.loading import WEIGHTS, load_checkpoint, task_from_checkpoint
from histoseg.tasks.utils import ConfigError
from histoseg.utils.config import plain_dict

log = logging.getLogger(__name__)


def non_null(node: DictConfig | dict | None) -> dict:
    """The entries of an override block that are set (``null`` means: keep the checkpoint's value)."""
    if node is None:
        return {}
    return {k: v for k, v in plain_dict(node).items() if v is not None}


def read_json_option(key: str, value) -> tuple[Path, object]:
    """``(path, parsed JSON)`` of a file given as config option ``key`` (errors name the option and the file)."""
    p = Path(str(value))
    if not p.is_file():
        raise ConfigError(f"{key}={p}: no such file")
    try:
        return p, json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={p}: not a JSON file ({e})") from None


def postprocess_overrides(cfg: DictConfig) -> dict:
    """The post-processing overrides of an eval / predict config: ``postprocess.*`` (its set keys) on top of the
    settings in ``postprocess_from``, a file written by ``histoseg-eval``: its ``summary.json`` (the settings it
    scored with) or ``postprocess_tuning.json`` (what ``tune_postprocess.enabled=true`` found, e.g. for an
    ensemble, whose tuned thresholds live in no checkpoint)."""
    over = non_null(cfg.get("postprocess"))
    src = cfg.get("postprocess_from")
    if not src:
        return over
    p, d = read_json_option("postprocess_from", src)
    base = d.get("postprocess") if isinstance(d, dict) else None
    if not isinstance(base, dict):
        base = d.get("best") if isinstance(d, dict) else None
    if not isinstance(base, dict):
        raise ConfigError(f"postprocess_from={p}: holds no post-processing settings (neither a summary.json's "
                          "'postprocess' nor a postprocess_tuning.json's 'best')")
    return {**base, **over}


def resolve_stain_reference(task, cfg: DictConfig, compute=None) -> dict | None:
    """Give ``task`` the stain reference ``inference.stain_norm`` needs; returns it (``None`` when normalisation
    is off).

    In order: ``stain_ref_from`` (a ``summary.json`` written by ``histoseg-eval``, or a JSON file holding the
    reference itself), the checkpoint's own (``data_info['stain_ref']``), else ``compute()`` (``histoseg-eval``:
    from the checkpoint's training images, for checkpoints trained before the reference was stored).
    """
    from histoseg.data.stain import check_method, check_reference

    method = task.inference.get("stain_norm")
    if not method:
        return None
    try:
        check_method(method)
    except ValueError as e:
        raise ConfigError(f"inference.{e}") from None
    src = cfg.get("stain_ref_from")
    if src:
        p, d = read_json_option("stain_ref_from", src)
        ref = d.get("stain_ref", d) if isinstance(d, dict) else d
        try:
            ref = check_reference(ref)
        except ValueError as e:
            raise ConfigError(f"stain_ref_from={p}: {e}") from None
        task.data_info["stain_ref"] = ref
        log.info("stain reference from %s", p)
    elif task.data_info.get("stain_ref") is None:
        ref = compute() if compute is not None else None
        if ref is None:
            raise ConfigError(
                f"inference.stain_norm={method}: the checkpoint stores no stain reference (it predates them) and "
                "none can be computed here; run histoseg-eval on the checkpoint's training dataset once (it computes "
                "the reference from the training split and writes it to summary.json), then pass "
                "stain_ref_from=<that summary.json>")
        task.data_info["stain_ref"] = ref
    return task.data_info["stain_ref"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return dev


def checkpoint_paths(ckpt_path) -> list[str]:
    """``ckpt_path`` as a list of paths: one checkpoint, or several (a list in the config: an ensemble)."""
    if isinstance(ckpt_path, (list, tuple, ListConfig)):
        paths = [str(p) for p in ckpt_path]
    else:
        paths = [str(ckpt_path)]
    if not paths:
        raise ConfigError("ckpt_path=[] names no checkpoint; give one, or a list of several for an ensemble")
    seen = {str(Path(p).resolve()) for p in paths}
    if len(seen) != len(paths):
        raise ConfigError(f"ckpt_path lists a checkpoint twice ({paths}); an ensemble's members must differ")
    return paths


def restore_task(ckpt_path: str | Path, inference=None, postprocess=None, device: str | torch.device = "cpu",
                 weights: str = "averaged", **extra):
    """Load ``ckpt_path`` safely (``weights_only=True``) and apply overrides.

    ``inference`` / ``postprocess`` are override blocks: their non-null keys replace the checkpoint's stored
    settings (e.g. ``inference.tta=d4``, ``postprocess.min_size=30``). ``extra`` goes to the task's
    constructor (e.g. ``report_dir``). ``weights``: ``averaged`` (the checkpoint's ``state_dict``) or ``raw``
    (the optimiser's weights of a run trained with ``callbacks=ema``). Returns ``(task, checkpoint dict)``.
    """
    task, ckpts = restore_models([ckpt_path], inference, postprocess, device, weights, **extra)
    return task, ckpts[0]


def restore_models(ckpt_paths: Sequence[str | Path], inference=None, postprocess=None,
                   device: str | torch.device = "cpu", weights: str = "averaged", **extra):
    """:func:`restore_task` for one checkpoint or an ensemble of several. Returns ``(task, checkpoint dicts)``.

    With several checkpoints the task is the first one's, its ``net`` replaced by an
    :class:`~histoseg.models.ensemble.EnsembleNet` of every member's network (raw outputs averaged). The
    members must agree on what the outputs mean (classes, heads and their activations); the inference and
    post-processing settings are the first checkpoint's (with the overrides): tune post-processing for the
    ensemble itself on validation images (``histoseg-eval tune_postprocess.enabled=true``).
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    paths = [str(p) for p in ckpt_paths]
    ckpts = [load_checkpoint(p) for p in paths]  # every file is checked before any model is built
    meta = ckpts[0]["histoseg"]
    inf = {**(meta.get("inference") or {}), **non_null(inference)}
    pp_over = non_null(postprocess)
    pp = None
    if pp_over:
        try:
            pp = PostProcessor(**{**(meta.get("postprocess") or {}), **pp_over})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"postprocess: {e}") from None
    task = task_from_checkpoint(ckpts[0], paths[0], device, weights=weights, inference=inf, postprocess=pp, **extra)
    if len(paths) == 1:
        return task, ckpts
    from histoseg.models.ensemble import EnsembleNet

    nets = [task.net]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        other = task_from_checkpoint(ckpt, path, device, weights=weights)
        mismatch = {k: (getattr(task, k), getattr(other, k)) for k in ("num_classes", "heads", "head_activations",
                                                                        "out_channels")
                    if getattr(task, k) != getattr(other, k)}
        if mismatch:
            raise ConfigError(f"{path} cannot join an ensemble with {paths[0]}: their outputs differ in "
                              + "; ".join(f"{k} {b} vs {a}" for k, (a, b) in mismatch.items()))
        if not pp_over and (ckpt["histoseg"].get("postprocess") or {}) != (meta.get("postprocess") or {}):
            log.warning("ensemble: %s stores other post-processing settings than %s; the ensemble uses the first "
                        "one's unless tuned (tune_postprocess.enabled=true) or overridden", path, paths[0])
        nets.append(other.net)
    task.net = EnsembleNet(nets).to(device)
    log.info("ensemble of %d checkpoints (raw outputs averaged): %s", len(paths), ", ".join(paths))
    return task, ckpts
