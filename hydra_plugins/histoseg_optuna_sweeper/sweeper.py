"""A Hydra sweeper on Optuna >= 3 (ask/tell), with persistent, resumable studies.

Why not ``hydra-optuna-sweeper``: its latest release (1.3.0) requires ``optuna>=2.10,<3``, which conflicts
with the Optuna 5 / SQLAlchemy 2 stack histoseg installs. This plugin is small: it turns
``hydra.sweeper.params`` (Hydra's override grammar) into Optuna distributions, asks the study for
``n_jobs`` trials at a time, launches them through whatever ``hydra/launcher`` is configured (basic,
joblib, submitit), and tells the study each trial's return value.

* **Resume**: the study lives in persistent storage (default ``sqlite:///<sweep dir>/optuna.db``) and is
  opened with ``load_if_exists=True``. ``n_trials`` is the number of *finished* trials (complete or
  pruned) the study should hold, so rerunning a killed sweep runs only the missing trials, and raising
  ``n_trials`` extends a finished one. Job folders are numbered by Optuna trial number, so a resumed sweep
  never overwrites the folders of earlier trials.
* **Failures**: a trial whose job raises, or returns no finite number, is told ``FAIL`` and the sweep goes
  on; failed trials do not count towards ``n_trials`` (a resumed sweep retries them). Trials left
  ``RUNNING`` by a killed sweep are marked ``FAIL`` when the sweep restarts (``fail_stale_trials``).
* **Results**: ``optimization_results.yaml`` (best value and parameters) and ``trials.csv`` (every trial)
  in the sweep dir, rewritten atomically after every batch.
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_SPECIAL = set(" ,()[]{}=:'\"\\$")


def distribution_for(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (``choice``, ``range``, ``interval``, ``tag(log, ...)``)."""
    value = override.value()
    name = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        for c in choices:
            if not (c is None or isinstance(c, bool | int | float | str)):
                raise ValueError(f"hydra.sweeper.params.{name}: choice values must be numbers or strings, got {c!r}")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(v, int) for v in (start, stop, step)) and step > 0:
            last = start + (len(range(start, stop, step)) - 1) * step
            if last < start:
                raise ValueError(f"hydra.sweeper.params.{name}: {override.input_line!r} is an empty range")
            return IntDistribution(start, last, step=step)
        values = []  # float ranges: the listed values, as Hydra's basic sweeper would run them
        x = float(start)
        while (step > 0 and x < stop - 1e-12) or (step < 0 and x > stop + 1e-12):
            values.append(round(x, 12))
            x += step
        if not values:
            raise ValueError(f"hydra.sweeper.params.{name}: {override.input_line!r} is an empty range")
        return CategoricalDistribution(values)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(
        f"hydra.sweeper.params.{name}: {override.input_line!r} is not a supported sweep; use choice(...), "
        "range(...), interval(...), int(interval(...)) or tag(log, interval(...))"
    )


