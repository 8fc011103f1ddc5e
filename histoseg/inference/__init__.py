"""Inference: one tiled predictor, test-time augmentation, post-processing."""
from histoseg.inference.tiled import gaussian_weights, tile_starts, tiled_predict, with_tta

__all__ = ["tiled_predict", "gaussian_weights", "tile_starts", "with_tta"]
