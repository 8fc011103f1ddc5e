"""Structured config of the sweeper, registered as ``hydra/sweeper=histoseg_optuna``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class HistosegOptunaSweeperConf:
    _target_: str = "hydra_plugins.histoseg_optuna_sweeper.sweeper.HistosegOptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler itself (to offset its seed on resume)
    # any optuna sampler by _target_; its ``seed`` (if set) is offset by the trials already in the study,
    # so a resumed sweep does not replay the first random draws
    sampler: Any = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 42, "n_startup_trials": 10}
    )
    direction: str = "maximize"  # maximize | minimize
    study_name: str = "histoseg"
    # null: sqlite:///<hydra.sweep.dir>/optuna.db; or any optuna storage URL (sqlite:///path, postgresql://...)
    storage: Any = None
    n_trials: int = 20  # finished trials (complete or pruned) the study should hold; a rerun tops it up
    n_jobs: int = 1  # trials launched together per batch (run in parallel by e.g. hydra/launcher=joblib)
    # trials left RUNNING by a killed sweep are marked FAIL on the next start (off for several concurrent
    # sweepers sharing one storage)
    fail_stale_trials: bool = True
    # search space in Hydra's override grammar: choice(...), range(...), interval(...), tag(log, interval(...)),
    # int(interval(...)); plain values are fixed for every trial
    params: dict[str, Any] | None = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="histoseg_optuna", node=HistosegOptunaSweeperConf, provider="histoseg"
)
