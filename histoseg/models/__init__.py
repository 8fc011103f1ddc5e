"""Models: backbone registry (``backbones/``) and LightningModules (``modules/``)."""
from histoseg.models.registry import (
    available_backbones,
    build_backbone,
    get_backbone_class,
    register_backbone,
)

__all__ = ["available_backbones", "build_backbone", "get_backbone_class", "register_backbone", "SegmentationTask", "load_task"]


def __getattr__(name):
    if name == "SegmentationTask":
        from histoseg.models.modules.segmentation import SegmentationTask

        return SegmentationTask
    if name == "load_task":
        from histoseg.models.loading import load_task

        return load_task
    raise AttributeError(name)
