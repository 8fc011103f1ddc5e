"""Loggers and validation panels: a W&B offline run (no key, no network) with config, metrics and image
panels, the same panels in TensorBoard and as PNGs, run grouping/tags, and reading runs back."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from histoseg.callbacks.panels import class_colours, render_panel
from histoseg.utils.config import merge_tags, run_group
from histoseg.utils.runs import collect_runs, read_wandb_offline


def test_panel_is_image_truth_prediction_side_by_side():
    img = torch.full((3, 40, 60), 0.5)
    mask = torch.zeros(40, 60, dtype=torch.long)
    mask[10:20, 10:30] = 1
    pred = torch.zeros(40, 60, dtype=torch.long)
    panel = render_panel(img, mask, pred, 2, max_side=512, gap=4)
    assert panel.shape == (40, 3 * 60 + 2 * 4, 3) and panel.dtype == np.uint8
    left, truth, predicted = panel[:, :60], panel[:, 64:124], panel[:, 128:]
    assert (left == 128).all() and (predicted == 128).all()  # empty prediction: image unchanged
    inside = truth[14, 20].astype(int)  # blended towards the class-1 colour (green)
    assert inside[1] > 128 and inside[0] < 128 and (truth[:10] == 128).all()
    assert (truth[10, 15] == class_colours(2)[1]).all()  # outline drawn in the class colour


def test_panel_downscales_labels_without_interpolation():
    img = np.zeros((300, 1000, 3), np.uint8)
    mask = np.where((np.arange(1000)[None, :] // 30) % 2, 3, 0).repeat(300, 0)  # labels 0 and 3 only
    panel = render_panel(img, mask, mask, 4, max_side=250)
    assert panel.shape == (75, 3 * 250 + 2 * 4, 3)
    truth = panel[:, 254:504].reshape(-1, 3)
    blend = (class_colours(4)[3] * 0.45).astype(np.uint8)
    allowed = {(0, 0, 0), tuple(blend), tuple(class_colours(4)[3])}
    # a blended label (3 and 0 averaged into 1 or 2) would show class 1 / 2 colours
    assert {tuple(c) for c in truth} <= allowed and tuple(blend) in {tuple(c) for c in truth}
    with pytest.raises(ValueError, match="differ in size"):
        render_panel(img, mask[:10], mask, 4)


def test_run_group_and_tags():
    assert run_group("RunMode.MULTIRUN", "/logs/train/optuna/monuseg_optuna", "x", "train") == "monuseg_optuna"
    assert run_group("RunMode.RUN", "/logs/m", "epithelium_seed", "train") == "epithelium_seed"
    assert run_group("RunMode.RUN", "/logs/m", None, "train") == "train"
    assert merge_tags(["seed", "unet"], "monuseg", "unet", None, "dice") == ["seed", "unet", "monuseg", "dice"]


def test_wandb_goes_online_with_one_override(make_cfg):
    import hydra

    assert hydra.utils.instantiate(make_cfg("logger=wandb").logger.wandb)._offline is True
    assert hydra.utils.instantiate(make_cfg("logger=wandb", "logger.wandb.offline=false").logger.wandb)._offline is False


def wait_finished(run_dir, timeout=60.0):
    """W&B's service finishes writing the run file shortly after wandb.finish() returns."""
    import time

    end = time.monotonic() + timeout
    while True:
        run = read_wandb_offline(run_dir)
        if run["finished"] or time.monotonic() > end:
            assert run["finished"], f"{run_dir}: W&B run file has no exit record after {timeout} s"
            return run
        time.sleep(0.5)


def test_wandb_offline_run_has_config_metrics_and_panels(make_cfg, tmp_path, monkeypatch):
    from histoseg.tasks.train import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg("logger=many", "experiment=synthetic_quick", "callbacks.validation_panels.every_n_epochs=1",
                   "callbacks.validation_panels.max_images=2", "trainer.max_epochs=2", "dataset.reader.n_val=3",
                   "test=false", "model.net.width=8", "patch_size=64", "dataset.samples_per_epoch=8")
    train(cfg)

    # PNG panels in the run dir, whatever the loggers
    for epoch in ("epoch_000", "epoch_001"):
        assert sorted(p.name for p in (tmp_path / "panels" / epoch).glob("*.png")) == ["syn-val-0000.png", "syn-val-0001.png"]

    # a W&B offline run: grouped by experiment, tagged, with the resolved config, metrics and image panels
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = wait_finished(runs[0])
    assert run["group"] == "synthetic_quick" and run["project"] == "histoseg"
    assert {"synthetic", "smoke", "unet", "dice_ce", "light"} <= set(run["tags"])
    assert run["config"]["dataset"]["name"] == "synthetic" and run["config"]["patch_size"] == 64
    assert run["config"]["model/params/total"] > 0
    with open(tmp_path / "csv" / "metrics.csv") as f:
        csv_dice = [float(r["val/dice"]) for r in csv.DictReader(f) if r["val/dice"]]
    wb_dice = [h["val/dice"] for h in run["history"] if "val/dice" in h]
    assert wb_dice == pytest.approx(csv_dice) and len(wb_dice) == 2
    panel_rows = [h for h in run["history"] if "val/panels/count" in h]
    assert [h["val/panels/count"] for h in panel_rows] == [2, 2]
    media = [m for m in run["media"] if "/val/panels_" in m and m.endswith(".png")]
    assert len(media) == 4

    # TensorBoard got the same panels
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert sorted(tags) == ["val/panels/0_syn-val-0000", "val/panels/1_syn-val-0001"]
    assert len(acc.Images(tags[0])) == 2  # one per epoch

    # and the run reads back as one row
    df = collect_runs(tmp_path)
    assert len(df) == 1 and df.iloc[0]["wandb_group"] == "synthetic_quick"
    assert df.iloc[0]["val/dice"] == pytest.approx(csv_dice[-1])
    assert df.iloc[0]["val/dice_best"] == pytest.approx(max(csv_dice))


def test_reading_a_non_wandb_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_wandb_offline(bad)
