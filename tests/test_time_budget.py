"""budget_min / TimeBudget: training stops when the wall-clock budget is spent, the lr follows the time, resume."""
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from histoseg.callbacks import clock as clock_mod
from histoseg.callbacks.budget import TimeBudget, budget_lr
from histoseg.tasks.train import apply_time_budget, train
from histoseg.tasks.utils import ConfigError


def test_budget_lr_warms_up_then_decays_by_cosine_to_eta_min():
    base, eta = 2e-3, 1e-5
    assert budget_lr(0.0, base, eta) == pytest.approx(base)
    assert budget_lr(0.5, base, eta) == pytest.approx((base + eta) / 2)
    assert budget_lr(1.0, base, eta) == pytest.approx(eta)
    assert budget_lr(3.0, base, eta) == pytest.approx(eta)  # held past the budget
    values = [budget_lr(f / 20, base, eta) for f in range(21)]
    assert all(a > b for a, b in zip(values, values[1:]))
    # warm-up: linear from 0 to base over the first 10%, then the cosine over the remaining 90%
    assert budget_lr(0.0, base, eta, warmup_frac=0.1) == 0.0
    assert budget_lr(0.05, base, eta, warmup_frac=0.1) == pytest.approx(base / 2)
    assert budget_lr(0.1, base, eta, warmup_frac=0.1) == pytest.approx(base)
    assert budget_lr(0.55, base, eta, warmup_frac=0.1) == pytest.approx((base + eta) / 2)


class _FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class _Tiny(L.LightningModule):
    """Each training step takes 10 s of the fake clock; records the lr it ran at and when validation ran."""

    def __init__(self, clock, scheduler: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.clock, self.scheduler = clock, scheduler
        self.lrs, self.val_steps = [], []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.clock.t += 10.0
        return self.lin(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.val_steps.append(self.trainer.global_step)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        if self.scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}
        return opt


def _fit(model, callback, max_epochs=-1, ckpt_path=None):
    data = DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4)  # 4 steps per epoch
    trainer = L.Trainer(max_epochs=max_epochs, min_epochs=0, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, data, data, ckpt_path=ckpt_path)
    return trainer


