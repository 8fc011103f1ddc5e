from histoseg.models.modules.segmentation import SegmentationTask

__all__ = ["SegmentationTask"]
