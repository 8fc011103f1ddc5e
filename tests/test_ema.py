"""callbacks=ema: an exponential moving average of the weights is what validation, the checkpoints, the test,
histoseg-eval and resume see; the optimiser's own weights stay in the checkpoint (weights=raw)."""
import pytest
import torch
from omegaconf import open_dict

from histoseg.data.io import DataError
from histoseg.tasks.evaluate import evaluate
from histoseg.tasks.train import train
from tests.conftest import compose_cfg

EMA = ["callbacks=ema", "callbacks.ema.decay=0.6"]
COMMON = ["trainer.max_epochs=2", "trainer.deterministic=true",
          "dataset.samples_per_epoch=16", "optimizer.optimizer.lr=3e-3", "tune_postprocess.enabled=false",
          "callbacks.validation_panels=null"]
STEPS_PER_EPOCH = 16 // 4


def _net(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("net.")}


def _train(tmp_path, name: str, *overrides: str, ema: bool = True):
    cfg = compose_cfg(tmp_path / name, *COMMON, *(EMA if ema else []), *overrides)
    return train(cfg)


def test_ema_is_the_running_average_and_what_test_and_eval_score(tmp_path):
    # the same run twice: once plain, once with the EMA callback (same seed, deterministic): the raw weights
    # must be identical (averaging does not touch the optimisation), the averaged ones must differ from them
    metrics, obj = _train(tmp_path, "ema", "dataset.reader.n_test=3")
    _, plain = _train(tmp_path, "plain", ema=False)
    last = torch.load(tmp_path / "ema" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    plain_last = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH
    raw, avg, plain_w = _net(last["current_model_state"]), _net(last["state_dict"]), _net(plain_last["state_dict"])
    for k in plain_w:
        torch.testing.assert_close(raw[k], plain_w[k], msg=f"raw weights changed by the EMA callback: {k}")
    conv = [k for k in raw if raw[k].is_floating_point() and k.endswith("weight") and raw[k].ndim == 4]
    assert conv and all(not torch.equal(raw[k], avg[k]) for k in conv)
    # the test at the end of training scored the best checkpoint's averaged weights, not its raw ones
    best = obj["trainer"].checkpoint_callback.best_model_path
    stored = torch.load(best, map_location="cpu", weights_only=True)
    tested = _net(obj["model"].state_dict())
    for k in conv:
        torch.testing.assert_close(tested[k], stored["state_dict"][k], msg=f"the test did not use the average: {k}")

    # histoseg-eval on the best checkpoint reproduces the training's test numbers with the averaged weights,
    # and weights=raw loads the optimiser's weights instead
    base = ["dataset=synthetic", "dataset.reader.n_train=4", "dataset.reader.n_val=2", "dataset.reader.n_test=3",
            "dataset.reader.image_shape=[96,96]", "trainer.precision=32-true", "trainer.enable_progress_bar=false"]
    ev, ev_obj = evaluate(compose_cfg(tmp_path / "eval", f"ckpt_path={best}", base=base, config_name="eval"))
    for k in ("test/dice", "test/iou", "test/aji"):
        assert float(ev[k]) == pytest.approx(float(metrics[k]), abs=1e-6), k
    _, raw_obj = evaluate(compose_cfg(tmp_path / "eval_raw", f"ckpt_path={best}", "weights=raw", base=base,
                                      config_name="eval"))
    got_raw, got_avg = _net(raw_obj["model"].state_dict()), _net(ev_obj["model"].state_dict())
    for k in conv:
        torch.testing.assert_close(got_raw[k], stored["current_model_state"][k])
        torch.testing.assert_close(got_avg[k], stored["state_dict"][k])
    import json

    assert json.loads((tmp_path / "eval_raw" / "summary.json").read_text())["weights"] == "raw"


def test_ema_run_resumed_from_last_ckpt_matches_the_uninterrupted_run(tmp_path):
    _, full = _train(tmp_path, "full", "test=false")
    cut_cfg = compose_cfg(tmp_path / "cut", *COMMON, *EMA, "test=false")
    with open_dict(cut_cfg):
        cut_cfg.callbacks.stop = {"_target_": "tests.test_train.StopAfterFirstEpoch"}
    train(cut_cfg)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    _, res = _train(tmp_path, "resumed", "test=false", f"ckpt_path={last}")
    assert res["trainer"].global_step == full["trainer"].global_step == 2 * STEPS_PER_EPOCH
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "current_model_state"):  # both the average and the raw weights continue exactly
        for k, v in _net(a[key]).items():
            torch.testing.assert_close(_net(b[key])[k], v, msg=f"{key} differs after resume: {k}")
    assert int(a["averaging_state"]["n_averaged"]) == int(b["averaging_state"]["n_averaged"]) == 2 * STEPS_PER_EPOCH


def test_raw_weights_of_a_checkpoint_without_averaging_is_a_clear_error(tmp_path):
    from histoseg.models.loading import load_task

    _, obj = _train(tmp_path, "plain", "trainer.max_epochs=1", "test=false", ema=False)
    best = obj["trainer"].checkpoint_callback.best_model_path
    with pytest.raises(DataError, match=r"\.ckpt: has no raw weights .*not trained with weight averaging"):
        load_task(best, weights="raw")
    with pytest.raises(ValueError, match=r"weights='ema'; choose one of averaged, raw"):
        load_task(best, weights="ema")


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_update_follows_the_warmed_up_decay(warmup):
    from torch.optim.swa_utils import AveragedModel

    from histoseg.callbacks.ema import ema_multi_avg_fn

    net = torch.nn.BatchNorm1d(1)  # a float weight and an integer buffer (num_batches_tracked)
    avg = AveragedModel(net, multi_avg_fn=ema_multi_avg_fn(0.9, warmup), use_buffers=True)
    expected = None
    for step in range(40):
        with torch.no_grad():
            net.weight.fill_(float(step))
        net.num_batches_tracked.fill_(step)
        avg.update_parameters(net)
        if expected is None:
            expected = float(step)  # the first update copies
        else:
            d = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9  # step = earlier updates
            expected = d * expected + (1 - d) * step
        assert float(avg.module.weight.detach()) == pytest.approx(expected, rel=1e-6), step
        assert int(avg.module.num_batches_tracked) == step
    # the warm-up forgets the first (untrained) weights much faster than a fixed decay
    assert (expected > 30) if warmup else (expected < 31)
