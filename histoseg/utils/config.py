"""OmegaConf resolvers and config checks used by every entry point.

Resolvers (registered on import of ``histoseg``):

* ``${hs.data_root:}``: ``$HISTOSEG_DATA`` if set, else ``../shared/data`` next to the project (or the
  current directory) when it exists, else ``<project>/data``.
* ``${hs.mode:${dataset.num_classes}}``: ``binary`` for 2 classes, else ``multiclass``.
* ``${hs.out_channels:${dataset.num_classes}}``: 1 for binary, K otherwise.
* ``${hs.merge_tags:${tags},a,b}``: the tags followed by the other items, flattened, without duplicates.
* ``${hs.run_group:${hydra:mode},${hydra:sweep.dir},${hydra:runtime.choices.experiment},${task_name}}``:
  the logger group of a run: the sweep folder's name in a multirun, else the experiment, else the task.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> str:
    env = os.environ.get("HISTOSEG_DATA")
    if env:
        return str(Path(env).expanduser().resolve())
    for base in (Path.cwd(), PROJECT_ROOT):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return str(cand.resolve())
    return str(PROJECT_ROOT / "data")


def plain_dict(node) -> dict:
    """A config block as a plain ``dict`` (nested lists / dicts too, interpolations resolved), e.g. to write as JSON."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _mode(num_classes) -> str:
    from histoseg.losses.segmentation import mode_for

    return mode_for(int(num_classes))


def merge_tags(*items) -> list[str]:
    out: list[str] = []
    for item in items:
        for t in item if isinstance(item, list | tuple | ListConfig) else [item]:
            if t is not None and str(t) not in out:
                out.append(str(t))
    return out


def run_group(mode, sweep_dir, experiment, task_name) -> str:
    if str(mode).upper().endswith("MULTIRUN"):
        return Path(str(sweep_dir)).name
    return str(experiment) if experiment not in (None, "", "None", "null") else str(task_name)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("hs.data_root"):
        OmegaConf.register_new_resolver("hs.data_root", data_root)
        OmegaConf.register_new_resolver("hs.mode", _mode)
        OmegaConf.register_new_resolver("hs.out_channels", lambda k: 1 if int(k) == 2 else int(k))
        OmegaConf.register_new_resolver("hs.project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("hs.merge_tags"):
        OmegaConf.register_new_resolver("hs.merge_tags", merge_tags)
        OmegaConf.register_new_resolver("hs.run_group", run_group)


def conf_dir() -> Path:
    """The Hydra config tree (``conf/`` at the project root; ``$HISTOSEG_CONF`` overrides)."""
    env = os.environ.get("HISTOSEG_CONF")
    p = Path(env) if env else PROJECT_ROOT / "conf"
    if not (p / "train.yaml").is_file():
        raise FileNotFoundError(
            f"histoseg config tree not found at {p}; install histoseg from its source checkout (pip install -e .) "
            "or point HISTOSEG_CONF at a copy of its conf/ folder"
        )
    return p


def compose_config(overrides: list[str] | tuple[str, ...] = (), output_dir: str | Path | None = None,
                   config_name: str = "train"):
    """A run config composed with Hydra's compose API, for notebooks and scripts (``train.py`` needs none of this).

    ``output_dir`` becomes ``paths.output_dir`` (where checkpoints, CSV logs and reports go); by default a
    fresh folder under ``paths.log_dir/<task>/runs``. The Hydra run info the configs interpolate (choices,
    output dir) is set as for a ``train.py`` run.
    """
    from datetime import datetime

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        output_dir = Path(cfg.paths.log_dir) / str(cfg.task_name) / "runs" / stamp
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return cfg
