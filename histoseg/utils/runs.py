"""Read finished runs back: a sweep's job folders (config, CSV metrics) and W&B offline run files.

``collect_runs(folder)`` gives one row per run folder below ``folder`` (any folder holding the
``config.yaml`` histoseg writes), with the choices that define it (dataset, model, loss, aug, patch size,
learning rate), its best and last validation Dice from ``csv/metrics.csv``, and the W&B offline run it
logged to, if any. ``read_wandb_offline`` decodes a ``run-<id>.wandb`` file (run record, config, metric
history, summary) without network or account, so offline sweeps can be compared before ``wandb sync``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import yaml

# .wandb files use the LevelDB log format: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then
# 32 KiB blocks of records, each with a 7-byte header (crc32c, length, type: full/first/middle/last)
_WANDB_IDENT, _WANDB_MAGIC = b":W&B", 0xBEE1
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path):
    data = path.read_bytes()
    if len(data) < _HEADER:
        raise ValueError(f"{path}: empty or truncated W&B run file")
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != _WANDB_IDENT or magic != _WANDB_MAGIC:
        raise ValueError(f"{path}: not a W&B run file (header {data[:_HEADER]!r})")
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:  # zero padding up to the block end
            pos += left - _HEADER
            continue
        chunk = data[pos : pos + length]
        if len(chunk) < length:  # a run still writing, or killed mid-record: stop at the last whole record
            return
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = chunk
        elif kind == _MIDDLE:
            parts += chunk
        elif kind == _LAST:
            yield parts + chunk
            parts = b""


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def read_wandb_offline(path: str | Path) -> dict:
    """Decode a W&B offline run (``offline-run-*`` folder or its ``run-<id>.wandb`` file).

    Returns ``{"run_id", "project", "group", "tags", "job_type", "config", "history", "summary", "media",
    "finished", "path"}``: ``config`` as logged (nested dicts), ``history`` a list of logged rows, ``summary``
    the last value of every key, ``media`` the image files under ``files/media``, ``finished`` whether the run
    wrote its exit record (W&B's service may still be writing shortly after ``wandb.finish()`` returns).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"{p}: no run-*.wandb file in this W&B run folder")
        p = files[0]
    out: dict[str, Any] = {"path": str(p), "run_id": None, "project": None, "group": None, "tags": [],
                           "job_type": None, "config": {}, "history": [], "summary": {}, "finished": False}
    for raw in _wandb_records(p):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(run_id=r.run_id, project=r.project, group=r.run_group, tags=list(r.tags), job_type=r.job_type)
            for item in r.config.update:
                out["config"][_item_key(item)] = _json(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][_item_key(item)] = _json(item.value_json)
        elif kind == "history":
            out["history"].append({_item_key(i): _json(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][_item_key(item)] = _json(item.value_json)
        elif kind == "exit":
            out["finished"] = True
    out["config"].pop("_wandb", None)
    media = p.parent / "files" / "media"
    out["media"] = sorted(str(f) for f in media.rglob("*") if f.is_file()) if media.is_dir() else []
    return out


def _csv_metrics(path: Path) -> dict[str, float]:
    import pandas as pd

    if not path.is_file():
        return {}
    df = pd.read_csv(path)
    out: dict[str, float] = {}
    for col, how in (("val/dice", "last"), ("val/dice_best", "max"), ("val/loss", "last"), ("test/dice", "last"),
                     ("epoch", "max")):
        if col in df and df[col].notna().any():
            s = df[col].dropna()
            out[col] = float(s.iloc[-1] if how == "last" else s.max())
    return out


def collect_runs(root: str | Path) -> Any:
    """One row per histoseg run folder under ``root`` (a sweep dir, ``logs/train``, ...) as a DataFrame.

    Columns: ``run`` (folder relative to ``root``), ``dataset``, ``model``, ``loss``, ``aug`` (the config
    group choices), ``patch_size``, ``lr``, ``val/dice`` (last), ``val/dice_best``, ``val/loss``,
    ``test/dice`` when tested, ``epoch``, and ``wandb_run`` / ``wandb_group`` for runs with a W&B logger.
    """
    import pandas as pd

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run folder")
    rows = []
    for cfg_file in sorted(root.rglob("config.yaml")):
        run = cfg_file.parent
        if run.name == ".hydra" or "wandb" in run.parts[len(root.parts):]:
            continue
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        if "dataset" not in cfg or "model" not in cfg:
            continue  # not a histoseg training run
        choices: dict = {}
        hydra_file = run / ".hydra" / "hydra.yaml"
        if hydra_file.is_file():
            choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
        opt = (cfg.get("optimizer") or {}).get("optimizer") or {}
        row = {
            "run": str(run.relative_to(root)) if run != root else ".",
            "dataset": cfg["dataset"].get("name"),
            "model": choices.get("model", (cfg["model"].get("net") or {}).get("_target_", "?").rsplit(".", 1)[-1]),
            "loss": choices.get("loss", (cfg.get("loss") or {}).get("_target_", "?").rsplit(".", 1)[-1]),
            "aug": choices.get("aug", (cfg.get("aug") or {}).get("name")),
            "patch_size": cfg.get("patch_size"),
            "lr": opt.get("lr"),
        }
        row.update(_csv_metrics(run / "csv" / "metrics.csv"))
        wb = sorted((run / "wandb").glob("offline-run-*")) + sorted((run / "wandb").glob("run-*"))
        if wb:
            try:
                info = read_wandb_offline(wb[-1])
                row.update(wandb_run=info["run_id"], wandb_group=info["group"])
            except (OSError, ValueError) as e:
                row.update(wandb_run=f"unreadable: {e}")
        rows.append(row)
    return pd.DataFrame(rows)
