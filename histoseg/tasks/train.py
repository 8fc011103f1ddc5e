"""``train(cfg)``: build datamodule, task, callbacks, loggers and trainer from the config; fit; test."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from histoseg.tasks.utils import (
    ConfigError,
    build,
    build_trainer,
    get_metric_value,
    instantiate_callbacks,
    instantiate_loggers,
    task_wrapper,
    write_run_metadata,
)
from histoseg.utils.logging import get_logger

log = get_logger(__name__)


def build_datamodule(cfg: DictConfig):
    aug = build(cfg.aug, "aug") if cfg.get("aug") else None
    targets = build(cfg.target, "target") if cfg.get("target") else None
    extra = {}
    inf = cfg.get("inference") or {}
    if inf.get("stain_norm") and inf.get("stain_norm_train", True):  # train on what inference will see
        extra["stain_norm"] = inf.stain_norm
    from histoseg.data.scale import check_scale

    if check_scale(inf.get("scale")) != 1.0:  # train at the resolution inference will use
        extra["scale"] = inf.scale
    return build(cfg.dataset, "dataset", aug=aug, targets=targets, **extra)


def build_task(cfg: DictConfig, datamodule=None):
    """The LightningModule from ``cfg.model`` with loss, optimizer, scheduler, inference and post-processing.

    A LightningModule class that defines ``from_config(cfg)`` builds itself from the whole config
    (e.g. :class:`~histoseg.models.modules.superres.SuperResolutionTask`, which owns two optimisers).
    """
    task_cls = hydra.utils.get_class(cfg.model._target_)
    if hasattr(task_cls, "from_config"):
        return task_cls.from_config(cfg)
    loss = build(cfg.loss, "loss") if cfg.get("loss") else None
    opt_cfg = cfg.get("optimizer")
    optimizer = build(opt_cfg.optimizer, "optimizer") if opt_cfg else None
    scheduler = build(opt_cfg.scheduler, "optimizer.scheduler") if opt_cfg and opt_cfg.get("scheduler") else None
    postprocess = build(cfg.postprocess, "postprocess") if cfg.get("postprocess") else None
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    extra: dict[str, Any] = dict(
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    if opt_cfg:
        extra["scheduler_interval"] = opt_cfg.get("interval", "epoch")
    if cfg.get("inference"):
        extra["inference"] = OmegaConf.to_container(cfg.inference, resolve=True)
    if postprocess is not None:
        extra["postprocess"] = postprocess
    if cfg.get("gpu_aug"):
        extra["gpu_aug"] = build(cfg.gpu_aug, "gpu_aug")
    if cfg.get("paths") and cfg.paths.get("output_dir"):
        extra["report_dir"] = cfg.paths.output_dir
    task = build(cfg.model, "model", **extra)
    task.model_config = model_config  # set after building: Hydra would instantiate a dict holding _target_
    return task


def check_config(cfg: DictConfig) -> None:
    """Cheap cross-group checks that fail before anything heavy is built."""
    for key in ("dataset", "model", "trainer"):
        if not cfg.get(key):
            raise ConfigError(f"config has no {key!r} group; add {key}=<name> to the command line")
    ps = cfg.get("patch_size")
    if ps is not None and int(ps) <= 0:
        raise ConfigError(f"patch_size must be positive, got {ps}")
    if "degradation" in cfg.dataset and not hasattr(hydra.utils.get_class(cfg.model._target_), "from_config"):
        raise ConfigError(
            f"dataset {cfg.dataset.get('name')!r} is a super-resolution dataset (HR/LR pairs) but model "
            f"{cfg.model._target_} segments; train it with task=sr"
        )
    tr = cfg.trainer
    if "ddp" in str(tr.get("strategy", "auto")) and tr.get("use_distributed_sampler", True):
        raise ConfigError(
            "trainer.strategy is DDP but trainer.use_distributed_sampler is not false: histoseg's samplers already "
            "give each rank its own patches and images; use trainer=ddp or set trainer.use_distributed_sampler=false"
        )
    if cfg.get("gpu_aug") and hasattr(hydra.utils.get_class(cfg.model._target_), "from_config"):
        raise ConfigError(f"gpu_aug is implemented for segmentation only; {cfg.model._target_} does not apply it")
    monitor = cfg.get("monitor")
    ckpt = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if ckpt and monitor and ckpt.get("monitor") not in (None, monitor):
        raise ConfigError(f"callbacks.model_checkpoint.monitor={ckpt.monitor!r} differs from monitor={monitor!r}")


def apply_time_budget(cfg: DictConfig):
    """``budget_min=<minutes>``: a :class:`~histoseg.callbacks.TimeBudget` callback instead of the epoch budget.

    Writes into ``cfg`` what then runs (as the precision is): ``trainer.max_epochs=-1`` and ``min_epochs=0``
    (the time stops the run, also within the first epoch) and ``optimizer.scheduler=null`` (``model.g_scheduler``
    / ``d_scheduler`` for ``task=sr``): the callback decays the lr over the time, from the optimiser's lr down to
    the replaced scheduler's ``eta_min``, else 0. Returns the callback, or ``None`` without a budget.
    """
    minutes = cfg.get("budget_min")
    if minutes is None:
        return None
    from omegaconf import open_dict

    from histoseg.callbacks import TimeBudget

    sched = (cfg.get("optimizer") or {}).get("scheduler") or (cfg.model.get("g_scheduler") or {})
    callback = TimeBudget(minutes=minutes, eta_min=float(sched.get("eta_min", 0.0)))
    with open_dict(cfg):
        cfg.trainer.max_epochs = -1
        cfg.trainer.min_epochs = 0  # Lightning ignores a stop request until min_epochs are done
        if cfg.get("optimizer") and "scheduler" in cfg.optimizer:
            cfg.optimizer.scheduler = None
        for key in ("g_scheduler", "d_scheduler"):  # task=sr: the generator's / discriminator's own schedules
            if cfg.model.get(key) is not None:
                cfg.model[key] = None
    log.info("budget_min=%s: training stops after %s min of fitting, lr cosine-decayed over that time "
             "(trainer.max_epochs and optimizer.scheduler replaced)", minutes, minutes)
    if int(cfg.trainer.get("check_val_every_n_epoch") or 1) > 1:
        log.warning("budget_min with trainer.check_val_every_n_epoch=%s: an epoch cut short by the budget is validated "
                    "only if its number divides by that; shorten epochs (dataset.samples_per_epoch) instead",
                    cfg.trainer.check_val_every_n_epoch)
    return callback


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train (and test) from a composed config. Returns ``(metrics, objects)``."""
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    log.info("Instantiating datamodule <%s>", cfg.dataset.get("name"))
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")  # bad data and impossible patch sizes fail here, before training

    budget = apply_time_budget(cfg)  # before the task: it replaces the epoch schedule
    log.info("Instantiating model <%s>", (cfg.model.get("net") or cfg.model).get("_target_"))
    task = build_task(cfg, datamodule)
    if cfg.get("init_from"):
        if cfg.get("ckpt_path"):
            raise ConfigError("init_from and ckpt_path both set: ckpt_path resumes a run (weights, optimiser, epoch), "
                              "init_from starts a new run from another run's weights; give one")
        from histoseg.models.loading import init_weights_from

        n = init_weights_from(task, cfg.init_from)
        log.info("Initialised %d network tensors from %s (fresh optimiser and schedule)", n, cfg.init_from)
    callbacks = instantiate_callbacks(cfg.get("callbacks")) + ([budget] if budget is not None else [])
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = build_trainer(cfg, callbacks, loggers)

    objects = {"cfg": cfg, "datamodule": datamodule, "model": task, "callbacks": callbacks, "loggers": loggers, "trainer": trainer}
    if trainer.is_global_zero and cfg.get("paths", {}).get("output_dir"):
        write_run_metadata(cfg, cfg.paths.output_dir)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        lg.log_hyperparams({"model/params/total": sum(p.numel() for p in task.parameters())})

    timing: dict[str, Any] = {}
    if cfg.get("train", True):
        log.info("Starting training")
        t0 = time.perf_counter()
        trainer.fit(model=task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        timing.update(fit_s=round(time.perf_counter() - t0, 1), global_step=int(trainer.global_step),
                      epochs=int(trainer.current_epoch))
    train_metrics = {k: v for k, v in trainer.callback_metrics.items()}
    tune_cfg = cfg.get("tune_postprocess")
    post = getattr(task, "postprocess", None)
    if (
        tune_cfg
        and tune_cfg.get("enabled")
        and cfg.get("train", True)
        and not trainer.fast_dev_run
        and post is not None
        and post.instances in ("watershed", "markers")
    ):
        t0 = time.perf_counter()
        tune_and_store(task, datamodule, trainer, tune_cfg)
        timing["tune_s"] = round(time.perf_counter() - t0, 1)

    test_metrics: dict = {}
    if cfg.get("test", True):
        ckpt = None
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "best_model_path", ""):
            ckpt = cb.best_model_path
        elif cfg.get("ckpt_path") and not cfg.get("train", True):
            ckpt = cfg.ckpt_path
        log.info("Testing on whole images with %s", ckpt or "the current weights")
        t0 = time.perf_counter()
        trainer.test(model=task, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)
        timing["test_s"] = round(time.perf_counter() - t0, 1)
        test_metrics = {k: v for k, v in trainer.callback_metrics.items()}

    metrics = {**train_metrics, **test_metrics}
    if timing and trainer.is_global_zero and cfg.get("paths", {}).get("output_dir"):
        import json
        import platform

        from histoseg.data.io import atomic_write_text

        timing = merge_resumed_timing(f"{cfg.paths.output_dir}/timing.json", timing, cfg.get("ckpt_path"))
        timing.update(host=platform.node(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                      device=str(task.device), cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        atomic_write_text(f"{cfg.paths.output_dir}/timing.json", json.dumps(timing, indent=1))
    summary = {k: round(float(v), 4) for k, v in metrics.items() if k.startswith(("val/", "test/"))}
    log.info("Final metrics: %s", summary)
    return metrics, objects


def merge_resumed_timing(path: str, timing: dict, ckpt_path: str | None) -> dict:
    """A resumed run (``ckpt_path``) writing into a folder with an earlier ``timing.json``: ``fit_s`` is the
    total training time of both parts (``fit_s_parts`` lists them), not only the resumed part's."""
    import json

    prev_path = Path(path)
    if not ckpt_path or not prev_path.is_file() or "fit_s" not in timing:
        return timing
    try:
        prev = json.loads(prev_path.read_text())
    except (OSError, ValueError):
        return timing
    parts = list(prev.get("fit_s_parts") or ([prev["fit_s"]] if "fit_s" in prev else []))
    if not parts:
        return timing
    parts.append(timing["fit_s"])
    return {**timing, "fit_s": round(sum(parts), 1), "fit_s_parts": parts}


def tune_and_store(task, datamodule, trainer, tune_cfg) -> None:
    """Tune instance post-processing on the validation images with the best weights; store in checkpoints.

    ``trainer=None`` (``histoseg-eval``): tune the task's current weights (e.g. an ensemble) and store nothing
    in checkpoints; either way the grid goes to ``postprocess_tuning.json`` in the task's report dir."""
    import json

    from histoseg.inference.tuning import NEEDS_INSTANCES, store_postprocess, tune_postprocess

    objective = tune_cfg.get("objective", "aji")
    samples = list(datamodule.val_set.samples if datamodule.val_set else [])
    if objective in NEEDS_INSTANCES:
        with_instances = [s for s in samples if s.instances is not None]
        if not with_instances and any(getattr(s, "mask", None) is not None for s in samples):
            # e.g. epithelium or cellularity masks: no nuclei to match, but the mask itself can still be tuned
            log.warning("the validation images have no instance maps to score %r on: tuning the post-processing "
                        "for 'dice' (whole-image Dice of the post-processed mask) instead", objective)
            objective = "dice"
        else:
            samples = with_instances
    samples = samples[: tune_cfg.get("max_images") or None]
    if not samples:
        log.warning("no validation image to tune %r on: post-processing thresholds stay as configured", objective)
        return
    cb = trainer.checkpoint_callback if trainer is not None else None
    best = getattr(cb, "best_model_path", "") if cb is not None else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
    grid = OmegaConf.to_container(tune_cfg.grid, resolve=True) if tune_cfg.get("grid") else None
    params, table = tune_postprocess(task, samples, objective, grid, workers=tune_cfg.get("workers", "auto"))
    task.postprocess = task.postprocess.with_params(**params)
    if trainer is None or trainer.is_global_zero:
        for path in {best, getattr(cb, "last_model_path", "") if cb is not None else ""} - {""}:
            store_postprocess(path, task.postprocess.config())
        from histoseg.data.io import atomic_write_text

        if task.report_dir:
            atomic_write_text(
                f"{task.report_dir}/postprocess_tuning.json",
                json.dumps({"best": params, "objective": objective, "n_val_images": len(samples),
                            "val_images": [s.case_id for s in samples], "table": table}, indent=1),
            )


def run(cfg: DictConfig) -> float | None:
    """Hydra entry: train and return ``optimized_metric`` (for sweepers)."""
    metrics, _ = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics and cfg.get("ckpt_path") and not any(k.startswith("val/") for k in metrics):
        # resuming a run whose training had already finished: no epoch ran, so there is no validation metric,
        # but the post-processing tuning and the test did run (the way to finish an interrupted test)
        log.warning("no validation ran (resumed %s after its last epoch): no %s to return", cfg.ckpt_path, name)
        value = None
    else:
        value = get_metric_value(metrics, name)
    shown = [k for k in ("val/dice", "test/dice", "test/aji", "val/psnr", "val/psnr_bicubic", "test/psnr", "test/psnr_bicubic")
             if k in metrics]
    print("histoseg result: " + ", ".join(f"{k}={float(metrics[k]):.4f}" for k in shown), flush=True)
    return value
