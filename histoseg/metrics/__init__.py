"""Metrics: pixel (online + per image), instance (AJI / PQ), image quality (PSNR / SSIM),
point detection (precision / recall / F1 against centre-point annotations)."""
from histoseg.metrics.image import image_quality, psnr, ssim
from histoseg.metrics.instance import aji, aji_plus, instance_scores, panoptic_quality, remap_label
from histoseg.metrics.pixel import SegMetrics, image_scores
from histoseg.metrics.points import match_points, point_scores

__all__ = ["SegMetrics", "image_scores", "aji", "aji_plus", "panoptic_quality", "instance_scores", "remap_label", "psnr", "ssim",
           "image_quality", "match_points", "point_scores"]
