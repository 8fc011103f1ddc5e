"""Every yaml of every config group composes, and the cheap ones instantiate."""
import warnings
from pathlib import Path

import hydra
import pytest
import torch

from histoseg.utils.config import conf_dir

CONF = conf_dir()
GROUPS = ["dataset", "model", "loss", "aug", "optimizer", "trainer", "logger", "callbacks", "paths", "task", "degradation",
          "inference", "postprocess", "experiment", "hparams_search", "debug", "target"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_config_option_composes(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}", base=[])
    assert cfg.dataset and cfg.model and cfg.trainer
    if group in ("loss", "aug", "postprocess"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # albumentations warns (not raises) on 1.x argument names
            obj = hydra.utils.instantiate(cfg[group])
        assert obj is not None
    if group == "optimizer":
        opt = hydra.utils.instantiate(cfg.optimizer.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(opt, torch.optim.Optimizer)
        if cfg.optimizer.scheduler:
            hydra.utils.instantiate(cfg.optimizer.scheduler)(optimizer=opt)


def test_patch_size_is_one_key_that_data_and_inference_follow(make_cfg):
    cfg = make_cfg("patch_size=96", base=["experiment=synthetic_quick"])
    assert cfg.dataset.patch_size == 96


def test_data_root_follows_env(monkeypatch, make_cfg, tmp_path):
    monkeypatch.setenv("HISTOSEG_DATA", str(tmp_path))
    cfg = make_cfg()
    assert Path(cfg.paths.data_dir) == tmp_path.resolve()


def test_checkpoint_monitor_is_the_optimized_metric(make_cfg):
    cfg = make_cfg()
    assert cfg.callbacks.model_checkpoint.monitor == cfg.monitor == cfg.optimized_metric


@pytest.mark.parametrize("name", ["eval", "predict"])
def test_every_post_processing_setting_can_be_overridden_at_eval_and_predict(name):
    """``postprocess.*`` of histoseg-eval / histoseg-predict lists every PostProcessor setting (null keeps the one
    stored in the checkpoint), so none needs a ``+`` to override."""
    import inspect

    from omegaconf import OmegaConf

    from histoseg.inference.postprocess import PostProcessor

    block = OmegaConf.load(f"{conf_dir()}/{name}.yaml").postprocess
    params = set(inspect.signature(PostProcessor).parameters)
    assert set(block) == params and set(PostProcessor().config()) == params
    assert all(v is None for v in block.values())
