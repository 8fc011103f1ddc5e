"""Optuna sweeps (``hydra/sweeper=histoseg_optuna``): search-space parsing, failure handling, and a real
sweep through ``train.py`` that resumes from its storage instead of starting over."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.histoseg_optuna_sweeper.sweeper import (
    HistosegOptunaSweeper,
    format_value,
    parse_search_space,
)
from tests.conftest import ROOT, TINY
from tests.test_configs import options


def space(**params):
    return parse_search_space(OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]))


def test_override_grammar_maps_to_optuna_distributions():
    fixed, sp = space(
        loss="choice(dice, dice_ce)", lr="tag(log, interval(1e-4, 1e-2))", wd="interval(0, 0.1)",
        depth="int(interval(2, 5))", width="tag(log, int(interval(8, 64)))", patch="range(64, 257, 64)",
        drop="range(0.0, 0.3, 0.1)", epochs="3",
    )
    assert fixed == ["epochs=3"]
    assert sp["loss"] == CategoricalDistribution(["dice", "dice_ce"])
    assert sp["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert sp["wd"] == FloatDistribution(0.0, 0.1)
    assert sp["depth"] == IntDistribution(2, 5)
    assert sp["width"] == IntDistribution(8, 64, log=True)
    assert sp["patch"] == IntDistribution(64, 256, step=64)
    assert sp["drop"] == CategoricalDistribution([0.0, 0.1, 0.2])


def test_later_overrides_win_and_values_round_trip_through_the_grammar():
    fixed, sp = space(loss="choice(dice, ce)", patch_size="choice(64, 128)")
    fixed2, sp2 = parse_search_space(OverridesParser.create().parse_overrides(
        ["loss=choice(dice, ce)", "patch_size=choice(64, 128)", "patch_size=96"]))
    assert "patch_size" not in sp2 and fixed2 == ["patch_size=96"]  # the command line fixes a searched key
    parser = OverridesParser.create()
    for v in ["dice", 3, 0.5, True, None, "a b", "x,y", "it's", "nan", "1e-3", "true", "null", "10"]:
        assert parser.parse_overrides([f"k={format_value(v)}"])[0].value() == v


def test_unsupported_sweep_is_a_clear_error():
    with pytest.raises(ValueError, match=r"hydra.sweeper.params.k: choice values must be numbers or strings"):
        space(k="choice([1,2],[3,4])")


class FakeLauncher:
    """Returns a value per ``loss=...`` override; ``loss=boom`` fails like a crashing job."""

    VALUES = {"dice": 0.8, "ce": 0.6, "nanloss": float("nan")}

    def __init__(self):
        self.calls = []

    def launch(self, batch, initial_job_idx):
        self.calls.append((initial_job_idx, [list(ov) for ov in batch]))
        out = []
        for ov in batch:
            loss = dict(o.split("=", 1) for o in ov)["loss"]
            if loss == "boom":
                out.append(JobReturn(overrides=list(ov), status=JobStatus.FAILED, _return_value=RuntimeError("boom")))
            else:
                out.append(JobReturn(overrides=list(ov), status=JobStatus.COMPLETED, _return_value=self.VALUES[loss]))
        return out


def make_sweeper(tmp_path, n_trials, n_jobs=1, losses="choice(dice, ce, boom, nanloss)"):
    sw = HistosegOptunaSweeper(
        sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0}, direction="maximize",
        study_name="t", storage=None, n_trials=n_trials, n_jobs=n_jobs, fail_stale_trials=True,
        params={"loss": losses, "trainer.max_epochs": 1},
    )
    sw.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sw.launcher = FakeLauncher()
    sw.validate_batch_is_legal = lambda batch: None  # composing needs the real config tree (tested below)
    return sw


def load(tmp_path):
    return optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_failed_trials_are_marked_failed_and_the_sweep_goes_on(tmp_path):
    sw = make_sweeper(tmp_path, n_trials=12, n_jobs=3)
    sw.sweep([])
    study = load(tmp_path)
    states = {t.number: t.state for t in study.trials}
    assert len(study.trials) == 12  # one batch of 3 at a time, 12 launched
    for t in study.trials:
        expect = TrialState.FAIL if t.params["loss"] in ("boom", "nanloss") else TrialState.COMPLETE
        assert states[t.number] == expect, t.params
    assert study.best_value == pytest.approx(0.8) and study.best_params["loss"] == "dice"
    assert [i for i, _ in sw.launcher.calls] == [0, 3, 6, 9]  # job folders numbered by trial number
    assert all(["trainer.max_epochs=1" in ov for ov in batch] for _, batch in sw.launcher.calls)
    res = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert res["best_params"] == {"loss": "dice"} and res["n_trials"]["complete"] + res["n_trials"]["fail"] == 12
    assert len((tmp_path / "trials.csv").read_text().strip().splitlines()) == 1 + 12


def test_all_trials_failing_is_an_error_after_the_sweep(tmp_path):
    sw = make_sweeper(tmp_path, n_trials=2, losses="choice(boom)")
    with pytest.raises(RuntimeError, match="no trial completed"):
        sw.sweep([])
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL, TrialState.FAIL]


def test_resume_fails_stale_trials_and_runs_only_the_missing_ones(tmp_path):
    make_sweeper(tmp_path, n_trials=2, losses="choice(dice, ce)").sweep([])
    # a killed sweep leaves a trial RUNNING in the storage
    load(tmp_path).ask()
    sw = make_sweeper(tmp_path, n_trials=4, losses="choice(dice, ce)")
    sw.sweep([])
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert [i for i, _ in sw.launcher.calls] == [3, 4]  # 2 new trials, after the stale one


def test_enqueued_trials_run_first_in_their_own_job_folders(tmp_path):
    make_sweeper(tmp_path, n_trials=1, losses="choice(dice, ce)").sweep([])
    study = load(tmp_path)
    study.ask()  # stale: left RUNNING by a killed sweep (trial 1)
    study.enqueue_trial({"loss": "ce"})  # a point the user wants tried (trial 2, WAITING)
    sw = make_sweeper(tmp_path, n_trials=3, n_jobs=2, losses="choice(dice, ce)")
    sw.sweep([])
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].params == {"loss": "ce"}
    assert [i for i, _ in sw.launcher.calls] == [2]  # trials 2 and 3 in one batch, folders 2 and 3


def test_direction_mismatch_with_an_existing_study_is_refused(tmp_path):
    make_sweeper(tmp_path, n_trials=1, losses="choice(dice)").sweep([])
    sw = make_sweeper(tmp_path, n_trials=2, losses="choice(dice)")
    sw.direction = "minimize"
    with pytest.raises(ValueError, match="was created to maximize"):
        sw.sweep([])


@pytest.mark.parametrize("name", options("hparams_search"))
def test_every_hparams_search_config_defines_a_valid_space(make_cfg, name):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from histoseg.utils.config import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("HistosegOptunaSweeper")
    assert cfg.optimized_metric == "val/dice_best" and sweeper.direction == "maximize"
    assert sweeper.study_name == name and sweeper.sampler.seed is not None
    _, sp = space(**sweeper.params)
    assert {"loss", "aug", "patch_size", "optimizer.optimizer.lr"} <= set(sp)
    # every searched group option exists
    for group in ("loss", "aug"):
        assert set(sp[group].choices) <= set(options(group)), (group, sp[group].choices)


def sweep_cmd(tmp_path: Path, n_trials: int) -> list[str]:
    return [sys.executable, "train.py", "-m", "hparams_search=synthetic_optuna", *TINY, "trainer=debug",
            f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.log_dir={tmp_path}"]


def assert_jobs_ran_their_trials(sweep: Path, trials) -> None:
    """Each trial's job folder (named by trial number) ran with that trial's sampled parameters."""
    for t in trials:
        job_cfg = yaml.safe_load((sweep / str(t.number) / "config.yaml").read_text())
        assert job_cfg["optimizer"]["optimizer"]["lr"] == pytest.approx(t.params["optimizer.optimizer.lr"])
        assert f"loss={t.params['loss']}" in (sweep / str(t.number) / ".hydra" / "overrides.yaml").read_text().replace("- ", "")


@pytest.mark.slow  # two train.py sweeps; the second in two joblib (loky) workers that each import torch
def test_optuna_sweep_resumes_in_a_second_invocation_with_parallel_joblib_trials(tmp_path):
    """One real sweep through ``train.py`` in two invocations (one subprocess each, to keep the suite short):
    the first runs 2 trials with the basic launcher; the second asks for 4, finds the 2 in the storage and runs
    the 2 missing ones side by side in joblib worker processes, leaving the first two jobs' folders untouched."""
    sweep = tmp_path / "sweep"
    r = subprocess.run(sweep_cmd(tmp_path, 2), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Joblib.Parallel" not in r.stdout + r.stderr  # the default launcher: trials in this process
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name="synthetic_optuna", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    first = {p: (sweep / p / "config.yaml").read_text() for p in ("0", "1")}
    assert_jobs_ran_their_trials(sweep, study.trials)

    # two trials per batch, each in its own joblib (loky) worker process
    cmd = [*sweep_cmd(tmp_path, 4), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "2 finished trial(s), running 2 more" in out and "Joblib.Parallel(n_jobs=2" in out
    study = optuna.load_study(study_name="synthetic_optuna", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1", "2", "3"]
    assert {p: (sweep / p / "config.yaml").read_text() for p in ("0", "1")} == first  # earlier jobs untouched
    assert_jobs_ran_their_trials(sweep, study.trials[2:])  # the parallel jobs, too
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert res["n_trials"]["complete"] == 4 and res["best_value"] == pytest.approx(study.best_value)


def test_slurm_launcher_config_composes_with_its_placeholders():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class

    from histoseg.utils.config import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hparams_search=synthetic_optuna",
                                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert "partition" in launcher and "account" in launcher  # placeholders for the cluster
    assert launcher.gpus_per_node == launcher.tasks_per_node == 4 and launcher.timeout_min > 0
    assert launcher.submitit_folder.startswith(cfg.hydra.sweep.dir.split("${")[0])
