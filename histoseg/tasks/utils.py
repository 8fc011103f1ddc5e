"""Helpers of the task entry points: safe instantiation, callbacks/loggers, metric lookup, run metadata."""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from histoseg.utils.logging import get_logger

log = get_logger(__name__)


class ConfigError(ValueError):
    """An invalid configuration, reported before any training starts."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions histoseg raises on purpose for bad input: a wrong option (``ConfigError``), a missing or
    unreadable file or folder (``DataError``, ``MissingFileError``). Their messages name the file and the problem,
    so the entry points report them in one line. Other exceptions (a bare ``FileNotFoundError`` included) are bugs
    and keep their traceback."""
    from histoseg.data.io import DataError

    return ConfigError, DataError


def _traceback_to_log_files(message: str) -> None:
    """The current exception's traceback to the run's log file(s) only, not the console: a ``ConfigError`` that
    ``build`` made of a constructor's exception may still hide a bug, and the log keeps what to look at."""
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, message, None, sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report_user_errors(fn: Callable) -> Callable:
    """Wrap a Hydra task function: a user error ends a single run with ``error: <message>`` on stderr and exit
    status 1 instead of Hydra's tracebacks. ``HYDRA_FULL_ERROR=1`` and multiruns (where Hydra records the failed
    job) keep Hydra's own handling; other exceptions (bugs) keep their traceback."""

    @functools.wraps(fn)
    def wrap(cfg: DictConfig):
        try:
            return fn(cfg)
        except user_errors() as e:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not HydraConfig.initialized() or \
                    HydraConfig.get().mode != RunMode.RUN:
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrap


def build(node, what: str, **kwargs):
    """``hydra.utils.instantiate`` whose errors become one clear sentence naming the config group."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        raise ConfigError(f"{what}: {cause}") from cause


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list):
    """The Lightning Trainer from ``cfg.trainer``, with ``precision: auto`` resolved for this machine
    (:mod:`histoseg.utils.precision`); the resolved value is written back into ``cfg`` so run metadata and
    loggers record what actually ran. With histoseg's CSV logger, :class:`~histoseg.utils.loggers.KeepLogHistory`
    is added, so a run resumed into its own folder keeps its ``metrics.csv`` history."""
    from omegaconf import open_dict

    from histoseg.utils.loggers import CSVLogger, KeepLogHistory
    from histoseg.utils.precision import resolve_precision

    tr = cfg.trainer
    if tr.get("precision") is not None:
        resolved = resolve_precision(tr.precision, tr.get("accelerator", "auto"))
        if resolved != str(tr.precision):
            log.info("trainer.precision=%s resolved to %s on this machine", tr.precision, resolved)
        with open_dict(cfg):
            cfg.trainer.precision = resolved
    if any(isinstance(lg, CSVLogger) for lg in loggers):
        callbacks = [*callbacks, KeepLogHistory()]
    return build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)


def instantiate_callbacks(cfg: DictConfig | None) -> list:
    from lightning.pytorch.callbacks import Callback

    out = []
    for name, node in (cfg or {}).items():
        if node is None or "_target_" not in node:
            continue
        cb = build(node, f"callbacks.{name}")
        if not isinstance(cb, Callback):
            raise ConfigError(f"callbacks.{name} built a {type(cb).__name__}, not a Lightning Callback")
        out.append(cb)
    return out


def instantiate_loggers(cfg: DictConfig | None) -> list:
    from lightning.pytorch.loggers import Logger

    out = []
    for name, node in (cfg or {}).items():
        if node is None or "_target_" not in node:
            continue
        lg = build(node, f"logger.{name}")
        if not isinstance(lg, Logger):
            raise ConfigError(f"logger.{name} built a {type(lg).__name__}, not a Lightning Logger")
        out.append(lg)
    return out


def get_metric_value(metrics: dict, name: str | None) -> float | None:
    """Value of ``optimized_metric``; a clear error if the run never logged it."""
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric {name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}"
        )
    v = metrics[name]
    return float(v.item() if hasattr(v, "item") else v)


def git_sha() -> str | None:
    from histoseg.utils.config import PROJECT_ROOT

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except Exception:
        return None


def write_run_metadata(cfg: DictConfig, out_dir: str | Path) -> None:
    """Resolved config and git SHA beside the run's outputs (runs describe themselves)."""
    from histoseg.data.io import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(out / "run.json", json.dumps({"git_sha": git_sha()}, indent=1))


def task_wrapper(fn: Callable) -> Callable:
    """Log any exception to the run log and always close W&B, so one failed trial does not kill a multirun."""

    @functools.wraps(fn)
    def wrap(cfg: DictConfig):
        try:
            return fn(cfg)
        except user_errors() as e:  # its message says what to fix: one line on the console, the trace in the log
            log.error("run failed: %s", e)
            _traceback_to_log_files("traceback of the error above")
            raise
        except Exception:
            log.exception("run failed")
            raise
        finally:
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            except ImportError:
                pass

    return wrap


def check_mandatory(cfg: DictConfig) -> None:
    """Fail first, naming every mandatory value (``???`` in the yaml) the command line left unset.

    ``ckpt=`` is accepted as a short alias of ``ckpt_path=`` (eval and predict configs)."""
    alias = cfg.get("ckpt") if "ckpt" in cfg else None
    if alias is not None:
        if OmegaConf.is_missing(cfg, "ckpt_path"):  # (``"ckpt_path" in cfg`` is False while it is ???)
            cfg.ckpt_path = alias
        elif cfg.get("ckpt_path") is not None and str(cfg.ckpt_path) != str(alias):
            raise ConfigError(f"ckpt={alias} and ckpt_path={cfg.ckpt_path} disagree; give one of them")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing mandatory value(s): {', '.join(missing)}; set them on the command line, e.g. {missing[0]}=..."
        )
