"""``evaluate(cfg)``: whole-image evaluation of a trained checkpoint on a dataset split.

The checkpoint is loaded safely (``torch.load(weights_only=True)``, :func:`histoseg.models.loading.load_task`)
and scored by ``trainer.test``, i.e. by the same ``SegmentationTask.test_step`` that ends every training
run, so ``histoseg-eval`` on the best checkpoint reproduces the run's ``test/*`` numbers. Outputs in
``paths.output_dir``: ``per_image.csv``, ``summary.json`` (mean / std / median, plus the settings used),
``split.json``, ``config.yaml`` and ``figures/test/<case>.png``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from histoseg.data.splits import save_split
from histoseg.tasks.restore import restore_task
from histoseg.tasks.utils import (
    ConfigError,
    build,
    build_trainer,
    check_mandatory,
    instantiate_callbacks,
    instantiate_loggers,
    task_wrapper,
    write_run_metadata,
)
from histoseg.utils.logging import get_logger

log = get_logger(__name__)

SPLITS = ("test", "val", "train", "all")


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Score ``cfg.ckpt_path`` on ``cfg.split`` of ``cfg.dataset``. Returns ``(metrics, objects)``."""
    check_mandatory(cfg)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r}; choose one of {', '.join(SPLITS)}")
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    out = Path(cfg.paths.output_dir)

    log.info("Loading checkpoint %s", cfg.ckpt_path)
    weights = cfg.get("weights", "averaged")
    task, ckpt = restore_task(cfg.ckpt_path, cfg.inference, cfg.postprocess, report_dir=str(out), weights=weights)
    datamodule = build(cfg.dataset, "dataset")
    if task.num_classes != datamodule.num_classes:
        raise ConfigError(
            f"{cfg.ckpt_path}: the model has {task.num_classes} classes but dataset {datamodule.name!r} has "
            f"{datamodule.num_classes} ({', '.join(datamodule.class_names)})"
        )
    split_from = use_training_split(cfg, task, ckpt, datamodule)
    datamodule.prepare_data()
    loader = datamodule.eval_dataloader(cfg.split)
    save_split(datamodule.split, out / "split.json", {"dataset": datamodule.name, "source": split_from})
    task.report_meta = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()), "dataset": datamodule.name, "split": cfg.split,
        "split_source": split_from, "weights": weights,
    }

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = build_trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        write_run_metadata(cfg, out)
    log.info("Evaluating on %d whole %s images of %s", len(loader.dataset), cfg.split, datamodule.name)
    trainer.test(model=task, dataloaders=loader)
    metrics = dict(trainer.callback_metrics)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": task, "trainer": trainer, "callbacks": callbacks}
    return metrics, objects


def use_training_split(cfg: DictConfig, task, ckpt: dict, datamodule) -> str:
    """Evaluate on the split stored in the checkpoint (the images held out in training) when asked and the
    checkpoint was trained on this dataset; returns where the split came from (for ``summary.json``)."""
    stored = (ckpt.get(type(datamodule).__qualname__) or {}).get("split")
    trained_on = task.data_info.get("name")
    if not cfg.use_checkpoint_split:
        return "dataset config"
    if stored is None or trained_on is None:
        log.warning("%s stores no training split: using the dataset config's split", cfg.ckpt_path)
        return "dataset config"
    if trained_on != datamodule.name:
        log.warning("checkpoint was trained on %r, evaluating on %r: using the dataset config's split",
                    trained_on, datamodule.name)
        return "dataset config"
    known = set(datamodule.reader.case_ids())
    missing = sorted({c for ids in stored.values() for c in ids} - known)
    if missing:
        raise ConfigError(
            f"{cfg.ckpt_path}: its training split names {len(missing)} images this dataset config does not have "
            f"(e.g. {missing[:3]}); evaluate with the training data config or use_checkpoint_split=false"
        )
    datamodule.load_state_dict({"split": stored})
    return "checkpoint"


def run(cfg: DictConfig) -> None:
    """Hydra entry (``histoseg-eval``): evaluate and print the headline numbers."""
    metrics, _ = evaluate(cfg)
    shown = [k for k in ("test/dice", "test/iou", "test/aji", "test/pq") if k in metrics]
    print(f"histoseg eval ({cfg.split}): " + ", ".join(f"{k}={float(metrics[k]):.4f}" for k in shown), flush=True)
