"""Restore a trained task for evaluation or prediction, with config overrides of its stored settings."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from histoseg.inference.postprocess import PostProcessor
from histoseg.models.loading import WEIGHTS, load_checkpoint, task_from_checkpoint
from histoseg.tasks.utils import ConfigError


def non_null(node: DictConfig | dict | None) -> dict:
    """The entries of an override block that are set (``null`` means: keep the checkpoint's value)."""
    if node is None:
        return {}
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in d.items() if v is not None}


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


def restore_task(ckpt_path: str | Path, inference=None, postprocess=None, device: str | torch.device = "cpu",
                 weights: str = "averaged", **extra):
    """Load ``ckpt_path`` safely (``weights_only=True``) and apply overrides.

    ``inference`` / ``postprocess`` are override blocks: their non-null keys replace the checkpoint's stored
    settings (e.g. ``inference.tta=d4``, ``postprocess.min_size=30``). ``extra`` goes to the task's
    constructor (e.g. ``report_dir``). ``weights``: ``averaged`` (the checkpoint's ``state_dict``) or ``raw``
    (the optimiser's weights of a run trained with ``callbacks=ema``). Returns ``(task, checkpoint dict)``.
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    ckpt = load_checkpoint(ckpt_path)
    meta = ckpt["histoseg"]
    inf = {**(meta.get("inference") or {}), **non_null(inference)}
    pp_over = non_null(postprocess)
    pp = None
    if pp_over:
        try:
            pp = PostProcessor(**{**(meta.get("postprocess") or {}), **pp_over})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"postprocess: {e}") from None
    task = task_from_checkpoint(ckpt, ckpt_path, device, weights=weights, inference=inf, postprocess=pp, **extra)
    return task, ckpt
