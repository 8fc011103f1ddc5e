"""``trainer.precision: auto`` picks bf16 only where the CPU has bf16 kernels; explicit choices are kept."""
from __future__ import annotations

import logging

import pytest
import torch

from histoseg.utils import precision as prec


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_follows_the_cpus_bf16_kernels(monkeypatch, fast):
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: fast)
    assert prec.resolve_precision("auto", "cpu") == ("bf16-mixed" if fast else "32-true")


def test_explicit_precisions_pass_through_and_slow_bf16_is_warned(monkeypatch, caplog):
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert prec.resolve_precision("32-true", "cpu") == "32-true"
        assert not caplog.records
        assert prec.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert any("trainer.precision=auto" in r.getMessage() for r in caplog.records)


def test_auto_on_gpu_never_picks_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16 in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, _v=bf16, **k: _v)
        assert prec.resolve_precision("auto", "gpu") == ("bf16-mixed" if bf16 else "16-mixed")


def test_probe_matches_torch():
    assert prec.cpu_has_fast_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("fast", [True, False])
def test_train_resolves_auto_and_records_what_ran(make_cfg, monkeypatch, fast):
    from histoseg.tasks.train import train

    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: fast)
    metrics, obj = train(make_cfg("trainer=debug", "trainer.precision=auto"))
    want = "bf16-mixed" if fast else "32-true"
    assert obj["trainer"].precision == want
    assert obj["cfg"].trainer.precision == want  # what loggers and run metadata record


def test_default_trainer_and_presets_use_auto(make_cfg):
    from tests.test_configs import options

    assert make_cfg(base=[]).trainer.precision == "auto"
    for name in options("experiment"):
        p = str(make_cfg(f"experiment={name}", base=[]).trainer.precision)
        assert p in ("auto", "32-true"), f"experiment={name} pins trainer.precision={p}"