def format_value(value: Any) -> str:
    """A sampled value as override text that parses back to the same value (strings quoted when needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return str(value)
    if value and not _SPECIAL & set(value):
        try:  # 'nan', '1e-3', 'true', 'null' ... would come back as another type
            if OverridesParser.create().parse_overrides([f"k={value}"])[0].value() == value:
                return value
        except Exception:
            pass
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_search_space(overrides: Sequence[Override]) -> tuple[list[str], dict[str, BaseDistribution]]:
    """Split parsed overrides into fixed override strings and ``{key: distribution}``; later keys win."""
    fixed: dict[str, str] = {}
    space: dict[str, BaseDistribution] = {}
    for o in overrides:
        key = o.get_key_element()
        fixed.pop(key, None)
        space.pop(key, None)
        if o.is_sweep_override():
            space[key] = distribution_for(o)
        else:
            fixed[key] = o.input_line
    return list(fixed.values()), space


class HistosegOptunaSweeper(Sweeper):
    """See the module docstring. Config: :class:`~hydra_plugins.histoseg_optuna_sweeper.config.HistosegOptunaSweeperConf`."""

    def __init__(
        self,
        sampler: Any,
        direction: str,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        fail_stale_trials: bool,
        params: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction!r}; choose one of {', '.join(DIRECTIONS)}")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ValueError(f"hydra.sweeper: n_trials ({n_trials}) and n_jobs ({n_jobs}) must be >= 1")
        self.sampler_cfg = sampler
        self.direction, self.study_name, self.storage = direction, str(study_name), storage
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.fail_stale_trials = bool(fail_stale_trials)
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ pieces
    def _overrides(self, arguments: list[str]) -> tuple[list[str], dict[str, BaseDistribution]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader if self.hydra_context else None)
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)  # the command line wins
        return parse_search_space(parser.parse_overrides(lines))

    def _storage_url(self, sweep_dir: Path) -> str:
        return self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"

    def _sampler(self, n_existing: int) -> optuna.samplers.BaseSampler:
        cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(self.sampler_cfg), resolve=True))
        if "_target_" not in cfg:
            raise ValueError(f"hydra.sweeper.sampler needs a _target_ (e.g. optuna.samplers.TPESampler), got {cfg}")
        if cfg.get("seed") is not None:
            cfg.seed = int(cfg.seed) + n_existing  # a resumed sweep draws new points, still reproducibly
        return instantiate(cfg)

    def open_study(self, sweep_dir: Path) -> optuna.Study:
        url = self._storage_url(sweep_dir)
        study = optuna.create_study(study_name=self.study_name, storage=url, direction=self.direction,
                                    load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise ValueError(
                f"study {self.study_name!r} in {url} was created to {study.direction.name.lower()}, but "
                f"hydra.sweeper.direction={self.direction}; use another study_name or storage"
            )
        study.sampler = self._sampler(len(study.trials))
        return study

    def _fail_stale(self, study: optuna.Study) -> None:
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))  # WAITING = enqueued: kept
        for t in stale:
            study.tell(t.number, state=TrialState.FAIL)
        if stale:
            log.warning("marked %d trial(s) left running by an earlier sweep as failed: %s",
                        len(stale), [t.number for t in stale])

    def _write_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        from histoseg.data.io import atomic_write_text

        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        res: dict[str, Any] = {
            "name": "histoseg_optuna",
            "study_name": self.study_name,
            "storage": self._storage_url(sweep_dir),
            "direction": self.direction,
            "n_trials": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState},
        }
        if complete:
            best = study.best_trial
            res.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        atomic_write_text(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(res)))
        df = study.trials_dataframe()
        atomic_write_text(sweep_dir / "trials.csv", df.to_csv(index=False))

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> list:
        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        fixed, space = self._overrides(arguments)
        if not space:
            raise ValueError("hydra.sweeper.params defines no search space (no choice/range/interval override)")

        study = self.open_study(sweep_dir)
        if self.fail_stale_trials:
            self._fail_stale(study)
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        remaining = max(0, self.n_trials - done)
        log.info("Optuna study %r (%s, %s): %d finished trial(s), running %d more, %d at a time",
                 self.study_name, self._storage_url(sweep_dir), self.direction, done, remaining, self.n_jobs)
        log.info("search space: %s; fixed: %s", {k: repr(v) for k, v in space.items()}, fixed)

        returns = []
        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            batch = [tuple(fixed + [f"{k}={format_value(v)}" for k, v in t.params.items()]) for t in trials]
            numbers_ = [t.number for t in trials]
            try:
                self.validate_batch_is_legal(batch)
                # job folders are named by trial number (the launcher numbers a batch consecutively; trials
                # enqueued earlier, or asked by another sweeper on the same storage, break that: launch alone)
                if numbers_ == list(range(numbers_[0], numbers_[0] + len(numbers_))):
                    results = self.launcher.launch(batch, initial_job_idx=numbers_[0])
                else:
                    results = [r for ov, n in zip(batch, numbers_) for r in self.launcher.launch([ov], initial_job_idx=n)]
            except BaseException:
                for t in trials:
                    study.tell(t, state=TrialState.FAIL)
                self._write_results(study, sweep_dir)
                raise
            for trial, ov, res in zip(trials, batch, results):
                self._tell(study, trial, ov, res)
            returns.append(results)
            remaining -= len(trials)
            self._write_results(study, sweep_dir)

        self._write_results(study, sweep_dir)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise RuntimeError(
                f"Optuna study {self.study_name!r}: no trial completed ({len(study.trials)} in {self._storage_url(sweep_dir)}); "
                f"see the job logs under {sweep_dir}"
            )
        best = study.best_trial
        log.info("Best trial %d: %s=%s with %s", best.number, self.direction, best.value, best.params)
        return returns

    def _tell(self, study: optuna.Study, trial: optuna.Trial, overrides: tuple, res) -> None:
        if res.status != JobStatus.COMPLETED:
            log.warning("trial %d failed (%s): %r", trial.number, " ".join(overrides), res._return_value)
            study.tell(trial, state=TrialState.FAIL)
            return
        value = res.return_value
        if hasattr(value, "item"):
            value = value.item()
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            log.warning("trial %d returned %r, not a finite number (is optimized_metric logged?): marked failed",
                        trial.number, value)
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, float(value))
        log.info("trial %d: %s -> %.5f", trial.number, dict(trial.params), float(value))
