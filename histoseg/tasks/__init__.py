"""Entry-point logic: ``train(cfg)``, ``evaluate(cfg)``, ``predict(cfg)``."""
from histoseg.tasks.train import build_datamodule, build_task, train

__all__ = ["train", "build_task", "build_datamodule"]
