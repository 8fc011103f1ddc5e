from histoseg.models.modules.segmentation import SegmentationTask
from histoseg.models.modules.superres import SuperResolutionTask

__all__ = ["SegmentationTask", "SuperResolutionTask"]