def test_stops_when_the_budget_is_spent_mid_epoch_and_validates_once_more(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(clock_mod, "_clock", clock)
    model = _Tiny(clock)
    trainer = _fit(model, TimeBudget(minutes=1.0, eta_min=0.0))
    # 10 s per step and 60 s of budget: six steps, the stop in the second epoch (steps 5-8)
    assert trainer.global_step == 6
    assert model.val_steps == [4, 6]  # epoch 0's validation and one after the stop (checkpoints see it)
    expected = [budget_lr(10.0 * k / 60.0, 0.1, 0.0) for k in range(6)]
    assert model.lrs == pytest.approx(expected)
    assert model.lrs[3] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_resume_counts_the_minutes_spent_before(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(clock_mod, "_clock", clock)
    first = TimeBudget(minutes=1.0, eta_min=0.0)
    first.on_fit_start(None, None)
    clock.t += 30.0
    state = first.state_dict()
    assert state["fit_min"] == pytest.approx(0.5)
    resumed = TimeBudget(minutes=1.0, eta_min=0.0)
    resumed.load_state_dict(state)
    model = _Tiny(clock)
    trainer = _fit(model, resumed)
    assert trainer.global_step == 3  # the 30 s left
    assert model.lrs[0] == pytest.approx(budget_lr(0.5, 0.1, 0.0))


def test_resume_through_a_checkpoint_decays_from_the_base_lr_not_the_saved_one(monkeypatch, tmp_path):
    clock = _FakeClock()
    monkeypatch.setattr(clock_mod, "_clock", clock)
    first = _Tiny(clock)
    trainer = _fit(first, TimeBudget(minutes=1.0, eta_min=0.0), max_epochs=1)  # 4 steps = 40 of the 60 s
    assert trainer.global_step == 4
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    second = _Tiny(clock)
    trainer = _fit(second, TimeBudget(minutes=1.0, eta_min=0.0), ckpt_path=ckpt)
    assert trainer.global_step == 6  # the 20 s left: two steps
    # the lr of steps 5 and 6 is the one an unbroken run has there (the base is 0.1, not the saved, decayed lr)
    assert second.lrs == pytest.approx([budget_lr(40 / 60, 0.1, 0.0), budget_lr(50 / 60, 0.1, 0.0)])


def test_resuming_a_spent_budget_trains_no_further_step(monkeypatch, tmp_path):
    clock = _FakeClock()
    monkeypatch.setattr(clock_mod, "_clock", clock)
    trainer = _fit(_Tiny(clock), TimeBudget(minutes=0.5, eta_min=0.0))
    assert trainer.global_step == 3
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    again = _Tiny(clock)
    trainer = _fit(again, TimeBudget(minutes=0.5, eta_min=0.0), ckpt_path=tmp_path / "done.ckpt")
    assert trainer.global_step == 3 and again.lrs == []


def test_a_configured_scheduler_is_refused(monkeypatch):
    monkeypatch.setattr(clock_mod, "_clock", _FakeClock())
    with pytest.raises(ConfigError, match="optimizer.scheduler=null"):
        _fit(_Tiny(clock_mod._clock, scheduler=True), TimeBudget(minutes=1.0))


@pytest.mark.parametrize("kwargs", [{"minutes": 0}, {"minutes": -3}, {"minutes": 1, "schedule": "linear"},
                                    {"minutes": 1, "warmup_frac": 1.0}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        TimeBudget(**kwargs)


def test_apply_time_budget_replaces_the_epoch_budget_and_schedule(make_cfg):
    cfg = make_cfg("budget_min=7", "optimizer=adamw", "optimizer.scheduler.eta_min=3e-6")
    cb = apply_time_budget(cfg)
    assert isinstance(cb, TimeBudget) and cb.minutes == 7 and cb.eta_min == pytest.approx(3e-6)
    assert cfg.trainer.max_epochs == -1 and cfg.trainer.min_epochs == 0 and cfg.optimizer.scheduler is None
    plain = make_cfg()
    assert apply_time_budget(plain) is None and plain.trainer.max_epochs == 1


def test_apply_time_budget_replaces_the_super_resolution_schedules(make_cfg):
    cfg = make_cfg("budget_min=3", base=["task=sr", "logger=csv"])
    assert cfg.model.g_scheduler is not None  # the SR preset decays the generator's lr by epoch
    eta = cfg.model.g_scheduler.get("eta_min", 0.0)
    cb = apply_time_budget(cfg)
    assert cfg.model.g_scheduler is None and cfg.model.get("d_scheduler") is None
    assert cb.eta_min == pytest.approx(eta)


def test_train_with_a_budget_stops_within_the_first_epoch(make_cfg, tmp_path):
    # 1000 steps per epoch, 0.3 s of budget: the run must stop long before the epoch ends, then test as usual
    metrics, obj = train(make_cfg("budget_min=0.005", "dataset.samples_per_epoch=4000"))
    trainer = obj["trainer"]
    assert 1 <= trainer.global_step < 1000
    assert trainer.current_epoch == 1 and "test/dice" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "max_epochs: -1" in (tmp_path / "config.yaml").read_text()  # the run records what ran


# ---------------------------------------------------------------- the plain reference script of experiments/equal_budget
def test_plain_script_watershed_splits_two_touching_discs():
    import numpy as np

    from tests.helpers_scripts import load_experiment_script

    plain = load_experiment_script("equal_budget/plain_unet")
    yy, xx = np.mgrid[:80, :120]
    prob = (((yy - 40) ** 2 + (xx - 40) ** 2 < 18 ** 2) | ((yy - 40) ** 2 + (xx - 70) ** 2 < 18 ** 2)).astype(float)
    prob[5:8, 110:113] = 1.0  # a 9 px speck: dropped (under 30 px)
    inst = plain.watershed_instances(prob)
    ids = [i for i in np.unique(inst) if i]
    assert len(ids) == 2
    cols = sorted(np.argwhere(inst == i).mean(0)[1] for i in ids)
    assert cols[0] < 55 < cols[1]  # one nucleus each side of the neck between the discs (centres x = 40, 70)
    assert all(800 < (inst == i).sum() < 1100 for i in ids)  # each about one disc (1018 px), not a sliver
    assert inst[6, 111] == 0 and (inst > 0).sum() == int((prob > 0.5).sum()) - 9


def test_plain_script_watershed_keeps_an_elongated_nucleus_whole():
    import numpy as np

    from tests.helpers_scripts import load_experiment_script

    plain = load_experiment_script("equal_budget/plain_unet")
    yy, xx = np.mgrid[:60, :140]
    prob = ((((yy - 30) / 7.0) ** 2 + ((xx - 70) / 45.0) ** 2) < 1).astype(float)  # a 90 x 14 px ellipse: flat ridge
    inst = plain.watershed_instances(prob)
    assert len(np.unique(inst[inst > 0])) == 1


@pytest.mark.data
def test_plain_script_end_to_end_on_monuseg(data_dir, tmp_path):
    import csv
    import json

    from tests.helpers_scripts import load_experiment_script

    plain = load_experiment_script("equal_budget/plain_unet")
    summary = plain.main(["--minutes", "5", "--max-steps", "2", "--batch-size", "2", "--max-test-images", "1",
                          "--data-dir", str(data_dir), "--out", str(tmp_path / "run")])
    assert summary["steps"] == 2 and summary["train_images"] == 30 and summary["test_images"] == 1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["mean"] == pytest.approx(summary["mean"]) and saved["n_images"] == 1
    rows = list(csv.DictReader(open(tmp_path / "run" / "per_image.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["dice"]) <= 1.0 and int(rows[0]["n_true"]) > 100
