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
from histoseg.tasks.restore import (
    checkpoint_paths,
    postprocess_overrides,
    resolve_stain_reference,
    restore_models,
)
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

    paths = checkpoint_paths(cfg.ckpt_path)
    log.info("Loading checkpoint%s %s", "s" if len(paths) > 1 else "", ", ".join(paths))
    weights = cfg.get("weights", "averaged")
    task, ckpts = restore_models(paths, cfg.inference, postprocess_overrides(cfg), report_dir=str(out), weights=weights)
    datamodule = build(cfg.dataset, "dataset")
    if task.num_classes != datamodule.num_classes:
        raise ConfigError(
            f"{paths[0]}: the model has {task.num_classes} classes but dataset {datamodule.name!r} has "
            f"{datamodule.num_classes} ({', '.join(datamodule.class_names)})"
        )
    tune_cfg = cfg.get("tune_postprocess")
    tuning = bool(tune_cfg and tune_cfg.get("enabled"))
    if tuning and task.postprocess.instances not in ("watershed", "markers"):
        raise ConfigError(f"tune_postprocess.enabled=true tunes the watershed / markers post-processing, but the "
                          f"post-processing here is instances={task.postprocess.instances!r}")
    split_from = use_training_split(cfg, task, ckpts[0], datamodule, paths[0])
    datamodule.prepare_data()
    # the training images' colours (a checkpoint from before they were stored: from its stored training split)
    resolve_stain_reference(  # summary.json records it: stain_ref_from=<summary.json> for predict / other data
        task, cfg, compute=(datamodule.stain_reference if split_from == "checkpoint" else None))
    loader = datamodule.eval_dataloader(cfg.split)
    check_members_held_out(paths, ckpts, datamodule, cfg.split, tuning)
    save_split(datamodule.split, out / "split.json", {"dataset": datamodule.name, "source": split_from})
    resolved = [str(Path(p).resolve()) for p in paths]
    task.report_meta = {
        "checkpoint": resolved[0] if len(paths) == 1 else resolved, "dataset": datamodule.name, "split": cfg.split,
        "split_source": split_from, "weights": weights,
    }

    if cfg.get("save_maps"):
        task.maps_dir = str(out / "maps")
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = build_trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        write_run_metadata(cfg, out)
    if tuning:
        tune_for_eval(task, datamodule, tune_cfg, cfg.split, trainer)
    log.info("Evaluating on %d whole %s images of %s", len(loader.dataset), cfg.split, datamodule.name)
    trainer.test(model=task, dataloaders=loader)
    metrics = dict(trainer.callback_metrics)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": task, "trainer": trainer, "callbacks": callbacks}
    return metrics, objects


def stored_split(ckpt: dict, datamodule) -> dict | None:
    """The data split a checkpoint was trained with (saved by the datamodule), or None."""
    return (ckpt.get(type(datamodule).__qualname__) or {}).get("split")


def use_training_split(cfg: DictConfig, task, ckpt: dict, datamodule, path: str) -> str:
    """Evaluate on the split stored in the checkpoint (the images held out in training) when asked and the
    checkpoint was trained on this dataset; returns where the split came from (for ``summary.json``)."""
    stored = stored_split(ckpt, datamodule)
    trained_on = task.data_info.get("name")
    if not cfg.use_checkpoint_split:
        return "dataset config"
    if stored is None or trained_on is None:
        log.warning("%s stores no training split: using the dataset config's split", path)
        return "dataset config"
    if trained_on != datamodule.name:
        log.warning("checkpoint was trained on %r, evaluating on %r: using the dataset config's split",
                    trained_on, datamodule.name)
        return "dataset config"
    known = set(datamodule.reader.case_ids())
    missing = sorted({c for ids in stored.values() for c in ids} - known)
    if missing:
        raise ConfigError(
            f"{path}: its training split names {len(missing)} images this dataset config does not have "
            f"(e.g. {missing[:3]}); evaluate with the training data config or use_checkpoint_split=false"
        )
    datamodule.load_state_dict({"split": stored})
    return "checkpoint"


def check_members_held_out(paths: list[str], ckpts: list[dict], datamodule, split: str, tuning: bool) -> None:
    """No checkpoint (no member of an ensemble) may have seen the images it is scored or tuned on.

    Checkpoints trained on this dataset store their split: scoring ``test`` needs the test images outside every
    member's training and validation images (validation picked the checkpoint), scoring ``val`` (or ``test`` of
    a dataset without test images, which falls back to them) needs them outside every member's training images,
    and tuning post-processing on the validation images needs those outside every member's training images.
    (Seeds that drew other random splits break this: keep one split with ``dataset.split.seed``.) ``train`` /
    ``all`` are scored knowingly, with no check.
    """
    sp = datamodule.resolve_split()
    checks = []  # (what, image ids, the member's parts they must stay out of)
    if split == "test" and sp["test"]:
        checks.append(("scored", set(sp["test"]), ("train", "val")))
    elif split in ("test", "val"):
        checks.append(("scored", set(sp["val"]), ("train",)))
    if tuning:
        checks.append(("tuned on", set(sp["val"]), ("train",)))
    for path, ckpt in zip(paths, ckpts):
        member = stored_split(ckpt, datamodule)
        if member is None or (ckpt["histoseg"].get("dataset") or {}).get("name") != datamodule.name:
            continue  # not trained on this dataset (an unseen source): nothing of it was seen
        for what, ids, parts in checks:
            for part in parts:
                both = sorted(ids & set(member.get(part) or []))
                if both:
                    raise ConfigError(
                        f"{path} has {len(both)} of the {len(ids)} images {what} here in its {part} split (e.g. "
                        f"{both[:3]}): its scores would not be held out. Ensemble members must share the test images "
                        "(train them with one split, e.g. ++dataset.split.seed=0)")


def tune_for_eval(task, datamodule, tune_cfg, split: str, trainer: L.Trainer) -> None:
    """Tune the instance post-processing on the validation images before scoring (an ensemble's own thresholds;
    the checkpoints are not changed). Written to ``postprocess_tuning.json``; ``summary.json`` records the result."""
    if split == "val":
        log.warning("tuning post-processing on the validation images and scoring the same images (split=val): "
                    "the scores are optimistic")
    from histoseg.tasks.train import tune_and_store

    datamodule.setup("validate")
    before = dict(task.inference)
    if before.get("autocast") is None and "bf16" in str(trainer.precision):  # predict as the test will
        task.inference["autocast"] = "bf16"
    device = task.device
    task.to(trainer.strategy.root_device)
    try:
        tune_and_store(task, datamodule, None, tune_cfg)
    finally:
        task.inference = before
        task.to(device)


def run(cfg: DictConfig) -> None:
    """Hydra entry (``histoseg-eval``): evaluate and print the headline numbers."""
    metrics, _ = evaluate(cfg)
    shown = [k for k in ("test/dice", "test/iou", "test/aji", "test/pq") if k in metrics]
    print(f"histoseg eval ({cfg.split}): " + ", ".join(f"{k}={float(metrics[k]):.4f}" for k in shown), flush=True)
