"""train(cfg) end to end on the embedded data: debug run, resume equivalence, bf16, errors, multirun."""
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from histoseg.tasks.train import train
from histoseg.tasks.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_fast_dev_run(make_cfg):
    metrics, obj = train(make_cfg("trainer=debug"))
    assert "val/dice" in metrics and "test/dice" in metrics
    assert 0.0 <= float(metrics["test/dice"]) <= 1.0


def test_training_learns_and_writes_reports(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=3", "dataset.samples_per_epoch=32", "optimizer.optimizer.lr=3e-3")
    metrics, obj = train(cfg)
    # the monitored metric is logged, the best is tracked, and whole-image reports exist
    assert float(metrics["val/dice_best"]) >= float(metrics["val/dice"]) - 1e-6
    assert float(metrics["val/dice"]) > 0.5  # far above the all-background baseline (0)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "per_image.csv").is_file() and (tmp_path / "summary.json").is_file()
    assert (tmp_path / "split.json").is_file() and (tmp_path / "config.yaml").is_file()
    rows = (tmp_path / "per_image.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + 2 test images
    assert "test/aji" in metrics and "test/pq" in metrics


def test_bf16_mixed_on_cpu(make_cfg):
    metrics, obj = train(make_cfg("trainer.precision=bf16-mixed", "trainer.max_epochs=1"))
    assert obj["trainer"].precision == "bf16-mixed"
    assert torch.isfinite(torch.as_tensor(float(metrics["val/dice"])))


class StopAfterFirstEpoch(L.Callback):
    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def _weights(task):
    return {k: v.detach().clone() for k, v in task.net.state_dict().items()}


def test_resuming_a_finished_run_tunes_and_tests_it(make_cfg, tmp_path):
    """A run killed after its last epoch (before or during the test) is finished by resuming from last.ckpt:
    no epoch runs, the test does, and the sweep objective is reported as missing instead of failing the job."""
    from histoseg.tasks.train import run

    common = ["trainer.max_epochs=1", "dataset.samples_per_epoch=8", "optimized_metric=val/dice"]
    first = make_cfg(*common, "test=false")
    with open_dict(first):
        first.paths.output_dir = str(tmp_path / "run")
    train(first)
    assert not (tmp_path / "run" / "summary.json").exists()
    again = make_cfg(*common, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    with open_dict(again):
        again.paths.output_dir = str(tmp_path / "run")
    first_fit = json.loads((tmp_path / "run" / "timing.json").read_text())["fit_s"]
    val_before = _epoch_rows(tmp_path / "run")
    assert [r["epoch"] for r in val_before] == ["0"]
    assert run(again) is None
    # the training history survives the resume into the same folder (Lightning's own CSVLogger deletes it)
    # (the test adds columns, so compare the columns the first part wrote)
    assert [{k: r[k] for k in val_before[0]} for r in _epoch_rows(tmp_path / "run")] == val_before
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["mean"]["dice"] <= 1.0
    # timing.json counts the whole training, not only the resumed (here empty) part
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert timing["fit_s_parts"][0] == first_fit and len(timing["fit_s_parts"]) == 2
    assert timing["fit_s"] == round(sum(timing["fit_s_parts"]), 1) >= first_fit


def _csv_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's CSV log (``csv/metrics.csv``)."""
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _epoch_rows(run_dir: Path) -> list[dict]:
    """The validation rows (one per epoch) of a run's CSV log."""
    return [r for r in _csv_rows(run_dir) if r.get("val/dice")]


def test_resume_into_its_own_folder_keeps_the_csv_history_once_per_step(make_cfg, tmp_path):
    """Resumed where it ran, a run's metrics.csv keeps the epochs before the interruption, loses what was logged
    after the last checkpoint (trained again), and ends with each epoch once, as an uninterrupted run's."""
    import csv

    common = ["trainer.max_epochs=2", "dataset.samples_per_epoch=16", "test=false", "tune_postprocess.enabled=false"]
    cut_cfg = make_cfg(*common)
    with open_dict(cut_cfg):
        cut_cfg.paths.output_dir = str(tmp_path / "run")
        cut_cfg.callbacks.stop = {"_target_": "tests.test_train.StopAfterFirstEpoch"}
    _, o_cut = train(cut_cfg)
    step = o_cut["trainer"].global_step
    log = tmp_path / "run" / "csv" / "metrics.csv"
    first = _epoch_rows(tmp_path / "run")
    assert [r["epoch"] for r in first] == ["0"]
    # what an interrupted second epoch would have left: a row logged after last.ckpt was written
    with open(log, newline="") as f:
        header = next(csv.reader(f))
    with open(log, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=header).writerow({"epoch": 1, "step": step + 1, "val/dice": 0.123456})

    res_cfg = make_cfg(*common, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    with open_dict(res_cfg):
        res_cfg.paths.output_dir = str(tmp_path / "run")
    train(res_cfg)
    rows = _epoch_rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {k: rows[0][k] for k in first[0]} == first[0]  # the epoch before the interruption, as it was logged
    assert float(rows[1]["val/dice"]) != 0.123456 and int(rows[1]["step"]) >= step
    assert len(_fit_minutes(tmp_path / "run")) == 2

    # a fresh run (no ckpt_path) in the same folder starts a new history instead of appending to the old one
    fresh = make_cfg("trainer.max_epochs=1", "dataset.samples_per_epoch=16", "test=false",
                     "tune_postprocess.enabled=false")
    with open_dict(fresh):
        fresh.paths.output_dir = str(tmp_path / "run")
    train(fresh)
    assert [r["epoch"] for r in _epoch_rows(tmp_path / "run")] == ["0"]


def _fit_minutes(run_dir: Path) -> list[float]:
    """``time/fit_min`` per epoch from a run's CSV log (the WallClock callback)."""
    return [float(r["time/fit_min"]) for r in _csv_rows(run_dir) if r.get("time/fit_min")]


def test_resume_from_last_ckpt_continues_at_same_step_and_matches(make_cfg, tmp_path):
    common = ["trainer.max_epochs=2", "trainer.deterministic=true", "dataset.samples_per_epoch=16", "test=false",
              "tune_postprocess.enabled=false",
              "model.net.dropout=0.1"]
    full_cfg = make_cfg(*common)
    with open_dict(full_cfg):
        full_cfg.paths.output_dir = str(tmp_path / "full")
    m_full, o_full = train(full_cfg)

    # interrupted run: same config, stopped after the first epoch, then resumed from last.ckpt
    cut_cfg = make_cfg(*common)
    with open_dict(cut_cfg):
        cut_cfg.paths.output_dir = str(tmp_path / "cut")
        cut_cfg.callbacks.stop = {"_target_": "tests.test_train.StopAfterFirstEpoch"}
    _, o_cut = train(cut_cfg)
    steps_per_epoch = 16 // 4
    assert o_cut["trainer"].global_step == steps_per_epoch
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert last.is_file()

    res_cfg = make_cfg(*common, f"ckpt_path={last}")
    with open_dict(res_cfg):
        res_cfg.paths.output_dir = str(tmp_path / "resumed")
    m_res, o_res = train(res_cfg)
    assert o_res["trainer"].global_step == o_full["trainer"].global_step == 2 * steps_per_epoch
    w_full, w_res = _weights(o_full["model"]), _weights(o_res["model"])
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], msg=f"weights differ after resume: {k}")
    assert float(m_res["val/dice"]) == pytest.approx(float(m_full["val/dice"]), abs=1e-6)
    # wall-clock minutes per epoch: increasing within a run, and a resumed run counts on from the checkpoint
    full_min, cut_min, res_min = (_fit_minutes(tmp_path / d) for d in ("full", "cut", "resumed"))
    assert len(full_min) == 2 and 0 < full_min[0] < full_min[1]
    assert len(cut_min) == 1 and len(res_min) == 1 and res_min[0] > cut_min[0]


def test_binary_only_loss_on_multiclass_data_fails_before_training(make_cfg):
    # a 4-class synthetic variant is not needed: the loss checks the mode it is given
    cfg = make_cfg("loss=bce")
    with open_dict(cfg):
        cfg.loss.mode = "multiclass"
    with pytest.raises(ConfigError, match=r"^loss: .*supports only binary segmentation.*multiclass"):
        train(cfg)


def test_patch_larger_than_images_fails_before_training(make_cfg):
    cfg = make_cfg("patch_size=128", "dataset.reader.image_shape=[96,96]", "inference.tile_shape=[128,128]")
    with pytest.raises(Exception, match=r"image is 96x96 but patch_size is 128"):
        train(cfg)


def test_num_classes_mismatch_is_one_clear_sentence(make_cfg):
    cfg = make_cfg("dataset.num_classes=4")
    with pytest.raises(ConfigError, match=r"num_classes=4 but the reader defines 2 classes"):
        train(cfg)


def test_multirun_two_jobs_each_in_own_folder(tmp_path):
    from tests.conftest import TINY

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "loss=dice,dice_ce", *TINY, "trainer=debug",
           f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    losses = [(p / ".hydra" / "overrides.yaml").read_text() for p in jobs]
    assert "loss=dice\n" in losses[0] and "loss=dice_ce" in losses[1]
    for p in jobs:
        assert (p / "config.yaml").is_file()


def test_checkpoint_alone_rebuilds_the_model_safely(make_cfg, tmp_path):
    from histoseg.models.loading import load_task

    metrics, obj = train(make_cfg("trainer.max_epochs=1", "test=false"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    task = load_task(ckpt)  # torch.load(weights_only=True) inside
    img = torch.rand(3, 96, 96)
    ref = obj["model"].eval().predict_image(img)
    got = task.predict_image(img)
    assert got["probs"].shape == (1, 96, 96)
    assert abs(got["probs"] - ref["probs"]).max() < 1e-5
    assert (got["labels"] == ref["labels"]).all()


def test_loading_a_non_histoseg_file_is_a_clear_error(tmp_path):
    from histoseg.models.loading import load_task

    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(Exception, match="not a histoseg checkpoint"):
        load_task(bad)
