"""Shared fixtures: composed configs (Hydra compose API) with tiny CPU settings, the data kit location."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import histoseg  # noqa: F401  (resolvers)
from histoseg.utils.config import conf_dir, data_root

ROOT = Path(__file__).resolve().parents[1]

# tiny, fast settings every test config starts from
TINY = [
    "dataset=synthetic",
    "model=unet",
    "model.net.width=8",
    "model.net.depth=3",
    "patch_size=64",
    "dataset.reader.n_train=4",
    "dataset.reader.n_val=2",
    "dataset.reader.n_test=2",
    "dataset.reader.image_shape=[96,96]",
    "dataset.samples_per_epoch=8",
    "dataset.batch_size=4",
    "dataset.num_workers=0",
    "inference.tile_shape=[64,64]",
    "trainer.max_epochs=1",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def compose_cfg(tmp_path: Path, *overrides: str, base: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with tiny settings + ``overrides``; outputs go to ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=[*(TINY if base is None else base), *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, base: list[str] | None = None) -> DictConfig:
        return compose_cfg(tmp_path, *overrides, base=base)

    return _make


def pytest_configure(config):
    """Under pytest-xdist (``make test``) each worker gets its share of the cores as torch threads, and so do the
    processes it starts (OMP_NUM_THREADS): two workers with two threads each on two cores would stall each
    other's parallel regions."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        from benchmarks.common import cpu_count

        n = max(1, cpu_count() // workers)
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)


DATA = Path(data_root())
HAVE_DATA = (DATA / "DATA.md").is_file() or (DATA / "monuseg").is_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not HAVE_DATA:
        pytest.fail(
            f"the real data kit is not at {DATA}; set HISTOSEG_DATA (tests marked 'data' need it)", pytrace=False
        )
    return DATA


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.environ.setdefault("PYTHONHASHSEED", "0")
