"""Whole-slide images: reading (tiffslide / OpenSlide), tissue detection, streaming tiled inference into zarr,
streaming post-processing, and QuPath-ready outputs (pyramidal mask OME-TIFF, GeoJSON, thumbnails, summary).

Entry point: :func:`predict_slide` (``histoseg-predict`` routes slide files to it).
"""
from histoseg.wsi.slide import Slide, SlideError, is_slide, open_slide

__all__ = ["Slide", "SlideError", "is_slide", "open_slide", "predict_slide"]


def predict_slide(*args, **kwargs):
    """See :func:`histoseg.wsi.pipeline.predict_slide`."""
    from histoseg.wsi.pipeline import predict_slide as run

    return run(*args, **kwargs)
