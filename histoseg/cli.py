"""Console scripts. Each is a thin Hydra main over a function in ``histoseg.tasks``.

``histoseg-train`` = ``python train.py``; ``histoseg-eval`` (conf/eval.yaml); ``histoseg-predict``
(conf/predict.yaml); ``histoseg-data <command> ...`` (conf/data.yaml); ``histoseg-sr-eval`` (conf/sr_eval.yaml).
"""
from __future__ import annotations

import importlib
import sys

import hydra
from omegaconf import DictConfig

from histoseg.utils.config import conf_dir


def hydra_entry(config_name: str, module: str):
    """Run ``<module>.run(cfg)`` as a Hydra app over the project's config tree (``conf/<config_name>.yaml``).

    The task module (torch, lightning) is imported only when the task runs, so ``--help``, ``--cfg job`` and
    shell completion answer in about a second."""

    from histoseg.tasks.utils import report_user_errors

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    @report_user_errors
    def main(cfg: DictConfig):
        return importlib.import_module(module).run(cfg)

    return main()


def train_main() -> None:
    hydra_entry("train", "histoseg.tasks.train")


def dataset_from_checkpoint(args: list[str]) -> str | None:
    """``histoseg-eval ckpt_path=X`` with no ``dataset=``: the name of the data the checkpoint was trained on
    (stored in it), when a dataset config of that name exists; None otherwise (Hydra then asks for one)."""
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    if "dataset" in keys:
        return None
    ckpt = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in ("ckpt_path", "ckpt")), None)
    if ckpt and ckpt.startswith("["):  # a list (an ensemble): its first member's data
        ckpt = ckpt.strip("[]").split(",")[0].strip().strip("'\"")
    if not ckpt:
        return None
    from histoseg.models.loading import load_checkpoint

    try:
        name = (load_checkpoint(ckpt)["histoseg"].get("dataset") or {}).get("name")
    except Exception:  # missing or foreign file: the task itself reports it, naming the file
        return None
    return name if name and (conf_dir() / "dataset" / f"{name}.yaml").is_file() else None


def eval_main() -> None:
    """``histoseg-eval ckpt_path=... [dataset=...]``: without ``dataset=``, the checkpoint's own training data."""
    name = dataset_from_checkpoint(sys.argv[1:])
    if name is not None:
        print(f"histoseg-eval: dataset={name} (the checkpoint's training data)", file=sys.stderr)
        sys.argv.append(f"dataset={name}")
    hydra_entry("eval", "histoseg.tasks.evaluate")


def predict_main() -> None:
    hydra_entry("predict", "histoseg.tasks.predict")


def sr_eval_main() -> None:
    """``histoseg-sr-eval sr_ckpt=... seg_ckpt=...``: the SR -> segmentation evaluation (conf/sr_eval.yaml)."""
    hydra_entry("sr_eval", "histoseg.tasks.superres")


def data_main() -> None:
    """``histoseg-data build dataset=X``: the first argument is the command, the rest Hydra overrides."""
    from histoseg.tasks.data import COMMANDS

    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: histoseg-data {{{','.join(COMMANDS)}}} dataset=<name> [overrides...]", file=sys.stderr)
        raise SystemExit(2)
    command = sys.argv.pop(1)
    sys.argv.append(f"+command={command}")
    hydra_entry("data", "histoseg.tasks.data")
