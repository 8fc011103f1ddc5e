"""Rebuild a trained task from a checkpoint alone (safe loading: ``torch.load(weights_only=True)``)."""
from __future__ import annotations

from pathlib import Path

import hydra
import torch

from histoseg.data.io import DataError, MissingFileError


def load_checkpoint(path: str | Path) -> dict:
    """``torch.load(..., weights_only=True)`` with clear errors (missing file, not a histoseg checkpoint)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{p}: cannot load checkpoint safely ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if "histoseg" not in ckpt or "state_dict" not in ckpt:
        raise DataError(f"{p}: not a histoseg checkpoint (no 'histoseg' section); was it written by histoseg train?")
    return ckpt


WEIGHTS = ("averaged", "raw")


def checkpoint_weights(ckpt: dict, path: str | Path, weights: str = "averaged") -> dict:
    """The model ``state_dict`` to restore from a checkpoint.

    ``averaged`` is the checkpoint's ``state_dict``: the running average for runs trained with weight averaging
    (``callbacks=ema``), else simply the trained weights. ``raw`` is the optimiser's own weights, which
    Lightning's ``WeightAveraging`` keeps under ``current_model_state`` (to compare the two from one run).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "raw":
        if "current_model_state" not in ckpt:
            raise DataError(f"{path}: has no raw weights (current_model_state): it was not trained with weight "
                            "averaging (callbacks=ema), so its weights are the raw ones; use weights=averaged")
        return ckpt["current_model_state"]
    return ckpt["state_dict"]


def load_task(path: str | Path, device: str | torch.device = "cpu", weights: str = "averaged", **overrides):
    """The LightningModule stored in a checkpoint, in eval mode, with its inference and post-processing
    settings (``overrides`` replace constructor arguments, e.g. ``inference={...}``); ``weights`` as in
    :func:`checkpoint_weights`."""
    return task_from_checkpoint(load_checkpoint(path), path, device, weights=weights, **overrides)


def task_from_checkpoint(ckpt: dict, path: str | Path, device: str | torch.device = "cpu", weights: str = "averaged",
                         **overrides):
    """:func:`load_task` for a checkpoint already read by :func:`load_checkpoint` (``path`` names it in errors)."""
    state = checkpoint_weights(ckpt, path, weights)
    meta = ckpt["histoseg"]
    cfg = dict(meta["model_config"])
    kwargs = {"inference": meta.get("inference")}
    if meta.get("postprocess"):
        from histoseg.inference.postprocess import PostProcessor

        kwargs["postprocess"] = PostProcessor(**meta["postprocess"])
    kwargs.update(overrides)
    task = hydra.utils.instantiate(cfg, **{k: v for k, v in kwargs.items() if v is not None})
    try:
        missing, unexpected = task.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise DataError(f"{path}: checkpoint weights do not fit the stored model config ({first})") from None
    net_missing = [k for k in missing if k.startswith("net.")]
    if net_missing or [k for k in unexpected if k.startswith("net.")]:
        raise DataError(f"{path}: checkpoint weights do not fit the stored model config (missing {net_missing[:3]})")
    task.on_load_checkpoint(ckpt)
    if overrides.get("postprocess") is not None:  # on_load_checkpoint restored the stored one
        task.postprocess = overrides["postprocess"]
    task.model_config = cfg
    return task.to(device).eval()


def init_weights_from(task: torch.nn.Module, path: str | Path, weights: str = "averaged") -> int:
    """Start ``task``'s network from the weights of another run's checkpoint (``init_from=...`` in train).

    Only the network (``net.*``) is taken: optimiser, scheduler, epoch counter, loss buffers and the stored
    inference / post-processing settings are the new run's own. Transfer between runs of the same architecture:
    fine-tuning at full resolution a model trained at half resolution (progressive resizing), or on another
    dataset. Every network tensor must be present with the same shape, else a :class:`DataError` names the
    first mismatches (a different backbone, class count or head layout). Returns the number of tensors loaded.
    """
    if not isinstance(getattr(task, "net", None), torch.nn.Module):
        raise TypeError(f"init_from: {type(task).__name__} has no single network (.net) to initialise; "
                        "init_from supports the segmentation tasks")
    ckpt = load_checkpoint(path)
    state = {k[len("net."):]: v for k, v in checkpoint_weights(ckpt, path, weights).items() if k.startswith("net.")}
    own = task.net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", extra), ("shape differs", shape)):
            if keys:
                shown = ", ".join(
                    f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" if what == "shape differs" else k
                    for k in keys[:3])
                parts.append(f"{len(keys)} {what} ({shown}{', ...' if len(keys) > 3 else ''})")
        raise DataError(f"{path}: its network does not fit this run's model ({'; '.join(parts)}); init_from needs "
                        "the same backbone, classes and heads")
    task.net.load_state_dict(state)
    return len(state)
